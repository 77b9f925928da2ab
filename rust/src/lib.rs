//! `ambient._core`: the compiled data plane of ambient.
//!
//! Mechanism only — sockets, mutual TLS, HBONE, pooling and copying. Every decision (where a
//! connection goes, whether a stream is allowed) is asked of Python through `decision`, once per
//! connection or stream, never per byte.

mod accesslog;
mod allocator;
mod ca;
mod copy;
mod core;
mod decision;
mod ending;
mod engine;
mod exposition;
mod hbone;
mod identity;
mod limits;
mod logging;
mod metrics;
mod netns;
mod outbound;
mod plan;
mod pool;
mod probe;
mod ratelimit;
mod registry;
mod report;
mod scope;
mod socket;
mod socks5;
mod stats;
mod table;
mod tls;
mod waypoint;
mod yaml;
mod zds;

use pyo3::prelude::*;

/// "release" or "debug": measured figures are only meaningful for a release build.
#[pyfunction]
fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Rust log records go to Python's `logging` (logger names follow the module paths), from a
    // thread of their own: a runtime worker never waits for the GIL to log.
    logging::init(m.py());
    m.add_function(wrap_pyfunction!(logging::sync_level, m)?)?;
    m.add_function(wrap_pyfunction!(logging::log_stats, m)?)?;
    m.add_function(wrap_pyfunction!(build_profile, m)?)?;
    m.add_function(wrap_pyfunction!(yaml::yaml_documents, m)?)?;
    m.add_function(wrap_pyfunction!(exposition::encode_metrics, m)?)?;
    m.add_function(wrap_pyfunction!(zds::zds_hello, m)?)?;
    m.add_function(wrap_pyfunction!(zds::zds_ack, m)?)?;
    m.add_function(wrap_pyfunction!(zds::zds_request, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<ca::CertificateSigner>()?;
    m.add_class::<core::Core>()?;
    m.add_class::<core::Listener>()?;
    m.add_class::<metrics::Counters>()?;
    m.add_class::<netns::Netns>()?;
    m.add_class::<plan::HboneTarget>()?;
    m.add_class::<plan::TcpTarget>()?;
    m.add_class::<plan::Allow>()?;
    m.add_class::<plan::Deny>()?;
    m.add_class::<table::Routes>()?;
    m.add_class::<waypoint::WaypointTable>()?;
    m.add_class::<decision::RememberedDecisions>()?;
    m.add_class::<accesslog::AccessLog>()?;
    m.add_class::<accesslog::LogTemplate>()?;
    m.add_function(wrap_pyfunction!(table::py_forwarded_host, m)?)?;
    m.add_function(wrap_pyfunction!(waypoint::normalize_path, m)?)?;
    Ok(())
}
