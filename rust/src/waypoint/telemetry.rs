//! What the waypoint reports per request, without a Python call per request: one access-log line
//! (JSON, Envoy's field names, as Istio's waypoint logs) and Istio's request metrics
//! (`istio_requests_total`, `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`), counted here per series and labelled by Python at scrape time from
//! the series key (`WaypointTable.request_series`).
//!
//! A request is reported once, when its response has been sent to the end (or the client went
//! away): the duration and the response bytes are known only then.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use pyo3::prelude::*;
use serde::{Deserialize, Serialize};

use crate::accesslog::AccessLog;
use crate::metrics::Counters;

/// Istio's (Envoy's default) bucket bounds for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's bucket bounds for `istio_request_bytes` and `istio_response_bytes`: powers of ten.
pub const BYTES_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// A histogram's counts per bucket (not cumulative; the last is `+Inf`), sum and count.
#[derive(Clone, Debug)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, value: f64) {
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// `(upper bound, count)` per bucket, `+Inf` (as `f64::MAX`) last: what the encoder takes.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        self.bounds
            .iter()
            .copied()
            .chain([f64::MAX]) // the encoder writes `+Inf` for f64::MAX
            .zip(self.counts.iter().copied())
            .collect()
    }
}

/// Which series a request counts in: everything its labels are made of.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SeriesKey {
    pub source_principal: Arc<str>,
    /// The client's address as its ztunnel forwarded it (`Forwarded: for`), for its workload.
    pub source_ip: Option<IpAddr>,
    /// `namespace/name` of the Service it was sent to ("" for a request to a pod).
    pub service: Arc<str>,
    /// `namespace/name` of the pod that answered ("" when none did).
    pub endpoint: Arc<str>,
    pub endpoint_principal: Arc<str>,
    pub code: u16,
    pub grpc: bool,
    pub flags: &'static str,
}

pub struct SeriesValues {
    pub duration: Histogram,
    pub request_bytes: Histogram,
    pub response_bytes: Histogram,
}

/// Which TCP series a stream at the waypoint (a TCP port) counts in.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct StreamKey {
    pub source_principal: Arc<str>,
    pub source_ip: Option<IpAddr>,
    pub service: Arc<str>,
    pub endpoint: Arc<str>,
    pub endpoint_principal: Arc<str>,
}

#[derive(Default)]
pub struct RequestMetrics {
    pub series: Mutex<HashMap<SeriesKey, SeriesValues>>,
    /// Istio's TCP metrics of the streams carried on TCP ports, counted as ztunnel counts them
    /// (the `Counters` its exposition reads).
    pub streams: Mutex<HashMap<StreamKey, Arc<Py<Counters>>>>,
}

impl RequestMetrics {
    /// The counters of `key`'s series. A series seen for the first time is made under the GIL
    /// (a `Counters` is a Python object, so the metrics endpoint can read it): once per client,
    /// Service and endpoint, never per byte.
    pub fn stream_counters(&self, key: StreamKey) -> Arc<Py<Counters>> {
        if let Some(found) = self.streams.lock().unwrap().get(&key) {
            return found.clone();
        }
        let made = Python::attach(|py| Py::new(py, Counters::default()))
            .expect("a Counters object can always be made");
        self.streams
            .lock()
            .unwrap()
            .entry(key)
            .or_insert_with(|| Arc::new(made))
            .clone()
    }
}

/// What only the access-log line needs of a request's head: taken only when there is a log.
pub struct Head {
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub request_id: String,
    pub user_agent: Option<String>,
}

/// One request, from its head to the end of its response.
/// Which requests get an access log line (a Telemetry resource's `accessLogging`): none when
/// `disabled`, else those whose response code is in one of `codes` (inclusive ranges; absent:
/// every request). Python evaluated the filter expression once per code when it compiled this.
#[derive(Deserialize, Debug, Default)]
pub struct LogRule {
    #[serde(default)]
    pub disabled: bool,
    #[serde(default)]
    pub codes: Option<Vec<(u16, u16)>>,
}

impl LogRule {
    fn logs(&self, code: u16) -> bool {
        !self.disabled
            && self
                .codes
                .as_ref()
                .is_none_or(|ranges| ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&code)))
    }
}

pub struct Exchange {
    pub started: Instant,
    /// Which answers are logged (None: all of them).
    pub log_rule: Option<Arc<LogRule>>,
    /// None when the waypoint writes no access log.
    pub head: Option<Head>,
    pub client: SocketAddr,
    pub key: SeriesKey,
    pub route: Arc<str>,
    pub upstream: Option<SocketAddr>,
    /// Shared with the request body on its way to the endpoint, which counts into it.
    pub request_bytes: Arc<AtomicU64>,
    pub response_bytes: AtomicU64,
}

impl Exchange {
    /// The request is over, answered with `code` (0: no response), `flags` saying what went
    /// wrong and `details` why: count it and write its line.
    pub fn finish(
        &self,
        code: u16,
        flags: &'static str,
        details: Option<&str>,
        metrics: &RequestMetrics,
        log: Option<&Py<AccessLog>>,
    ) {
        let key = SeriesKey {
            code,
            flags,
            ..self.key.clone()
        };
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        let response_bytes = self.response_bytes.load(Ordering::Relaxed);
        {
            let mut series = metrics.series.lock().unwrap();
            let values = series.entry(key).or_insert_with(|| SeriesValues {
                duration: Histogram::new(&DURATION_BUCKETS_MS),
                request_bytes: Histogram::new(&BYTES_BUCKETS),
                response_bytes: Histogram::new(&BYTES_BUCKETS),
            });
            values.duration.observe(millis);
            values.request_bytes.observe(request_bytes as f64);
            values.response_bytes.observe(response_bytes as f64);
        }
        let wanted = self.log_rule.as_ref().is_none_or(|r| r.logs(code));
        if let (Some(log), Some(head), true) = (log, &self.head, wanted) {
            let line = Line {
                method: &head.method,
                authority: &head.authority,
                path: &head.path,
                protocol: head.protocol,
                response_code: code,
                response_flags: flags,
                response_code_details: details,
                route_name: &self.route,
                upstream_host: self.upstream,
                upstream_workload: non_empty(&self.key.endpoint),
                upstream_peer_uri_san: non_empty(&self.key.endpoint_principal),
                destination_service: non_empty(&self.key.service),
                downstream_remote_address: self.client,
                downstream_peer_uri_san: non_empty(&self.key.source_principal),
                x_request_id: &head.request_id,
                user_agent: head.user_agent.as_deref(),
                duration: (millis * 1000.0).round() / 1000.0,
                bytes_received: request_bytes,
                bytes_sent: response_bytes,
            };
            // Straight into the line's text: no JSON value tree per request.
            if let Ok(mut text) = serde_json::to_string(&line) {
                text.push('\n');
                log.get().send(text);
            }
        }
    }
}

/// One request's access-log line: Envoy's field names, as Istio's waypoint logs them.
#[derive(Serialize)]
struct Line<'a> {
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    protocol: &'a str,
    response_code: u16,
    response_flags: &'a str,
    response_code_details: Option<&'a str>,
    route_name: &'a str,
    upstream_host: Option<SocketAddr>,
    upstream_workload: Option<&'a str>,
    upstream_peer_uri_san: Option<&'a str>,
    destination_service: Option<&'a str>,
    downstream_remote_address: SocketAddr,
    downstream_peer_uri_san: Option<&'a str>,
    x_request_id: &'a str,
    user_agent: Option<&'a str>,
    duration: f64,
    bytes_received: u64,
    bytes_sent: u64,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}
