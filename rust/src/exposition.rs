//! The text of the metrics endpoint, written by the `prometheus-client` crate as Istio's ztunnel
//! writes its own (OpenMetrics text, served as `text/plain` unless asked for OpenMetrics).
//!
//! Python decides which series exist — a label set per `Counters`, and the few families only it
//! knows (`istio_build`, the core's statistics by name) — and the core reads the counters and
//! writes the text, with the process metrics it reads from `/proc`. Nothing of this lives in
//! Python between scrapes, and a running proxy needs no Python Prometheus client (whose
//! exposition module alone maps OpenSSL into the process for its push-gateway client).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::metrics::{Counters, FLAGS};

/// A label value, escaped as the exposition formats require (the crate writes values as they
/// are, and a `"` in a pod's label must not end the value early).
#[derive(Debug, Clone)]
struct Value(String);

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

type Labels = Vec<(String, Value)>;

#[derive(Debug, Clone, Copy)]
enum Sample {
    Count(u64),
    Real(f64),
}

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    counter: bool,
    samples: Vec<(Labels, Sample)>,
}

impl Family {
    fn new(name: &str, help: &str, counter: bool) -> Self {
        Self {
            name: name.to_owned(),
            help: help.to_owned(),
            counter,
            samples: Vec::new(),
        }
    }
}

/// A histogram family: per label set, the sum, the count and `(upper bound, count)` per bucket
/// (not cumulative, `+Inf` last), as the encoder takes them.
#[derive(Debug)]
struct HistogramFamily {
    name: String,
    help: String,
    samples: Vec<HistogramSample>,
}

/// A label set's histogram: labels, sum, count, `(upper bound, count)` per bucket.
type HistogramSample = (Labels, f64, u64, Vec<(f64, u64)>);

/// Families read at one scrape, handed to a registry that encodes them once.
#[derive(Debug)]
struct Scrape(Vec<Family>, Vec<HistogramFamily>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let kind = if family.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut metric = encoder.encode_descriptor(&family.name, &family.help, None, kind)?;
            if let [(labels, sample)] = family.samples.as_slice() {
                if labels.is_empty() {
                    // One sample without labels: `name 3`, not `name{} 3`.
                    encode(family.counter, *sample, metric)?;
                    continue;
                }
            }
            for (labels, sample) in &family.samples {
                encode(family.counter, *sample, metric.encode_family(labels)?)?;
            }
        }
        for family in &self.1 {
            let mut metric = encoder.encode_descriptor(
                &family.name,
                &family.help,
                None,
                MetricType::Histogram,
            )?;
            for (labels, sum, count, buckets) in &family.samples {
                metric
                    .encode_family(labels)?
                    .encode_histogram::<Labels>(*sum, *count, buckets, None)?;
            }
        }
        Ok(())
    }
}

fn encode(counter: bool, sample: Sample, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
    match (counter, sample) {
        (true, Sample::Count(n)) => ConstCounter::new(n).encode(encoder),
        (true, Sample::Real(x)) => ConstCounter::new(x).encode(encoder),
        (false, Sample::Count(n)) => ConstGauge::new(n as i64).encode(encoder),
        (false, Sample::Real(x)) => ConstGauge::new(x).encode(encoder),
    }
}

/// The TCP families of Istio's ztunnel from each label set's counters: opened with flag `-`,
/// closed with each flag that occurred (and `-`), failed with each failure flag; bytes as the
/// server sees them (it *receives* what the client sends).
fn tcp_families(
    py: Python<'_>,
    names: &[String],
    flag_index: usize,
    series: &[(Vec<String>, Py<Counters>)],
) -> PyResult<Vec<Family>> {
    let mut opened = Family::new(
        "istio_tcp_connections_opened",
        "TCP connections opened",
        true,
    );
    let mut closed = Family::new(
        "istio_tcp_connections_closed",
        "TCP connections closed",
        true,
    );
    let mut failed = Family::new(
        "istio_tcp_connections_failed",
        "TCP connections that could not be made",
        true,
    );
    let mut received = Family::new(
        "istio_tcp_received_bytes",
        "Bytes received from the client side",
        true,
    );
    let mut sent = Family::new(
        "istio_tcp_sent_bytes",
        "Bytes sent to the client side",
        true,
    );
    for (values, counters) in series {
        if values.len() + 1 != names.len() || flag_index > values.len() {
            return Err(PyValueError::new_err(format!(
                "a label set has {} values; expected {} (all labels but response_flags)",
                values.len(),
                names.len().saturating_sub(1)
            )));
        }
        let labels = |flag: &str| -> Labels {
            let mut out: Labels = Vec::with_capacity(names.len());
            let mut given = values.iter();
            for (i, name) in names.iter().enumerate() {
                let value = if i == flag_index {
                    flag.to_owned()
                } else {
                    given.next().cloned().unwrap_or_default()
                };
                out.push((name.clone(), Value(value)));
            }
            out
        };
        let c = counters.bind(py).get();
        let unflagged = labels("-");
        opened
            .samples
            .push((unflagged.clone(), Sample::Count(c.opened())));
        for flag in FLAGS {
            let n = c.closed(flag);
            if n > 0 || flag == crate::metrics::Flag::None {
                closed
                    .samples
                    .push((labels(flag.label()), Sample::Count(n)));
            }
            let n = c.failed(flag);
            if n > 0 {
                failed
                    .samples
                    .push((labels(flag.label()), Sample::Count(n)));
            }
        }
        let (to_server, to_client) = (
            c.sent.load(Ordering::Relaxed),
            c.received.load(Ordering::Relaxed),
        );
        received
            .samples
            .push((unflagged.clone(), Sample::Count(to_server)));
        sent.samples.push((unflagged, Sample::Count(to_client)));
    }
    Ok(vec![opened, closed, failed, received, sent])
}

/// What Prometheus clients call the process metrics, read from `/proc` and `getrusage`.
fn process_families() -> Vec<Family> {
    let mut out = Vec::new();
    let mut one = |name: &str, help: &str, counter: bool, sample: Sample| {
        let mut f = Family::new(name, help, counter);
        f.samples.push((Vec::new(), sample));
        out.push(f);
    };
    // SAFETY: getrusage and getrlimit only write the structs they are given.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    one(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        true,
        Sample::Real(seconds(usage.ru_utime) + seconds(usage.ru_stime)),
    );
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut fields = statm
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        let (size, resident) = (fields.next().unwrap_or(0), fields.next().unwrap_or(0));
        one(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            false,
            Sample::Count(size * page),
        );
        one(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            false,
            Sample::Count(resident * page),
        );
    }
    if let Some(started) = start_time() {
        one(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            false,
            Sample::Real(started),
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        one(
            "process_open_fds",
            "Number of open file descriptors",
            false,
            Sample::Count(fds.count() as u64),
        );
    }
    let limit = unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur
    };
    one(
        "process_max_fds",
        "Maximum number of open file descriptors",
        false,
        Sample::Count(limit),
    );
    out
}

/// Seconds since the epoch at which this process started: its start in clock ticks after boot
/// (`/proc/self/stat`, field 22) plus the boot time (`/proc/stat`, `btime`).
fn start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(boot + ticks / hz)
}

/// (name, help, is a counter, [(labels, value)]) as Python gives a family of its own.
type PyFamily = (String, String, bool, Vec<(Vec<(String, String)>, f64)>);
type PyHistogramFamily = (String, String, Vec<PyHistogram>);
type PyHistogram = (Vec<(String, String)>, f64, u64, Vec<(f64, u64)>);

fn labels_of(labels: Vec<(String, String)>) -> Labels {
    labels.into_iter().map(|(k, v)| (k, Value(v))).collect()
}

/// The metrics endpoint's text. `label_names`: the TCP label names in order, `response_flags`
/// at `flag_index`; `series`: each label set's values (without the flag) and its counters;
/// `families`: the other families Python knows (values as floats; whole numbers are written
/// as integers); `histograms`: histogram families (each sample's labels, sum, count and
/// `(upper bound, count)` per bucket, not cumulative, `+Inf` last).
#[pyfunction]
#[pyo3(signature = (label_names, flag_index, series, families, histograms=Vec::new()))]
pub fn encode_metrics(
    py: Python<'_>,
    label_names: Vec<String>,
    flag_index: usize,
    series: Vec<(Vec<String>, Py<Counters>)>,
    families: Vec<PyFamily>,
    histograms: Vec<PyHistogramFamily>,
) -> PyResult<String> {
    let mut all = tcp_families(py, &label_names, flag_index, &series)?;
    for (name, help, counter, samples) in families {
        // A family Python adds to one the core writes (a waypoint's TCP streams, summed per
        // label set) joins it: one name, one family in the text.
        let index = match all.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                all.push(Family::new(&name, &help, counter));
                all.len() - 1
            }
        };
        let family = &mut all[index];
        for (labels, value) in samples {
            let labels = labels_of(labels);
            let whole = value.fract() == 0.0 && (0.0..1e15).contains(&value);
            let sample = if whole {
                Sample::Count(value as u64)
            } else {
                Sample::Real(value)
            };
            family.samples.push((labels, sample));
        }
    }
    all.extend(process_families());
    let histograms = histograms
        .into_iter()
        .map(|(name, help, samples)| HistogramFamily {
            name,
            help,
            samples: samples
                .into_iter()
                .map(|(labels, sum, count, buckets)| (labels_of(labels), sum, count, buckets))
                .collect(),
        })
        .collect();
    py.detach(|| {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(all, histograms)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .map_err(|e| PyValueError::new_err(format!("metrics could not be encoded: {e}")))?;
        Ok(text)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(families: Vec<Family>) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(families, Vec::new())));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn a_label_value_with_quotes_backslashes_and_newlines_is_escaped() {
        let mut f = Family::new("x", "X", false);
        f.samples.push((
            vec![("app".into(), Value("a\"b\\c\nd".into()))],
            Sample::Count(1),
        ));
        assert!(encoded(vec![f]).contains(r#"x{app="a\"b\\c\nd"} 1"#));
    }

    #[test]
    fn counters_get_total_and_the_process_metrics_are_there() {
        let mut f = Family::new("things", "Things", true);
        f.samples.push((Vec::new(), Sample::Count(3)));
        let mut all = vec![f];
        all.extend(process_families());
        let text = encoded(all);
        assert!(
            text.contains("# TYPE things counter\nthings_total 3\n"),
            "{text}"
        );
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(
                text.contains(&format!("\n{name} ")),
                "{name} missing:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
