//! `ambient._core`: the compiled data plane of ambient.
//!
//! Mechanism only — sockets, mutual TLS, HBONE, pooling and copying. Every decision (where a
//! connection goes, whether a stream is allowed) is asked of Python through `decision`, once per
//! connection or stream, never per byte.

mod copy;
mod core;
mod decision;
mod hbone;
mod identity;
mod metrics;
mod netns;
mod outbound;
mod plan;
mod pool;
mod probe;
mod registry;
mod report;
mod socket;
mod socks5;
mod stats;
mod tls;

use pyo3::prelude::*;

// The copy loops allocate 256 KiB buffers at a high rate; glibc serves those with mmap/munmap and
// page faults on every one, mimalloc reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// "release" or "debug": measured figures are only meaningful for a release build.
#[pyfunction]
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// pyo3-log caches Python's logger levels; this handle drops that cache.
static LOG_RESET: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

/// Make the core see new Python logging levels (after `logging.getLogger(...).setLevel`).
#[pyfunction]
fn reset_log_cache() {
    if let Some(handle) = LOG_RESET.get() {
        handle.reset();
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging` (logger names follow the module paths).
    if let Ok(handle) = pyo3_log::try_init() {
        let _ = LOG_RESET.set(handle);
    }
    m.add_function(wrap_pyfunction!(reset_log_cache, m)?)?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<core::Core>()?;
    m.add_class::<core::Listener>()?;
    m.add_class::<metrics::Counters>()?;
    m.add_class::<netns::Netns>()?;
    m.add_class::<plan::HboneTarget>()?;
    m.add_class::<plan::TcpTarget>()?;
    m.add_class::<plan::Allow>()?;
    m.add_class::<plan::Deny>()?;
    Ok(())
}
