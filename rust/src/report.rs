//! Connection reports: when a connection or stream that got a plan or verdict ends, the listener's
//! reporter (a Python callable, optional) is told what happened — once per connection, never per
//! byte — for access logs and telemetry. The plan or verdict object itself is passed back, so
//! whatever the decision put in its `tag` travels with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use pyo3::prelude::*;

use crate::copy::Transferred;
use crate::decision::{Plan, Verdict};

/// What the connection was decided to be.
pub enum Subject {
    Plan(Plan),
    Verdict(Verdict),
}

impl Subject {
    fn to_py(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Subject::Plan(Plan::Hbone(t)) => t.clone_ref(py).into_any(),
            Subject::Plan(Plan::Tcp(t)) => t.clone_ref(py).into_any(),
            Subject::Plan(Plan::Deny(d)) | Subject::Verdict(Verdict::Deny(d)) => {
                d.clone_ref(py).into_any()
            }
            Subject::Verdict(Verdict::Allow(a)) => a.clone_ref(py).into_any(),
        }
    }
}

/// The listener's reporter: `report(subject, source, destination, sent, received, seconds, error)`.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<Py<PyAny>>>);

impl Reporter {
    pub fn from_py(obj: Option<&Bound<'_, PyAny>>) -> Result<Self, String> {
        match obj {
            None => Ok(Reporter(None)),
            Some(o) if o.is_none() => Ok(Reporter(None)),
            Some(o) if o.is_callable() => Ok(Reporter(Some(Arc::new(o.clone().unbind())))),
            Some(_) => Err("report: expected a callable or None".into()),
        }
    }

    /// Report one finished (or refused) connection. Runs the callable on the blocking pool and
    /// does not wait for it.
    pub fn report(
        &self,
        subject: Subject,
        source: SocketAddr,
        destination: &str,
        transferred: &Transferred,
        started: Instant,
        error: Option<String>,
    ) {
        let Some(callback) = self.0.clone() else {
            return;
        };
        let args = (
            source.to_string(),
            destination.to_string(),
            transferred.sent(),
            transferred.received(),
            started.elapsed().as_secs_f64(),
            error,
        );
        tokio::task::spawn_blocking(move || {
            Python::attach(|py| {
                let (source, destination, sent, received, seconds, error) = args;
                let call_args = (
                    subject.to_py(py),
                    source,
                    destination,
                    sent,
                    received,
                    seconds,
                    error,
                );
                if let Err(e) = callback.call1(py, call_args) {
                    log::error!("connection reporter raised: {e}");
                }
            })
        });
    }
}
