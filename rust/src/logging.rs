//! The core's log records (its own and those of rustls, h2, tokio) reach Python's `logging`
//! without a runtime worker ever taking the GIL: a record is formatted where it happens, queued
//! (bounded, never waiting) and handed to Python by one thread of its own, in batches.
//!
//! Each call site is rate-limited: a peer that repeats the same mistake fifty thousand times in
//! five seconds gets a burst of lines, then a few per second, each saying how many similar lines
//! were suppressed; the counts are in `log_stats()`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use log::{Level, LevelFilter, Log, Metadata, Record};
use pyo3::prelude::*;
use tokio::sync::mpsc;

use crate::ratelimit::RateLimit;

/// Records waiting for Python; beyond this they are dropped (and counted), never waited for.
const QUEUE_CAPACITY: usize = 4096;
/// Most records handed to Python in one GIL acquisition.
const MAX_BATCH: usize = 256;
/// Per call site: this many lines at once, then this many per second.
const SITE_BURST: u32 = 20;
const SITE_PER_SECOND: u32 = 5;

struct Line {
    level: Level,
    target: String,
    message: String,
}

struct CoreLogger {
    queue: mpsc::Sender<Line>,
    /// One bucket per call site (file, line): a bounded set, the sites are in the binary.
    sites: Mutex<HashMap<(&'static str, u32), RateLimit>>,
    suppressed: AtomicU64,
    dropped: AtomicU64,
}

static LOGGER: OnceLock<CoreLogger> = OnceLock::new();

impl Log for CoreLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let site = (
            record
                .file_static()
                .or(record.module_path_static())
                .unwrap_or(""),
            record.line().unwrap_or(0),
        );
        let admitted = self
            .sites
            .lock()
            .unwrap()
            .entry(site)
            .or_insert_with(|| RateLimit::new(SITE_BURST, SITE_PER_SECOND))
            .admit();
        let Some(suppressed) = admitted else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let message = if suppressed > 0 {
            format!("{} ({suppressed} similar lines suppressed)", record.args())
        } else {
            record.args().to_string()
        };
        let line = Line {
            level: record.level(),
            target: record.target().replace("::", "."),
            message,
        };
        if self.queue.try_send(line).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush(&self) {}
}

fn python_level(level: Level) -> u8 {
    match level {
        Level::Error => 40,
        Level::Warn => 30,
        Level::Info => 20,
        Level::Debug => 10,
        Level::Trace => 5,
    }
}

/// The thread that owns the GIL side: `logging.getLogger(target).log(level, message)`.
fn forward(mut lines: mpsc::Receiver<Line>) {
    let mut loggers: HashMap<String, Py<PyAny>> = HashMap::new();
    while let Some(first) = lines.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match lines.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        Python::attach(|py| {
            for line in batch {
                let logger = match loggers.get(&line.target) {
                    Some(logger) => logger.bind(py).clone(),
                    None => match get_logger(py, &line.target) {
                        Ok(logger) => {
                            loggers.insert(line.target.clone(), logger.clone().unbind());
                            logger
                        }
                        Err(_) => continue,
                    },
                };
                let _ = logger.call_method1(
                    "log",
                    (python_level(line.level), "%s", line.message.as_str()),
                );
            }
        });
    }
}

fn get_logger<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("logging")?.call_method1("getLogger", (name,))
}

/// Install the core's logger (once per process) at the level Python's `_core` logger has now.
pub fn init(py: Python<'_>) {
    let (queue, lines) = mpsc::channel(QUEUE_CAPACITY);
    let logger = CoreLogger {
        queue,
        sites: Mutex::new(HashMap::new()),
        suppressed: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    };
    if LOGGER.set(logger).is_err() {
        return; // already installed (a second import of the module)
    }
    let installed = LOGGER.get().expect("just set");
    if log::set_logger(installed).is_ok() {
        let _ = std::thread::Builder::new()
            .name("ambient-log".into())
            .spawn(move || forward(lines));
    }
    let _ = sync_level(py);
}

/// Make the core log at the level Python's `_core` logger is set to now (call after changing
/// it): records below it are dropped where they happen, without formatting.
#[pyfunction]
pub fn sync_level(py: Python<'_>) -> PyResult<()> {
    let level: u32 = get_logger(py, "_core")?
        .call_method0("getEffectiveLevel")?
        .extract()?;
    log::set_max_level(match level {
        0..=5 => LevelFilter::Trace,
        6..=10 => LevelFilter::Debug,
        11..=20 => LevelFilter::Info,
        21..=30 => LevelFilter::Warn,
        31..=40 => LevelFilter::Error,
        _ => LevelFilter::Off,
    });
    Ok(())
}

/// `(suppressed, dropped)`: lines the per-site rate limit turned away, and lines lost because
/// Python was not keeping up.
#[pyfunction]
pub fn log_stats() -> (u64, u64) {
    LOGGER.get().map_or((0, 0), |l| {
        (
            l.suppressed.load(Ordering::Relaxed),
            l.dropped.load(Ordering::Relaxed),
        )
    })
}
