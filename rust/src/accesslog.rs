//! Access-log lines written by the core, so a finished connection costs no Python.
//!
//! A decision knows, once per snapshot, everything about its connections' log line except what
//! differs per connection (the client's address, what it dialed, the bytes, the duration, the
//! error). It attaches a [`LogTemplate`]: the line's fixed fields rendered once, with holes for
//! the connection's source and destination; when the connection ends the core fills the holes,
//! appends the counts and hands the line to the [`AccessLog`]'s writer thread. The fields and their
//! meaning are Python's (`ambient.ztunnel.connection`, which builds the templates and is the
//! reference the tests hold these lines to).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// Lines waiting for the writer; past this they are dropped (and counted): a log reader that
/// cannot keep up must not stall connections or grow the proxy's memory.
const QUEUE_CAPACITY: usize = 65_536;
/// Most lines joined into one write.
const MAX_BATCH: usize = 512;
/// After a write that emptied the queue the writer waits this long before looking again, so a
/// busy proxy pays one write (and one wake-up) per this many milliseconds, not one per
/// connection: measured, a wake-up per line cost 6 % of a ztunnel's CPU at 2,000 connections/s.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// Where the core writes access-log lines: a file descriptor (duplicated), JSON or
/// `key=value` text, from a thread of its own.
#[pyclass(frozen, module = "ambient._core")]
pub struct AccessLog {
    text: bool,
    tx: Mutex<Option<SyncSender<String>>>,
    done: Mutex<Option<Receiver<()>>>,
    written: Arc<AtomicU64>,
    dropped: AtomicU64,
}

#[pymethods]
impl AccessLog {
    #[new]
    #[pyo3(signature = (fd, *, text=false))]
    fn new(fd: RawFd, text: bool) -> PyResult<Self> {
        // Our own descriptor: the caller's stays theirs to close.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(PyOSError::new_err(format!(
                "AccessLog: descriptor {fd}: {}",
                std::io::Error::last_os_error()
            )));
        }
        let mut file = unsafe { File::from_raw_fd(own) };
        let (tx, rx) = sync_channel::<String>(QUEUE_CAPACITY);
        let (done_tx, done_rx) = sync_channel::<()>(1);
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        std::thread::Builder::new()
            .name("ambient-accesslog".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = first;
                    let mut lines = 1;
                    while lines < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(line) => batch.push_str(&line),
                            Err(_) => break,
                        }
                        lines += 1;
                    }
                    if let Err(e) = file.write_all(batch.as_bytes()) {
                        log::warn!("access log: writing failed: {e}");
                    }
                    count.fetch_add(lines as u64, Ordering::Relaxed);
                    if lines < MAX_BATCH {
                        std::thread::sleep(LINGER);
                    }
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| PyOSError::new_err(format!("AccessLog: thread: {e}")))?;
        Ok(Self {
            text,
            tx: Mutex::new(Some(tx)),
            done: Mutex::new(Some(done_rx)),
            written,
            dropped: AtomicU64::new(0),
        })
    }

    /// Lines written, and lines dropped because the writer fell behind.
    #[getter]
    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
    #[getter]
    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stop taking lines and wait (up to `timeout` seconds) until every queued one is written.
    #[pyo3(signature = (timeout=5.0))]
    fn close(&self, py: Python<'_>, timeout: f64) {
        self.tx.lock().unwrap().take();
        if let Some(done) = self.done.lock().unwrap().take() {
            let wait = std::time::Duration::from_secs_f64(timeout.max(0.0));
            py.detach(move || {
                let _ = done.recv_timeout(wait);
            });
        }
    }
}

impl AccessLog {
    pub fn send(&self, line: String) {
        let sent = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.try_send(line),
            None => return,
        };
        if let Err(TrySendError::Full(_)) = sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A field whose value is the connection's.
const SOURCE: u8 = 0;
const DESTINATION: u8 = 1;

enum Segment {
    /// Rendered once: separators, names and fixed values.
    Fixed(String),
    /// `name` and the connection's source address.
    Source(String),
    /// `name` and what the connection dialed (left out when empty).
    Destination(String),
}

/// One decision's log line, rendered but for the connection's own values.
#[pyclass(frozen, module = "ambient._core")]
pub struct LogTemplate {
    log: Py<AccessLog>,
    segments: Vec<Segment>,
    /// Destination side: `bytes_sent` is what went back to the peer (Istio's meaning).
    flip: bool,
    /// Whether the line has byte counts (an early refusal's has not).
    bytes: bool,
}

#[derive(FromPyObject)]
enum FieldValue {
    Fixed(String),
    Hole(u8),
}

#[pymethods]
impl LogTemplate {
    /// `fields`: `(name, value)` in line order; a value is a string, or `LogTemplate.SOURCE` /
    /// `LogTemplate.DESTINATION` for the connection's own. The core appends `bytes_sent`,
    /// `bytes_recv` (when `bytes`), `duration_ms` and `error` (when there is one).
    #[new]
    #[pyo3(signature = (log, fields, *, flip=false, bytes=true))]
    fn new(
        log: Py<AccessLog>,
        fields: Vec<(String, FieldValue)>,
        flip: bool,
        bytes: bool,
    ) -> PyResult<Self> {
        let text = log.get().text;
        let mut segments = Vec::with_capacity(fields.len());
        let mut fixed = String::new();
        for (i, (name, value)) in fields.into_iter().enumerate() {
            let lead = field_lead(text, i == 0, &name);
            match value {
                FieldValue::Fixed(value) => {
                    fixed.push_str(&lead);
                    push_value(&mut fixed, text, &value);
                }
                FieldValue::Hole(hole) => {
                    segments.push(Segment::Fixed(std::mem::take(&mut fixed)));
                    segments.push(match hole {
                        SOURCE => Segment::Source(lead),
                        DESTINATION => Segment::Destination(lead),
                        _ => {
                            return Err(PyValueError::new_err(format!(
                                "LogTemplate.fields[{i}]: expected a string, SOURCE or DESTINATION"
                            )))
                        }
                    });
                }
            }
        }
        segments.push(Segment::Fixed(fixed));
        Ok(Self {
            log,
            segments,
            flip,
            bytes,
        })
    }

    #[classattr]
    const SOURCE: u8 = SOURCE;
    #[classattr]
    const DESTINATION: u8 = DESTINATION;

    /// The line the core would write (for tests and `explain`).
    #[pyo3(signature = (source, destination, sent, received, seconds, error=None))]
    fn render(
        &self,
        source: &str,
        destination: &str,
        sent: u64,
        received: u64,
        seconds: f64,
        error: Option<&str>,
    ) -> PyResult<String> {
        let source: SocketAddr = source.parse().map_err(|_| {
            PyValueError::new_err(format!("source: expected ip:port, got {source:?}"))
        })?;
        Ok(self.line(source, destination, sent, received, seconds, error))
    }
}

impl LogTemplate {
    fn line(
        &self,
        source: SocketAddr,
        destination: &str,
        sent: u64,
        received: u64,
        seconds: f64,
        error: Option<&str>,
    ) -> String {
        let text = self.log.get().text;
        let mut line = String::with_capacity(512);
        if !text {
            line.push('{');
        }
        for segment in &self.segments {
            match segment {
                Segment::Fixed(s) => line.push_str(s),
                Segment::Source(lead) => {
                    line.push_str(lead);
                    push_value(&mut line, text, &source.to_string());
                }
                Segment::Destination(lead) if !destination.is_empty() => {
                    line.push_str(lead);
                    push_value(&mut line, text, destination);
                }
                Segment::Destination(_) => {}
            }
        }
        let sep = if text { " " } else { "," };
        let (sent, received) = if self.flip {
            (received, sent)
        } else {
            (sent, received)
        };
        if self.bytes {
            push_number(&mut line, text, sep, "bytes_sent", &sent.to_string());
            push_number(&mut line, text, sep, "bytes_recv", &received.to_string());
        }
        push_number(&mut line, text, sep, "duration_ms", &milliseconds(seconds));
        if let Some(error) = error {
            line.push_str(&field_lead(text, false, "error"));
            push_value(&mut line, text, error);
        }
        if !text {
            line.push('}');
        }
        line.push('\n');
        line
    }

    /// Format and queue the line of a finished connection.
    pub fn write(
        &self,
        source: SocketAddr,
        destination: &str,
        sent: u64,
        received: u64,
        seconds: f64,
        error: Option<&str>,
    ) {
        let line = self.line(source, destination, sent, received, seconds, error);
        self.log.get().send(line);
    }
}

/// The separator and name before a value: `,"name":` (JSON) or ` name=` (text).
fn field_lead(text: bool, first: bool, name: &str) -> String {
    match (text, first) {
        (true, true) => format!("{name}="),
        (true, false) => format!(" {name}="),
        (false, true) => format!("{}:", json(name)),
        (false, false) => format!(",{}:", json(name)),
    }
}

fn push_value(line: &mut String, text: bool, value: &str) {
    if text {
        line.push_str(value);
    } else {
        line.push_str(&json(value));
    }
}

fn push_number(line: &mut String, text: bool, sep: &str, name: &str, value: &str) {
    if text {
        let _ = write!(line, "{sep}{name}={value}");
    } else {
        let _ = write!(line, "{sep}\"{name}\":{value}");
    }
}

fn json(s: &str) -> String {
    serde_json::to_string(s).expect("a string always serialises")
}

/// Milliseconds to three decimals, written as Python writes `round(ms, 3)` (a float: `12.0`).
fn milliseconds(seconds: f64) -> String {
    let ms = (seconds * 1_000_000.0).round() / 1_000.0;
    if ms.fract() == 0.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms}")
    }
}
