"""The core's fast path for mesh files (``_core.yaml_documents``) against PyYAML's safe loader,
the reference: wherever the fast path answers, its values are PyYAML's, of the same types, in
the same order; wherever PyYAML refuses a text, the fast path steps aside so PyYAML's error (and
its line) is what the user sees. And it does answer for the files ambient's users write."""

from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ambient import _core, examples
from ambient.config import yamlfile

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import generate_mesh  # noqa: E402

Loader = yaml.CSafeLoader if yamlfile.FAST else yaml.SafeLoader


def fast(text: str) -> list[Any] | None:
    return _core.yaml_documents(text, yamlfile.MAX_DEPTH)


def reference(text: str) -> list[Any] | Exception:
    try:
        return list(yaml.load_all(text, Loader=Loader))
    except Exception as e:
        return e


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (True is not 1, -0.0 is not 0.0), with
    mappings in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or (a != a and b != b))
    return bool(a == b)


def check(text: str) -> bool:
    """The property: the fast path answers PyYAML's values or steps aside. True if it answered."""
    got, expected = fast(text), reference(text)
    if got is None:
        return False
    assert not isinstance(expected, Exception), (
        f"PyYAML refuses {text!r} ({expected}); fast read {got!r}"
    )
    assert same(got, expected), f"{text!r}: fast {got!r}, PyYAML {expected!r}"
    return True


def generated(pods: int, services: int, policies: int) -> str:
    out = io.StringIO()
    generate_mesh.write(out, pods, services, policies, seed=3)
    return out.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(examples.read("demo-mesh.yaml"), id="demo mesh"),
        pytest.param(examples.read("testbed-mesh.yaml"), id="testbed mesh"),
        pytest.param(generated(300, 60, 60), id="generated mesh"),
    ],
)
def test_the_files_users_write_are_read_by_the_fast_path_as_pyyaml_reads_them(text):
    assert check(text), "the fast path stepped aside for a plain mesh file"


@pytest.mark.parametrize(
    "text",
    [
        "a: !Exact x",  # a tag
        "a: &x 1\nb: *x",  # an anchor and an alias
        "<<: {a: 1}",  # a merge key
        "a: 0x1f\nb: 1_000\nc: 1:30\nd: 017\ne: .inf\nf: 1.\ng: 2001-12-14\nh: =",
        "a: 99999999999999999999",  # past 64 bits
        "%YAML 1.1\n---\na: 1",  # a directive
        "a: 1\r\nb: 2",  # a line break YAML 1.1 and 1.2 read alike, left to PyYAML all the same
        "a: x\x85y",  # NEL: a line break to YAML 1.1, a character to 1.2
        "\ufeffa: 1",  # a byte-order mark
        "a: \x07",  # a character PyYAML refuses
        "? [a]\n: 1",  # a key PyYAML cannot hash
        "a: [1, 2",  # a syntax error
        "a: |\n  text\n",  # a block scalar
        "{|}",  # an indicator starting a plain scalar: YAML 1.2 parsers take it, PyYAML refuses
        "a: [@x]",
        ": b",  # an empty key (YAML 1.2 only)
        "a\n...\n",  # a document end marker
        "[" * 200 + "]" * 200,  # deeper than MAX_DEPTH
    ],
)
def test_what_only_pyyaml_knows_is_left_to_it(text):
    assert fast(text) is None


def test_scalars_are_typed_as_pyyaml_types_them():
    text = (
        "a: yes\nb: Off\nc: ~\nd: null\ne:\nf: -12\ng: +0\nh: 1.50\ni: -0.0\nj: '12'\n"
        'k: 1e5\nl: 10.64.0.1\nm: nO\nn: "yes"\np: 0\n'
    )
    assert check(text)
    (doc,) = fast(text) or [None]
    assert doc["a"] is True and doc["b"] is False and doc["c"] is None and doc["e"] is None
    assert doc["f"] == -12 and doc["h"] == 1.5 and doc["j"] == "12" and doc["k"] == "1e5"
    assert doc["m"] == "nO" and doc["n"] == "yes"


def test_a_repeated_key_keeps_its_first_place_and_its_last_value():
    assert check("a: 1\nb: 2\na: 3")


# Values YAML can carry, dumped by PyYAML in its styles, then read back both ways.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["yes", "no", "on", "~", "0x1f", "1_0", "1:20", "2001-12-14", "<<", "="]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner, max_size=4
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs=st.lists(values, min_size=1, max_size=3),
    flow=st.sampled_from([True, False, None]),
    width=st.sampled_from([20, 80, 1000]),
    unicode=st.booleans(),
    style=st.sampled_from([None, "'", '"', "|", ">"]),
)
def test_anything_pyyaml_writes_is_read_alike(docs, flow, width, unicode, style):
    text = yaml.safe_dump_all(
        docs, default_flow_style=flow, width=width, allow_unicode=unicode, default_style=style
    )
    check(text)


# YAML's punctuation and scalars YAML 1.1 and 1.2 read differently, in any order: where the two
# grammars part ways (PyYAML refuses, or reads other values), the fast path must step aside.
PIECES = [
    *[
        "- ",
        ": ",
        "? ",
        ", ",
        "[",
        "]",
        "{",
        "}",
        "'",
        '"',
        "|",
        ">-",
        "|+",
        "#",
        " #",
        "&a ",
        "*a",
    ],
    *["---\n", "...\n", "\n", "\n  ", "\n    - ", "\t", " ", "  ", "\\", "\\n", "\\x41", "\\/"],
    *["a", "key", "10.0.0.1", "null", "~", "true", "no", "0x1f", "1_000", "1.5", "-1", "1e5"],
    *["2001-12-14", "é", "\u2028", "\x85", "\r", "\r\n", "%", "@", "`", "!"],
]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30).map("".join))
@example(text="a: 'x\n  y'")
@example(text='a: "x\\/y"')
@example(text="- a\n-\tb")
@example(text="a:\n- b\n- c")
@example(text="{a, b: }")
@example(text="[a: b, c]")
@example(text="a: b # c\n# d\n...\n---\ne")
def test_yaml_ish_text_is_read_alike_or_left_to_pyyaml(text):
    check(text)
