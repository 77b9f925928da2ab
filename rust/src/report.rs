//! Connection reports: when a connection or stream ends, the listener's reporter (a Python
//! callable, optional) is told what happened — once per connection, never per byte — for access
//! logs and telemetry. For a connection that got a plan or verdict, the plan or verdict object
//! itself is passed back, so whatever the decision put in its `tag` travels with it. A connection
//! refused before any decision (a failed TLS or HTTP/2 handshake, a malformed request, a full
//! decision queue, a decision that raised) is reported with no subject; those early reports are
//! rate-limited per listener, since a hostile peer decides how many of them there are.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Instant;
use tokio::sync::mpsc;

use pyo3::prelude::*;

use crate::accesslog::LogTemplate;
use crate::copy::Transferred;
use crate::decision::{Plan, Verdict};
use crate::ratelimit::RateLimit;

/// What the connection was decided to be.
#[derive(Clone)]
pub enum Subject {
    Plan(Plan),
    Verdict(Verdict),
}

impl Subject {
    /// The access-log line the decision attached, if any.
    fn log(&self) -> Option<&LogTemplate> {
        let log = match self {
            Subject::Plan(Plan::Hbone(t)) => &t.get().log,
            Subject::Plan(Plan::Tcp(t)) => &t.get().log,
            Subject::Plan(Plan::Deny(d)) | Subject::Verdict(Verdict::Deny(d)) => &d.get().log,
            Subject::Verdict(Verdict::Allow(a)) => &a.get().log,
        };
        log.as_ref().map(|l| l.get())
    }

    pub fn to_py(&self, py: Python<'_>) -> Py<PyAny> {
        match self {
            Subject::Plan(plan) => plan.to_py(py),
            Subject::Verdict(verdict) => verdict.to_py(py),
        }
    }
}

/// One report waiting for the reporter thread.
struct Report {
    callback: Arc<Py<PyAny>>,
    subject: Option<Subject>,
    source: SocketAddr,
    destination: String,
    sent: u64,
    received: u64,
    seconds: f64,
    error: Option<String>,
}

enum Item {
    Report(Report),
    /// Any other call into Python that must not run on a runtime worker.
    Call(Box<dyn FnOnce(Python<'_>) + Send>),
}

/// Most reports handed to Python in one GIL acquisition.
const MAX_BATCH: usize = 512;
/// Reports waiting for Python; past this they are dropped (and counted) rather than held: a
/// reporter that cannot keep up must not grow the proxy's memory without bound. (The queue's
/// memory is allocated as it fills, not up front.)
const QUEUE_CAPACITY: usize = 65_536;
/// Early reports per listener: this many at once, then this many per second.
const EARLY_BURST: u32 = 100;
const EARLY_PER_SECOND: u32 = 50;

/// The core's single reporter thread: reports are queued without waiting and handed to Python
/// in batches, one GIL acquisition per batch, so a busy proxy pays one thread hand-off per batch
/// rather than one per connection.
pub struct ReportQueue {
    tx: Mutex<Option<mpsc::Sender<Item>>>,
    /// Signalled by the reporter thread when it has delivered everything and ended.
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// Reports lost because the queue was full.
    pub dropped: AtomicU64,
    /// Early reports the per-listener rate limit turned away.
    pub suppressed: AtomicU64,
}

impl ReportQueue {
    pub fn start() -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Item>(QUEUE_CAPACITY);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("ambient-report".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    Python::attach(|py| {
                        for item in batch {
                            deliver(py, item);
                        }
                    });
                }
                let _ = done_tx.send(());
            })
            .expect("spawning the report thread");
        Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            done: Mutex::new(Some(done_rx)),
            dropped: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        })
    }

    fn send(&self, item: Item) {
        let sent = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.try_send(item),
            None => return,
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Run `f` with the GIL on the reporter thread (a callback Python asked for).
    pub fn call(&self, f: impl FnOnce(Python<'_>) + Send + 'static) {
        self.send(Item::Call(Box::new(f)));
    }

    /// Stop taking reports; the thread ends once the queue is drained.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }

    /// Stop taking reports and wait (up to `timeout`) until every queued one was delivered, so a
    /// process that exits next loses none of its last access-log lines. Call without the GIL:
    /// the reporter thread needs it.
    pub fn close_and_wait(&self, timeout: std::time::Duration) {
        self.close();
        if let Some(done) = self.done.lock().unwrap().take() {
            let _ = done.recv_timeout(timeout);
        }
    }
}

fn deliver(py: Python<'_>, item: Item) {
    match item {
        Item::Report(r) => {
            let args = (
                r.subject.map(|s| s.to_py(py)),
                r.source.to_string(),
                r.destination,
                r.sent,
                r.received,
                r.seconds,
                r.error,
            );
            if let Err(e) = r.callback.call1(py, args) {
                log::error!("connection reporter raised: {e}");
            }
        }
        Item::Call(f) => f(py),
    }
}

/// A listener's reporter: `report(subject, source, destination, sent, received, seconds, error)`
/// (a Python callable, called on the reporter thread), or a [`LogTemplate`] for the lines of
/// connections refused before any decision, written by the core. Either way a decision's own
/// `LogTemplate`, when it attached one, is written by the core.
#[derive(Clone, Default)]
pub struct Reporter(Option<Arc<ReporterInner>>);

enum Target {
    Python(Arc<Py<PyAny>>),
    Log(Py<LogTemplate>),
}

pub struct ReporterInner {
    target: Target,
    queue: Arc<ReportQueue>,
    /// Early reports of this listener.
    early: RateLimit,
}

impl Reporter {
    pub fn from_py(
        obj: Option<&Bound<'_, PyAny>>,
        queue: &Arc<ReportQueue>,
    ) -> Result<Self, String> {
        let target = match obj {
            None => return Ok(Reporter(None)),
            Some(o) if o.is_none() => return Ok(Reporter(None)),
            Some(o) => match o.cast::<LogTemplate>() {
                Ok(t) => Target::Log(t.clone().unbind()),
                Err(_) if o.is_callable() => Target::Python(Arc::new(o.clone().unbind())),
                Err(_) => return Err("report: expected a callable, a LogTemplate or None".into()),
            },
        };
        Ok(Reporter(Some(Arc::new(ReporterInner {
            target,
            queue: queue.clone(),
            early: RateLimit::new(EARLY_BURST, EARLY_PER_SECOND),
        }))))
    }

    /// Report one finished (or refused) connection that had a decision, without waiting.
    pub fn report(
        &self,
        subject: Subject,
        source: SocketAddr,
        destination: &str,
        transferred: &Transferred,
        started: Instant,
        error: Option<String>,
    ) {
        let seconds = started.elapsed().as_secs_f64();
        if let Some(log) = subject.log() {
            log.write(
                source,
                destination,
                transferred.sent(),
                transferred.received(),
                seconds,
                error.as_deref(),
            );
        }
        let Some(r) = &self.0 else {
            return;
        };
        let Target::Python(callback) = &r.target else {
            return;
        };
        r.queue.send(Item::Report(Report {
            callback: callback.clone(),
            subject: Some(subject),
            source,
            destination: destination.to_string(),
            sent: transferred.sent(),
            received: transferred.received(),
            seconds,
            error,
        }));
    }

    /// Report a connection refused before any decision (no subject), rate-limited.
    pub fn early(&self, source: SocketAddr, destination: &str, started: Instant, error: String) {
        let Some(r) = &self.0 else {
            return;
        };
        let Some(suppressed) = r.early.admit() else {
            r.queue.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let error = if suppressed > 0 {
            format!("{error} ({suppressed} similar reports suppressed)")
        } else {
            error
        };
        let seconds = started.elapsed().as_secs_f64();
        match &r.target {
            Target::Log(log) => log
                .get()
                .write(source, destination, 0, 0, seconds, Some(&error)),
            Target::Python(callback) => r.queue.send(Item::Report(Report {
                callback: callback.clone(),
                subject: None,
                source,
                destination: destination.to_string(),
                sent: 0,
                received: 0,
                seconds,
                error: Some(error),
            })),
        }
    }
}
