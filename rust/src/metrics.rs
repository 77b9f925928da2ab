//! Per-label-set connection counters for telemetry: Python creates one `Counters` per set of
//! metric labels (source and destination workloads, security policy...) and attaches it to the
//! plans and verdicts it gives; the core counts connections and bytes into it with atomics as
//! they happen, and the metrics endpoint reads them at scrape time — no lock on the data path,
//! and byte counters move while a connection is still open.

use std::sync::atomic::{AtomicU64, Ordering};

use pyo3::prelude::*;

#[pyclass(frozen, module = "ambient._core")]
#[derive(Default)]
pub struct Counters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    pub failed: AtomicU64,
    /// Bytes from the connection's initiator towards its destination.
    pub sent: AtomicU64,
    /// Bytes from the destination back to the initiator.
    pub received: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a connection opened now and closed when dropped, however the connection ends.
pub struct OpenConnection<'a>(Option<&'a Counters>);

impl<'a> OpenConnection<'a> {
    pub fn count(counters: Option<&'a Counters>) -> Self {
        counters.inspect(|c| Counters::inc(&c.opened));
        Self(counters)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.inspect(|c| Counters::inc(&c.closed));
    }
}

#[pymethods]
impl Counters {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// (opened, closed, failed, sent, received), each read atomically.
    fn snapshot(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.opened.load(Ordering::Relaxed),
            self.closed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn __repr__(&self) -> String {
        let (o, c, f, s, r) = self.snapshot();
        format!("Counters(opened={o}, closed={c}, failed={f}, sent={s}, received={r})")
    }
}
