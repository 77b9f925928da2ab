//! Where the core asks Python: once per new connection (outbound) or per CONNECT stream (inbound),
//! never per byte.
//!
//! A decision is either fixed when the listener is made (no Python at all per connection) or a
//! Python callable. Callables run on the core's decision threads ([`DecisionPool`]): a few
//! threads that take queued decisions one at a time (a slow decision holds only its own thread;
//! the others keep deciding), never a runtime worker, so other connections' bytes keep moving
//! while Python decides. The queue is bounded:
//! past it a connection is refused at once, saying so, instead of every burst of connections
//! becoming a burst of threads.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tokio::sync::mpsc;

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
    pub async fn decide(
        &self,
        pool: &DecisionPool,
        source: SocketAddr,
        destination: String,
    ) -> Result<Plan, DecisionError> {
        match self {
            Decider::Fixed(plan) => Ok(plan.clone()),
            Decider::Callback(cb) => {
                let cb = cb.clone();
                pool.call(move |py| {
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

    pub async fn decide(
        &self,
        pool: &DecisionPool,
        request: InboundRequest,
    ) -> Result<Verdict, DecisionError> {
        match self {
            Decider::Fixed(v) => Ok(v.clone()),
            Decider::Callback(cb) => {
                let cb = cb.clone();
                pool.call(move |py| {
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

/// Why a decision gave no answer.
#[derive(Debug)]
pub enum DecisionError {
    /// The callable raised, or returned something that is not a plan (the text says which).
    Failed(String),
    /// Too many decisions are waiting: the connection is refused rather than queued unboundedly.
    Overloaded(usize),
    /// The core is shutting down.
    Stopped,
}

impl fmt::Display for DecisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecisionError::Failed(why) => f.write_str(why),
            DecisionError::Overloaded(limit) => write!(
                f,
                "refused: {limit} decisions are already waiting for Python (the decision queue is full)"
            ),
            DecisionError::Stopped => f.write_str("refused: the core is shutting down"),
        }
    }
}

type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// The threads that run Python decisions, with a bounded queue in front of them.
pub struct DecisionPool {
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    capacity: usize,
}

impl DecisionPool {
    /// `threads` threads, at most `capacity` decisions waiting.
    pub fn start(threads: usize, capacity: usize) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<Job>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("ambient-decide-{i}"))
                .spawn(move || run_decisions(&rx))?;
        }
        Ok(Arc::new(Self {
            queue: Mutex::new(Some(tx)),
            capacity,
        }))
    }

    /// Run `f` with the GIL on a decision thread; refused at once when the queue is full.
    /// If the caller stops waiting (the connection went away), a queued `f` is skipped.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DecisionError>
    where
        T: Send + 'static,
        F: FnOnce(Python<'_>) -> Result<T, String> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |py| {
            if !tx.is_closed() {
                let _ = tx.send(f(py));
            }
        });
        let sent = match self.queue.lock().unwrap().as_ref() {
            Some(queue) => queue.try_send(job),
            None => return Err(DecisionError::Stopped),
        };
        match sent {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(DecisionError::Overloaded(self.capacity))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(DecisionError::Stopped),
        }
        match rx.await {
            Ok(result) => result.map_err(DecisionError::Failed),
            Err(_) => Err(DecisionError::Stopped),
        }
    }

    /// Stop taking decisions; the threads end once the queue is empty.
    pub fn close(&self) {
        self.queue.lock().unwrap().take();
    }
}

fn run_decisions(queue: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        // One job at a time: taking several would queue them behind a slow one.
        let job = {
            let mut queue = queue.lock().unwrap();
            match queue.blocking_recv() {
                Some(job) => job,
                None => return,
            }
        };
        Python::attach(job);
    }
}
