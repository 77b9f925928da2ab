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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tokio::sync::mpsc;

use crate::metrics::Counters;
use crate::plan::{Allow, Deny, HboneTarget, TcpTarget};
use crate::table::{forwarded_host, Answer, Generation, InboundKey, Table};

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
    pub fn to_py(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Plan::Hbone(t) => t.clone_ref(py).into_any(),
            Plan::Tcp(t) => t.clone_ref(py).into_any(),
            Plan::Deny(d) => d.clone_ref(py).into_any(),
        }
    }

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
    pub fn to_py(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Verdict::Allow(a) => a.clone_ref(py).into_any(),
            Verdict::Deny(d) => d.clone_ref(py).into_any(),
        }
    }

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

pub(crate) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A decision given when the listener was made, a Python callable asked each time, or a Python
/// callable whose answers are remembered per key until the snapshot changes (see `table`).
pub enum Decider<K, T> {
    Fixed(T),
    Callback(Arc<Py<PyAny>>),
    Remembered(Arc<Py<PyAny>>, Table<K, T>),
}

impl<K: Eq + std::hash::Hash, T: Clone> Decider<K, T> {
    fn callback(obj: &Bound<'_, PyAny>, remember: bool) -> Result<Self, String> {
        if !obj.is_callable() {
            return Err(format!("expected a callable, got {}", type_name(obj)));
        }
        let callback = Arc::new(obj.clone().unbind());
        Ok(if remember {
            Decider::Remembered(callback, Table::new())
        } else {
            Decider::Callback(callback)
        })
    }

    fn remembers(&self) -> bool {
        matches!(self, Decider::Remembered(..))
    }

    /// The answer for `key`: fixed, remembered, or asked of Python with `ask`.
    async fn answer<F>(
        &self,
        pool: &DecisionPool,
        key: Option<K>,
        ask: F,
    ) -> Result<T, DecisionError>
    where
        T: Send + 'static,
        F: FnOnce(&Py<PyAny>, Python<'_>) -> Result<T, String> + Send + 'static,
    {
        let (cb, table) = match self {
            Decider::Fixed(answer) => return Ok(answer.clone()),
            Decider::Callback(cb) => (cb, None),
            Decider::Remembered(cb, table) => (cb, Some(table)),
        };
        let (Some(table), Some(key)) = (table, key) else {
            let cb = cb.clone();
            return pool.call(move |py| ask(&cb, py)).await;
        };
        let asked = pool.generation.current();
        if let Some(answer) = table.get(asked, &key) {
            pool.remembered.fetch_add(1, Ordering::Relaxed);
            return Ok(answer);
        }
        let cb = cb.clone();
        let answer = pool.call(move |py| ask(&cb, py)).await?;
        table.put(asked, pool.generation.current(), key, answer.clone());
        Ok(answer)
    }
}

/// Outbound answers are remembered per (source IP, destination).
pub type OutboundKey = (std::net::IpAddr, String);
pub type OutboundDecider = Decider<OutboundKey, Answer>;

/// What an outbound answer may depend on: not the source port.
pub fn outbound_key(source: SocketAddr, destination: &str) -> OutboundKey {
    (source.ip(), destination.to_string())
}
pub type InboundDecider = Decider<InboundKey, Verdict>;

impl OutboundDecider {
    /// A fixed plan, or a callable (`remember`: its answer depends only on the source IP, the
    /// destination and the snapshot).
    pub fn from_py(obj: &Bound<'_, PyAny>, remember: bool) -> Result<Self, String> {
        match Answer::from_py(obj) {
            Ok(answer) => Ok(Decider::Fixed(answer)),
            Err(_) => Self::callback(obj, remember).map_err(|_| {
                format!(
                    "route: expected HboneTarget, TcpTarget, Deny, Routes or a callable, got {}",
                    type_name(obj)
                )
            }),
        }
    }

    /// The plan of a connection from `source` to `destination` (`ip:port`, or `name:port` when
    /// a SOCKS5 client asked by name).
    pub async fn decide(
        &self,
        pool: &DecisionPool,
        source: SocketAddr,
        destination: String,
    ) -> Result<Plan, DecisionError> {
        let key = self.remembers().then(|| outbound_key(source, &destination));
        let answer = self
            .answer(pool, key, move |cb, py| {
                let result =
                    ask_route(cb.bind(py), source, &destination).map_err(|e| describe(py, e))?;
                Answer::from_py(&result).map_err(|e| format!("route callback returned: {e}"))
            })
            .await?;
        Ok(answer.pick())
    }
}

/// What an inbound decision is told about a CONNECT stream.
pub struct InboundRequest {
    pub peer_identity: Option<Arc<str>>,
    pub authority: String,
    pub peer_address: SocketAddr,
    pub headers: http::HeaderMap,
}

impl InboundRequest {
    pub fn key(&self) -> InboundKey {
        InboundKey {
            peer_identity: self.peer_identity.clone(),
            peer_ip: self.peer_address.ip(),
            authority: self.authority.clone(),
            forwarded_host: self
                .headers
                .get("forwarded")
                .and_then(|v| forwarded_host(&String::from_utf8_lossy(v.as_bytes()))),
        }
    }

    /// Call `decide(peer_identity, authority, peer_address, headers)`.
    fn ask<'py>(&self, decide: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let headers: Vec<(String, String)> = self
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        decide.call1((
            self.peer_identity.as_deref(),
            self.authority.as_str(),
            self.peer_address.to_string(),
            PyTuple::new(decide.py(), headers)?,
        ))
    }
}

/// Call `route(source, destination)`.
fn ask_route<'py>(
    route: &Bound<'py, PyAny>,
    source: SocketAddr,
    destination: &str,
) -> PyResult<Bound<'py, PyAny>> {
    route.call1((source.to_string(), destination))
}

impl InboundDecider {
    /// A fixed verdict, or a callable (`remember`: its answer depends only on the peer's
    /// identity and IP, the authority and the `Forwarded` host, and the snapshot).
    pub fn from_py(obj: &Bound<'_, PyAny>, remember: bool) -> Result<Self, String> {
        match Verdict::from_py(obj) {
            Ok(v) => Ok(Decider::Fixed(v)),
            Err(_) => Self::callback(obj, remember).map_err(|_| {
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
        let key = self.remembers().then(|| request.key());
        self.answer(pool, key, move |cb, py| {
            let result = request.ask(cb.bind(py)).map_err(|e| describe(py, e))?;
            Verdict::from_py(&result).map_err(|e| format!("decide callback returned: {e}"))
        })
        .await
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
    /// The snapshot remembered answers belong to.
    pub generation: Generation,
    /// Decisions asked of Python, and answered from a table instead.
    pub asked: AtomicU64,
    pub remembered: AtomicU64,
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
            generation: Generation::default(),
            asked: AtomicU64::new(0),
            remembered: AtomicU64::new(0),
        }))
    }

    /// Run `f` with the GIL on a decision thread; refused at once when the queue is full.
    /// If the caller stops waiting (the connection went away), a queued `f` is skipped.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DecisionError>
    where
        T: Send + 'static,
        F: FnOnce(Python<'_>) -> Result<T, String> + Send + 'static,
    {
        self.asked.fetch_add(1, Ordering::Relaxed);
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
    // The thread stays attached to Python for its whole life, detached (the GIL released)
    // while it waits: attaching afresh per job would make and free a Python thread state each
    // time.
    Python::attach(|py| loop {
        // One job at a time: taking several would queue them behind a slow one.
        let job = py.detach(|| queue.lock().unwrap().blocking_recv());
        match job {
            Some(job) => job(py),
            None => return,
        }
    });
}

/// The remembered path of a listener, driven synchronously from Python: the same keys, tables
/// and picks as a listener with `remember=True`, with Python asked inline instead of on a
/// decision thread. The differential test holds what it serves to Python's own answers.
#[pyclass(frozen, module = "ambient._core")]
pub struct RememberedDecisions {
    route: Py<PyAny>,
    decide: Py<PyAny>,
    outbound: Table<OutboundKey, Answer>,
    inbound: Table<InboundKey, Verdict>,
    generation: Generation,
    asked: AtomicU64,
}

#[pymethods]
impl RememberedDecisions {
    /// `route(source, destination)` and `decide(peer_identity, authority, peer_address,
    /// headers)`, as a listener would call them.
    #[new]
    fn new(route: Py<PyAny>, decide: Py<PyAny>) -> Self {
        Self {
            route,
            decide,
            outbound: Table::new(),
            inbound: Table::new(),
            generation: Generation::default(),
            asked: AtomicU64::new(0),
        }
    }

    /// The plan the core would carry a connection from `source` to `destination` with.
    fn outbound(&self, py: Python<'_>, source: &str, destination: &str) -> PyResult<Py<PyAny>> {
        let source: SocketAddr = source.parse().map_err(|_| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "source: expected ip:port, got {source:?}"
            ))
        })?;
        let key = outbound_key(source, destination);
        let now = self.generation.current();
        let answer = match self.outbound.get(now, &key) {
            Some(answer) => answer,
            None => {
                self.asked.fetch_add(1, Ordering::Relaxed);
                let result = ask_route(self.route.bind(py), source, destination)?;
                let answer =
                    Answer::from_py(&result).map_err(pyo3::exceptions::PyTypeError::new_err)?;
                self.outbound
                    .put(now, self.generation.current(), key, answer.clone());
                answer
            }
        };
        Ok(answer.pick().to_py(py))
    }

    /// The verdict the core would give a CONNECT stream.
    fn inbound(
        &self,
        py: Python<'_>,
        peer_identity: Option<String>,
        authority: String,
        peer_address: &str,
        headers: Vec<(String, String)>,
    ) -> PyResult<Py<PyAny>> {
        let bad = |what: String| pyo3::exceptions::PyValueError::new_err(what);
        let mut map = http::HeaderMap::new();
        for (name, value) in &headers {
            let name = http::HeaderName::try_from(name.as_str()).map_err(|e| bad(e.to_string()))?;
            let value =
                http::HeaderValue::try_from(value.as_str()).map_err(|e| bad(e.to_string()))?;
            map.append(name, value);
        }
        let request = InboundRequest {
            peer_identity: peer_identity.map(Arc::from),
            authority,
            peer_address: peer_address.parse().map_err(|_| {
                bad(format!(
                    "peer_address: expected ip:port, got {peer_address:?}"
                ))
            })?,
            headers: map,
        };
        let key = request.key();
        let now = self.generation.current();
        let verdict = match self.inbound.get(now, &key) {
            Some(verdict) => verdict,
            None => {
                self.asked.fetch_add(1, Ordering::Relaxed);
                let result = request.ask(self.decide.bind(py))?;
                let verdict =
                    Verdict::from_py(&result).map_err(pyo3::exceptions::PyTypeError::new_err)?;
                self.inbound
                    .put(now, self.generation.current(), key, verdict.clone());
                verdict
            }
        };
        Ok(verdict.to_py(py))
    }

    fn snapshot_changed(&self) {
        self.generation.advance();
    }

    /// How many answers were asked of Python (the rest came from the tables).
    #[getter]
    fn asked(&self) -> u64 {
        self.asked.load(Ordering::Relaxed)
    }
}
