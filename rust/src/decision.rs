//! Where the core asks Python: once per new connection (outbound) or per CONNECT stream (inbound),
//! never per byte.
//!
//! A decision is either fixed when the listener is made (no Python at all per connection) or a
//! Python callable. Callables run on tokio's blocking pool, so a slow decision holds one blocking
//! thread and the GIL, but never a runtime worker: other connections' bytes keep moving.

use std::net::SocketAddr;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::metrics::Counters;
use crate::plan::{Allow, Deny, HboneTarget, TcpTarget};

// Plans hold `Arc<Py<..>>` so a fixed plan is shared by every connection with a reference-count
// bump, without taking the GIL; the classes are frozen, so the core reads them without it too.

/// What to do with an outbound connection.
#[derive(Clone)]
pub enum Plan {
    Hbone(Arc<Py<HboneTarget>>),
    Tcp(Arc<Py<TcpTarget>>),
    Deny(Arc<Py<Deny>>),
}

/// What to do with an inbound HBONE stream.
#[derive(Clone)]
pub enum Verdict {
    Allow(Arc<Py<Allow>>),
    Deny(Arc<Py<Deny>>),
}

impl Plan {
    /// The metric counters the decision attached, if any.
    pub fn counters(&self) -> Option<&Counters> {
        match self {
            Plan::Hbone(t) => t.get().counters.as_ref().map(|c| c.get()),
            Plan::Tcp(t) => t.get().counters.as_ref().map(|c| c.get()),
            Plan::Deny(d) => d.get().counters.as_ref().map(|c| c.get()),
        }
    }

    pub fn from_py(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        if let Ok(t) = obj.cast::<HboneTarget>() {
            Ok(Plan::Hbone(Arc::new(t.clone().unbind())))
        } else if let Ok(t) = obj.cast::<TcpTarget>() {
            Ok(Plan::Tcp(Arc::new(t.clone().unbind())))
        } else if let Ok(d) = obj.cast::<Deny>() {
            Ok(Plan::Deny(Arc::new(d.clone().unbind())))
        } else {
            Err(format!(
                "expected HboneTarget, TcpTarget or Deny, got {}",
                type_name(obj)
            ))
        }
    }
}

impl Verdict {
    /// The metric counters the decision attached, if any.
    pub fn counters(&self) -> Option<&Counters> {
        match self {
            Verdict::Allow(a) => a.get().counters.as_ref().map(|c| c.get()),
            Verdict::Deny(d) => d.get().counters.as_ref().map(|c| c.get()),
        }
    }

    pub fn from_py(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        if let Ok(a) = obj.cast::<Allow>() {
            Ok(Verdict::Allow(Arc::new(a.clone().unbind())))
        } else if let Ok(d) = obj.cast::<Deny>() {
            Ok(Verdict::Deny(Arc::new(d.clone().unbind())))
        } else {
            Err(format!("expected Allow or Deny, got {}", type_name(obj)))
        }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A decision given when the listener was made, or a Python callable asked each time.
pub enum Decider<T> {
    Fixed(T),
    Callback(Arc<Py<PyAny>>),
}

impl<T> Decider<T> {
    fn callback(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        if obj.is_callable() {
            Ok(Decider::Callback(Arc::new(obj.clone().unbind())))
        } else {
            Err(format!("expected a callable, got {}", type_name(obj)))
        }
    }
}

pub type OutboundDecider = Decider<Plan>;
pub type InboundDecider = Decider<Verdict>;

impl OutboundDecider {
    pub fn from_py(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        match Plan::from_py(obj) {
            Ok(plan) => Ok(Decider::Fixed(plan)),
            Err(_) => Self::callback(obj).map_err(|_| {
                format!(
                    "route: expected HboneTarget, TcpTarget, Deny or a callable, got {}",
                    type_name(obj)
                )
            }),
        }
    }

    /// Ask for the plan of a connection from `source` to `destination` (`ip:port`, or
    /// `name:port` when a SOCKS5 client asked by name).
    pub async fn decide(&self, source: SocketAddr, destination: String) -> Result<Plan, String> {
        match self {
            Decider::Fixed(plan) => Ok(plan.clone()),
            Decider::Callback(cb) => {
                let cb = cb.clone();
                call_blocking(move |py| {
                    let args = (source.to_string(), destination);
                    let result = cb.bind(py).call1(args).map_err(|e| describe(py, e))?;
                    Plan::from_py(&result).map_err(|e| format!("route callback returned: {e}"))
                })
                .await
            }
        }
    }
}

/// What an inbound decision is told about a CONNECT stream.
pub struct InboundRequest {
    pub peer_identity: Option<String>,
    pub authority: String,
    pub peer_address: SocketAddr,
    pub headers: Vec<(String, String)>,
}

impl InboundDecider {
    pub fn from_py(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        match Verdict::from_py(obj) {
            Ok(v) => Ok(Decider::Fixed(v)),
            Err(_) => Self::callback(obj).map_err(|_| {
                format!(
                    "decide: expected Allow, Deny or a callable, got {}",
                    type_name(obj)
                )
            }),
        }
    }

    pub async fn decide(&self, request: InboundRequest) -> Result<Verdict, String> {
        match self {
            Decider::Fixed(v) => Ok(v.clone()),
            Decider::Callback(cb) => {
                let cb = cb.clone();
                call_blocking(move |py| {
                    let headers = PyTuple::new(py, request.headers).map_err(|e| describe(py, e))?;
                    let args = (
                        request.peer_identity,
                        request.authority,
                        request.peer_address.to_string(),
                        headers,
                    );
                    let result = cb.bind(py).call1(args).map_err(|e| describe(py, e))?;
                    Verdict::from_py(&result).map_err(|e| format!("decide callback returned: {e}"))
                })
                .await
            }
        }
    }
}

fn describe(py: Python<'_>, err: PyErr) -> String {
    let traceback = err
        .traceback(py)
        .and_then(|tb| tb.format().ok())
        .unwrap_or_default();
    format!("decision callback raised {err}\n{traceback}")
}

/// Run `f` with the GIL on the blocking pool, off the runtime's workers.
pub async fn call_blocking<T, F>(f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: FnOnce(Python<'_>) -> Result<T, String> + Send + 'static,
{
    tokio::task::spawn_blocking(move || Python::attach(f))
        .await
        .map_err(|e| format!("decision task failed: {e}"))?
}
