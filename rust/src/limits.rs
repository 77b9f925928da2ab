//! Connection caps: at most so many connections per listener, and per source IP on it, so one
//! client (or one attacker) cannot take every file descriptor of the proxy. A connection over a
//! cap is accepted and closed at once — leaving it in the kernel's backlog would only make its
//! client wait — and counted, reported and logged (rate-limited) with the cap it hit.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The caps of one listener; 0 means no cap.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub per_listener: usize,
    pub per_source: usize,
}

/// Counts a listener's open connections, in total and per source IP; knows the source port of
/// each, since a connection to the app from a client's IP must not take another client's port
/// (see `SocketFactory::connect`).
pub struct ConnectionLimiter {
    caps: Caps,
    total: AtomicUsize,
    /// The source ports of the live connections from each source IP.
    by_source: Mutex<HashMap<IpAddr, Vec<u16>>>,
    /// Sources refused until a time, for abusing a connection (see the HBONE server).
    penalties: Mutex<HashMap<IpAddr, Instant>>,
}

/// Why a connection was turned away.
#[derive(Debug)]
pub enum OverCap {
    Listener(usize),
    Source(IpAddr, usize),
    Penalized(IpAddr, Duration),
}

impl fmt::Display for OverCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverCap::Listener(cap) => {
                write!(f, "refused: the listener already holds {cap} connections (its cap)")
            }
            OverCap::Source(ip, cap) => write!(
                f,
                "refused: {ip} already holds {cap} connections to this listener (the per-source cap)"
            ),
            OverCap::Penalized(ip, left) => write!(
                f,
                "refused: {ip} abused an earlier connection and is refused for {left:.1?} more"
            ),
        }
    }
}

/// One admitted connection; dropping it frees its place.
pub struct Admission {
    limiter: Arc<ConnectionLimiter>,
    source: Option<SocketAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(source) = self.source {
            let mut by_source = self.limiter.by_source.lock().unwrap();
            if let Some(ports) = by_source.get_mut(&source.ip()) {
                if let Some(i) = ports.iter().position(|p| *p == source.port()) {
                    ports.swap_remove(i);
                }
                if ports.is_empty() {
                    by_source.remove(&source.ip());
                }
            }
        }
    }
}

impl ConnectionLimiter {
    pub fn new(caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            caps,
            total: AtomicUsize::new(0),
            by_source: Mutex::new(HashMap::new()),
            penalties: Mutex::new(HashMap::new()),
        })
    }

    /// Refuse new connections from `ip` for `duration`.
    pub fn penalize(&self, ip: IpAddr, duration: Duration) {
        let until = Instant::now() + duration;
        let mut penalties = self.penalties.lock().unwrap();
        penalties.retain(|_, t| *t > Instant::now());
        penalties.insert(ip, until);
    }

    fn penalty(&self, ip: IpAddr) -> Option<Duration> {
        let penalties = self.penalties.lock().unwrap();
        if penalties.is_empty() {
            return None;
        }
        let left = penalties.get(&ip)?.checked_duration_since(Instant::now())?;
        Some(left)
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Sources with at least one connection now (the per-source table's size).
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.by_source.lock().unwrap().len()
    }

    /// The source ports of the live connections from `ip`.
    pub fn ports_of(&self, ip: IpAddr) -> Vec<u16> {
        self.by_source
            .lock()
            .unwrap()
            .get(&ip)
            .cloned()
            .unwrap_or_default()
    }

    pub fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admission, OverCap> {
        let source = peer.ip();
        if let Some(left) = self.penalty(source) {
            return Err(OverCap::Penalized(source, left));
        }
        let cap = self.caps.per_listener;
        let before = self.total.fetch_add(1, Ordering::AcqRel);
        if cap > 0 && before >= cap {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(OverCap::Listener(cap));
        }
        let mut admission = Admission {
            limiter: self.clone(),
            source: None,
        };
        let mut by_source = self.by_source.lock().unwrap();
        let ports = by_source.entry(source).or_default();
        if self.caps.per_source > 0 && ports.len() >= self.caps.per_source {
            // `admission` (no source yet) gives the listener-wide place back on drop.
            return Err(OverCap::Source(source, self.caps.per_source));
        }
        ports.push(peer.port());
        admission.source = Some(peer);
        Ok(admission)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_apply_per_listener_and_per_source_and_places_come_back() {
        let limiter = ConnectionLimiter::new(Caps {
            per_listener: 3,
            per_source: 2,
        });
        let a = |port| SocketAddr::new("10.0.0.1".parse().unwrap(), port);
        let b = |port| SocketAddr::new("10.0.0.2".parse().unwrap(), port);
        let first = limiter.admit(a(1001)).unwrap();
        let _second = limiter.admit(a(1002)).unwrap();
        assert!(matches!(limiter.admit(a(1003)), Err(OverCap::Source(_, 2))));
        let _third = limiter.admit(b(2001)).unwrap();
        assert!(matches!(limiter.admit(b(2002)), Err(OverCap::Listener(3))));
        assert_eq!(limiter.ports_of(a(0).ip()), vec![1001, 1002]);
        drop(first);
        assert_eq!(limiter.open(), 2);
        assert_eq!(limiter.ports_of(a(0).ip()), vec![1002]);
        let _again = limiter.admit(a(1004)).unwrap();
        assert_eq!(limiter.sources(), 2);
    }

    #[test]
    fn a_penalized_source_is_refused_until_its_penalty_ends() {
        let limiter = ConnectionLimiter::new(Caps {
            per_listener: 0,
            per_source: 0,
        });
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        limiter.penalize(a.ip(), Duration::from_secs(60));
        assert!(matches!(limiter.admit(a), Err(OverCap::Penalized(..))));
        assert!(limiter.admit("10.0.0.2:1000".parse().unwrap()).is_ok());
        limiter.penalize(a.ip(), Duration::ZERO);
        assert!(limiter.admit(a).is_ok());
    }
}
