//! Connection caps: at most so many connections per listener, and per source IP on it, so one
//! client (or one attacker) cannot take every file descriptor of the proxy. A connection over a
//! cap is accepted and closed at once — leaving it in the kernel's backlog would only make its
//! client wait — and counted, reported and logged (rate-limited) with the cap it hit.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The caps of one listener; 0 means no cap.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub per_listener: usize,
    pub per_source: usize,
}

/// Counts a listener's open connections, in total and per source IP.
pub struct ConnectionLimiter {
    caps: Caps,
    total: AtomicUsize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
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
    source: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.limiter.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.source {
            let mut by_source = self.limiter.by_source.lock().unwrap();
            if let Some(n) = by_source.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_source.remove(&ip);
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

    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admission, OverCap> {
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
        if self.caps.per_source > 0 {
            let mut by_source = self.by_source.lock().unwrap();
            let n = by_source.entry(source).or_insert(0);
            if *n >= self.caps.per_source {
                // `admission` (no source yet) gives the listener-wide place back on drop.
                return Err(OverCap::Source(source, self.caps.per_source));
            }
            *n += 1;
            admission.source = Some(source);
        }
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
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limiter.admit(a).unwrap();
        let _second = limiter.admit(a).unwrap();
        assert!(matches!(limiter.admit(a), Err(OverCap::Source(_, 2))));
        let _third = limiter.admit(b).unwrap();
        assert!(matches!(limiter.admit(b), Err(OverCap::Listener(3))));
        drop(first);
        assert_eq!(limiter.open(), 2);
        let _again = limiter.admit(a).unwrap();
        assert_eq!(limiter.sources(), 2);
    }

    #[test]
    fn a_penalized_source_is_refused_until_its_penalty_ends() {
        let limiter = ConnectionLimiter::new(Caps {
            per_listener: 0,
            per_source: 0,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        limiter.penalize(a, Duration::from_secs(60));
        assert!(matches!(limiter.admit(a), Err(OverCap::Penalized(..))));
        assert!(limiter.admit("10.0.0.2".parse().unwrap()).is_ok());
        limiter.penalize(a, Duration::ZERO);
        assert!(limiter.admit(a).is_ok());
    }
}
