//! How a carried connection ended, told the same way by the HBONE server, the outbound
//! listeners and the tunnels Python hands over: the text for its report and access-log line,
//! the response flag its metrics are closed with, and the core's counters.
//!
//! A connection the proxy cut (its listener's drain deadline, a removed pod) usually sees its copy
//! fail first — the HTTP/2 connection under it went with the cut — so the cut is checked before
//! the copy's own error is believed: it is reported with the cut's reason, closed with `-` and
//! counted in `connections_cut`, as Istio's ztunnel records a connection closed by a drain.

use std::io;

use crate::metrics::{ConnectionCount, Flag};
use crate::stats::Stats;

/// `result`: the registry's outcome (`Err` when a decision closed it) of the copy's result;
/// `cut`: the reason if the proxy cut the connection. Returns the report's error, if any.
pub fn carried(
    result: Result<io::Result<()>, String>,
    cut: Option<String>,
    count: ConnectionCount<'_>,
    stats: &Stats,
) -> Option<String> {
    match (result, cut) {
        (Ok(Ok(())), _) => {
            count.finish(Flag::None);
            None
        }
        (Err(reason), _) => {
            // Closed from outside: a policy change no longer allows it (Istio: a late DENY).
            Stats::inc(&stats.connections_closed_by_policy);
            count.finish(Flag::Deny);
            Some(format!("closed: {reason}"))
        }
        (Ok(Err(_)), Some(reason)) => {
            Stats::inc(&stats.connections_cut);
            count.finish(Flag::None);
            Some(reason)
        }
        (Ok(Err(e)), None) => {
            count.finish(Flag::Connect);
            Some(e.to_string())
        }
    }
}
