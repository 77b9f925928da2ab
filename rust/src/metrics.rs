//! Per-label-set connection counters for telemetry: Python creates one `Counters` per set of
//! metric labels (source and destination workloads, security policy...) and attaches it to the
//! plans and verdicts it gives; the core counts connections and bytes into it with atomics as
//! they happen, and the metrics endpoint reads them at scrape time — no lock on the data path,
//! and byte counters move while a connection is still open.
//!
//! The response flag is not part of the label set Python makes: the core learns it only when the
//! connection ends. As Istio's ztunnel counts, a connection is `opened` with flag `-` once it has
//! a decision, and `closed` (plus `failed`, for a failure) with the flag of how it ended: `DENY`
//! for a policy refusal (also a late one, when a policy change closes it), `CONNECT` when the far
//! side could not be reached or the connection broke, `TLS_FAILURE` / `H2_HANDSHAKE_FAILURE` when
//! an HBONE dial failed there, `-` when it ended normally or was cut by a drain.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// How a connection ended, as Istio's `response_flags` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    None = 0,
    Deny = 1,
    Connect = 2,
    TlsFailure = 3,
    H2HandshakeFailure = 4,
}

pub const FLAGS: [Flag; 5] = [
    Flag::None,
    Flag::Deny,
    Flag::Connect,
    Flag::TlsFailure,
    Flag::H2HandshakeFailure,
];

impl Flag {
    pub fn label(self) -> &'static str {
        match self {
            Flag::None => "-",
            Flag::Deny => "DENY",
            Flag::Connect => "CONNECT",
            Flag::TlsFailure => "TLS_FAILURE",
            Flag::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
        }
    }

    /// Every flag but `-` also counts the connection as failed.
    fn is_failure(self) -> bool {
        self != Flag::None
    }
}

#[pyclass(frozen, module = "ambient._core")]
#[derive(Default)]
pub struct Counters {
    opened: AtomicU64,
    closed: [AtomicU64; 5],
    failed: [AtomicU64; 5],
    /// Bytes from the connection's initiator towards its destination.
    pub sent: AtomicU64,
    /// Bytes from the destination back to the initiator.
    pub received: AtomicU64,
}

impl Counters {
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub fn closed(&self, flag: Flag) -> u64 {
        self.closed[flag as usize].load(Ordering::Relaxed)
    }

    pub fn failed(&self, flag: Flag) -> u64 {
        self.failed[flag as usize].load(Ordering::Relaxed)
    }
}

fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One connection's place in the metrics: counted opened when made, closed (with its flag) when
/// finished — or, if it is dropped unfinished (a drain cut it mid-way), closed with `-`.
pub struct ConnectionCount<'a> {
    counters: Option<&'a Counters>,
    finished: bool,
}

impl<'a> ConnectionCount<'a> {
    pub fn open(counters: Option<&'a Counters>) -> Self {
        counters.inspect(|c| inc(&c.opened));
        Self {
            counters,
            finished: false,
        }
    }

    pub fn finish(mut self, flag: Flag) {
        self.record(flag);
    }

    fn record(&mut self, flag: Flag) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some(c) = self.counters {
            inc(&c.closed[flag as usize]);
            if flag.is_failure() {
                inc(&c.failed[flag as usize]);
            }
        }
    }
}

impl Drop for ConnectionCount<'_> {
    fn drop(&mut self) {
        self.record(Flag::None);
    }
}

#[pymethods]
impl Counters {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// `{"opened", "sent", "received": int, "closed", "failed": {flag: int}}`, each value read
    /// atomically; the flag maps hold only the flags that occurred (and `-` for `closed`).
    fn snapshot<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        let closed = PyDict::new(py);
        let failed = PyDict::new(py);
        for flag in FLAGS {
            let c = self.closed[flag as usize].load(Ordering::Relaxed);
            if c > 0 || flag == Flag::None {
                closed.set_item(flag.label(), c)?;
            }
            let f = self.failed[flag as usize].load(Ordering::Relaxed);
            if f > 0 {
                failed.set_item(flag.label(), f)?;
            }
        }
        out.set_item("opened", self.opened.load(Ordering::Relaxed))?;
        out.set_item("sent", self.sent.load(Ordering::Relaxed))?;
        out.set_item("received", self.received.load(Ordering::Relaxed))?;
        out.set_item("closed", closed)?;
        out.set_item("failed", failed)?;
        Ok(out)
    }

    /// No connection is open in this label set (every one opened was closed): its series may
    /// be dropped once its workloads have left the mesh.
    #[getter]
    fn idle(&self) -> bool {
        let closed: u64 = self.closed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        closed >= self.opened.load(Ordering::Relaxed)
    }

    fn __repr__(&self) -> String {
        let closed: u64 = self.closed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        format!(
            "Counters(opened={}, closed={closed}, sent={}, received={})",
            self.opened.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(c: &Counters, f: Flag) -> u64 {
        c.closed[f as usize].load(Ordering::Relaxed)
    }

    fn failed(c: &Counters, f: Flag) -> u64 {
        c.failed[f as usize].load(Ordering::Relaxed)
    }

    #[test]
    fn a_denial_is_opened_with_no_flag_and_closed_and_failed_with_deny() {
        let c = Counters::default();
        ConnectionCount::open(Some(&c)).finish(Flag::Deny);
        assert_eq!(c.opened.load(Ordering::Relaxed), 1);
        assert_eq!((closed(&c, Flag::None), closed(&c, Flag::Deny)), (0, 1));
        assert_eq!((failed(&c, Flag::None), failed(&c, Flag::Deny)), (0, 1));
    }

    #[test]
    fn a_connection_dropped_unfinished_is_closed_without_a_flag_and_not_failed() {
        let c = Counters::default();
        drop(ConnectionCount::open(Some(&c)));
        assert_eq!(closed(&c, Flag::None), 1);
        assert!(FLAGS.iter().all(|f| failed(&c, *f) == 0));
    }
}
