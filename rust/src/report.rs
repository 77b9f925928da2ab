//! Connection reports: when a connection or stream that got a plan or verdict ends, the listener's
//! reporter (a Python callable, optional) is told what happened — once per connection, never per
//! byte — for access logs and telemetry. The plan or verdict object itself is passed back, so
//! whatever the decision put in its `tag` travels with it.

use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use pyo3::prelude::*;

use crate::copy::Transferred;
use crate::decision::{Plan, Verdict};

/// What the connection was decided to be.
#[derive(Clone)]
pub enum Subject {
    Plan(Plan),
    Verdict(Verdict),
}

impl Subject {
    pub fn to_py(&self, py: Python<'_>) -> Py<PyAny> {
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

/// One report waiting for the reporter thread.
struct Item {
    callback: Arc<Py<PyAny>>,
    subject: Subject,
    source: String,
    destination: String,
    sent: u64,
    received: u64,
    seconds: f64,
    error: Option<String>,
}

/// Most reports handed to Python in one GIL acquisition.
const MAX_BATCH: usize = 512;

/// The core's single reporter thread: reports are queued without waiting and handed to Python
/// in batches, one GIL acquisition per batch, so a busy proxy pays one thread hand-off per batch
/// rather than one per connection.
pub struct ReportQueue {
    tx: Mutex<Option<mpsc::Sender<Item>>>,
}

impl ReportQueue {
    pub fn start() -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Item>();
        std::thread::Builder::new()
            .name("ambient-report".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    Python::attach(|py| {
                        for item in batch {
                            let args = (
                                item.subject.to_py(py),
                                item.source,
                                item.destination,
                                item.sent,
                                item.received,
                                item.seconds,
                                item.error,
                            );
                            if let Err(e) = item.callback.call1(py, args) {
                                log::error!("connection reporter raised: {e}");
                            }
                        }
                    });
                }
            })
            .expect("spawning the report thread");
        Arc::new(Self {
            tx: Mutex::new(Some(tx)),
        })
    }

    fn send(&self, item: Item) {
        if let Some(tx) = self.tx.lock().unwrap().as_ref() {
            let _ = tx.send(item);
        }
    }

    /// Stop taking reports; the thread ends once the queue is drained.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
    }
}

/// A listener's reporter: `report(subject, source, destination, sent, received, seconds, error)`.
#[derive(Clone, Default)]
pub struct Reporter(Option<(Arc<Py<PyAny>>, Arc<ReportQueue>)>);

impl Reporter {
    pub fn from_py(
        obj: Option<&Bound<'_, PyAny>>,
        queue: &Arc<ReportQueue>,
    ) -> Result<Self, String> {
        match obj {
            None => Ok(Reporter(None)),
            Some(o) if o.is_none() => Ok(Reporter(None)),
            Some(o) if o.is_callable() => Ok(Reporter(Some((
                Arc::new(o.clone().unbind()),
                queue.clone(),
            )))),
            Some(_) => Err("report: expected a callable or None".into()),
        }
    }

    /// Report one finished (or refused) connection, without waiting for Python.
    pub fn report(
        &self,
        subject: Subject,
        source: SocketAddr,
        destination: &str,
        transferred: &Transferred,
        started: Instant,
        error: Option<String>,
    ) {
        let Some((callback, queue)) = &self.0 else {
            return;
        };
        queue.send(Item {
            callback: callback.clone(),
            subject,
            source: source.to_string(),
            destination: destination.to_string(),
            sent: transferred.sent(),
            received: transferred.received(),
            seconds: started.elapsed().as_secs_f64(),
            error,
        });
    }
}
