//! A fast path for reading mesh files: YAML parsed by yaml-rust2 into the very Python values
//! PyYAML's safe loader would build — or nothing, and the caller reads the text with PyYAML.
//!
//! Why: PyYAML constructs every node in Python (about 7 µs a node even with libyaml scanning),
//! and a 5,000-pod mesh file took two seconds to read. Kubernetes YAML is a small part of YAML:
//! mappings, sequences, strings, numbers, booleans. That part is built here; everything else is
//! left to PyYAML, which stays the reference for what a file means (`ambient.config.yamlfile`):
//! - any tag, anchor or alias; a directive or a `...` document end; an empty key, or one that
//!   is a mapping or a sequence; a block scalar (`|`, `>`: the grammars chomp them differently);
//! - a plain scalar PyYAML would read as anything but null, a boolean, a decimal integer that fits
//!   in 64 bits or a plain decimal fraction (so `0x1F`, `1_000`, `1:30`, `.inf`, `2001-12-14`,
//!   `<<`, `=` go to PyYAML, which knows their YAML 1.1 meanings);
//! - characters where YAML 1.1 (libyaml) and 1.2 (yaml-rust2) differ or PyYAML refuses: line
//!   breaks other than `\n`, tabs, a byte-order mark, non-printable characters;
//! - nesting deeper than the caller's limit, and every syntax error (PyYAML says where and why).
//!
//! Plain scalars are typed with PyYAML's own implicit resolvers (its regular expressions, in its
//! order, dispatched on the first character as it does). A differential test
//! (tests/unit/test_yaml_fast_path.py) holds the two readers to the same values.

use std::sync::LazyLock;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyList, PyString};
use regex::Regex;
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;

/// What a plain scalar is to PyYAML's resolver (`yaml/resolver.py`).
#[derive(Debug, PartialEq)]
enum Implicit {
    Null,
    Bool(bool),
    Float,
    Int,
    /// A tag the fast path leaves to PyYAML: merge, timestamp, value, yaml.
    Other,
    Str,
}

struct Resolvers {
    float: Regex,
    int: Regex,
    timestamp: Regex,
}

/// PyYAML's patterns (compiled there with `re.X`; whitespace outside classes removed here).
static RESOLVERS: LazyLock<Resolvers> = LazyLock::new(|| {
    Resolvers {
    float: Regex::new(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
    )
    .expect("float pattern"),
    int: Regex::new(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+)$",
    )
    .expect("int pattern"),
    timestamp: Regex::new(
        r"^(?:[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]|[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)$",
    )
    .expect("timestamp pattern"),
}
});

/// PyYAML's `Resolver.resolve` for a plain scalar: the resolvers registered for its first
/// character, in registration order (bool, float, int, merge, null, timestamp, value, yaml).
fn resolve(value: &str) -> Implicit {
    let Some(first) = value.chars().next() else {
        return Implicit::Null;
    };
    let r = &*RESOLVERS;
    if "yYnNtTfFoO".contains(first) {
        match value {
            "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
                return Implicit::Bool(true)
            }
            "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
                return Implicit::Bool(false)
            }
            _ => {}
        }
    }
    if "-+0123456789.".contains(first) && r.float.is_match(value) {
        return Implicit::Float;
    }
    if "-+0123456789".contains(first) && r.int.is_match(value) {
        return Implicit::Int;
    }
    if first == '<' && value == "<<" {
        return Implicit::Other;
    }
    if matches!(value, "~" | "null" | "Null" | "NULL") {
        return Implicit::Null;
    }
    if first.is_ascii_digit() && r.timestamp.is_match(value) {
        return Implicit::Other;
    }
    if (first == '=' && value == "=") || matches!(value, "!" | "&" | "*") {
        return Implicit::Other;
    }
    Implicit::Str
}

/// Why the fast path stepped aside (the caller only needs to know that it did).
struct NotFast;

/// Characters PyYAML refuses (`Reader.NON_PRINTABLE`), and those YAML 1.1 and 1.2 read
/// differently: `\r`, NEL, LS and PS line breaks; tabs, which 1.2 takes as separation where
/// 1.1 refuses them; and a byte-order mark, which PyYAML treats specially.
fn needs_pyyaml(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
        || !matches!(c, '\n' | '\x20'..='\x7e' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fefe}' | '\u{ff00}'..='\u{fffd}' | '\u{10000}'..)
}

fn plain<'py>(py: Python<'py>, value: &str) -> Result<Bound<'py, PyAny>, NotFast> {
    Ok(match resolve(value) {
        Implicit::Null => py.None().into_bound(py),
        Implicit::Bool(b) => PyBool::new(py, b).to_owned().into_any(),
        Implicit::Str => PyString::new(py, value).into_any(),
        Implicit::Int => {
            // Only plain decimal: PyYAML reads `0o17`-ish, `0x`, `0b`, `_` and `1:30` its way.
            let digits = value.strip_prefix(['-', '+']).unwrap_or(value);
            if digits != "0"
                && (digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(NotFast);
            }
            let n: i64 = value.parse().map_err(|_| NotFast)?;
            n.into_pyobject(py).map_err(|_| NotFast)?.into_any()
        }
        Implicit::Float => {
            // Only `[-+]digits.digits`; Rust and Python both round a decimal correctly.
            let digits = value.strip_prefix(['-', '+']).unwrap_or(value);
            let (whole, fraction) = digits.split_once('.').ok_or(NotFast)?;
            let decimal = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !decimal(whole) || !decimal(fraction) {
                return Err(NotFast);
            }
            let f: f64 = value.parse().map_err(|_| NotFast)?;
            PyFloat::new(py, f).into_any()
        }
        Implicit::Other => return Err(NotFast),
    })
}

enum Frame<'py> {
    Sequence(Bound<'py, PyList>),
    /// A mapping and the key waiting for its value.
    Mapping(Bound<'py, PyDict>, Option<Bound<'py, PyAny>>),
}

fn documents<'py>(
    py: Python<'py>,
    text: &str,
    max_depth: usize,
) -> Result<Vec<Bound<'py, PyAny>>, NotFast> {
    // Directives, and document end markers (YAML 1.1 and 1.2 disagree on where `...` may go).
    let at_line_start = |s: &str| text.starts_with(s) || text.contains(&format!("\n{s}"));
    if at_line_start("%") || at_line_start("...") || text.chars().any(needs_pyyaml) {
        return Err(NotFast);
    }
    let mut parser = Parser::new_from_str(text);
    let mut docs = Vec::new();
    let mut stack: Vec<Frame<'py>> = Vec::new();
    loop {
        let (event, _) = parser.next_token().map_err(|_| NotFast)?;
        // The node this event completes, if any.
        let node: Bound<'py, PyAny> = match event {
            Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentStart | Event::DocumentEnd => {
                continue
            }
            Event::Alias(_) => return Err(NotFast),
            Event::Scalar(value, style, anchor, tag) => {
                if anchor != 0 || tag.is_some() || stack.len() + 1 > max_depth {
                    return Err(NotFast);
                }
                if value.is_empty()
                    && style == TScalarStyle::Plain
                    && matches!(stack.last(), Some(Frame::Mapping(_, None)))
                {
                    // An empty key: YAML 1.2 reads `: v` as one, libyaml only `? ` (then `: v`).
                    return Err(NotFast);
                }
                // PyYAML's scanner never starts a plain scalar with one of these indicators
                // (yaml-rust2 does, in flow collections: `{|}` is `{"|": null}` to it).
                if style == TScalarStyle::Plain && value.starts_with(['|', '>', '@', '`', '%']) {
                    return Err(NotFast);
                }
                match style {
                    TScalarStyle::Plain => plain(py, &value)?,
                    TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => {
                        PyString::new(py, &value).into_any()
                    }
                    // Block scalars: the two grammars chomp their line breaks differently
                    // (an empty `|` is "" to libyaml, "\n" to yaml-rust2).
                    TScalarStyle::Literal | TScalarStyle::Folded => return Err(NotFast),
                }
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if anchor != 0 || tag.is_some() || stack.len() + 1 > max_depth {
                    return Err(NotFast);
                }
                if let Some(Frame::Mapping(_, None)) = stack.last() {
                    return Err(NotFast); // a collection as a key: PyYAML refuses it, with a mark
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Sequence(PyList::empty(py))
                } else {
                    Frame::Mapping(PyDict::new(py), None)
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Sequence(list)) => list.into_any(),
                Some(Frame::Mapping(dict, None)) => dict.into_any(),
                _ => return Err(NotFast),
            },
        };
        match stack.last_mut() {
            None => docs.push(node),
            Some(Frame::Sequence(list)) => list.append(node).map_err(|_| NotFast)?,
            Some(Frame::Mapping(_, key @ None)) => *key = Some(node),
            Some(Frame::Mapping(dict, key)) => {
                let k = key.take().ok_or(NotFast)?;
                // A repeated key: the last value wins, as PyYAML's constructor has it.
                dict.set_item(k, node).map_err(|_| NotFast)?;
            }
        }
    }
    Ok(docs)
}

/// The documents of `text` as PyYAML's safe loader reads them, or None where PyYAML must read
/// the text itself (see the module's comment). `max_depth`: the deepest a node may be (the root
/// is at depth 1); a deeper text is left to PyYAML, which refuses it at the node.
#[pyfunction]
pub fn yaml_documents<'py>(
    py: Python<'py>,
    text: &str,
    max_depth: usize,
) -> Option<Vec<Bound<'py, PyAny>>> {
    documents(py, text, max_depth).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_follows_pyyaml() {
        for (value, expected) in [
            ("", Implicit::Null),
            ("~", Implicit::Null),
            ("null", Implicit::Null),
            ("yes", Implicit::Bool(true)),
            ("OFF", Implicit::Bool(false)),
            ("nO", Implicit::Str),
            ("12", Implicit::Int),
            ("0x1f", Implicit::Int),
            ("1_000", Implicit::Int),
            ("1:30", Implicit::Int),
            ("1.5", Implicit::Float),
            ("1e5", Implicit::Str),
            ("1.0e+5", Implicit::Float),
            (".inf", Implicit::Float),
            ("2001-12-14", Implicit::Other),
            ("<<", Implicit::Other),
            ("=", Implicit::Other),
            ("10.64.0.1", Implicit::Str),
            ("nginx:1.25", Implicit::Str),
        ] {
            assert_eq!(resolve(value), expected, "{value:?}");
        }
    }
}
