//! Decisions remembered per snapshot, so a new connection costs no Python.
//!
//! A ztunnel's answer for a connection depends on the mesh snapshot and on a few facts about the
//! connection: the destination it dialed (outbound), or who is asking for what (inbound: the
//! peer's identity and IP, the CONNECT authority, the Service named in `Forwarded`). Never on the
//! source port, the time, or anything else per connection. So Python is asked once per such
//! key; its answer is kept in a [`Table`] and served to every later connection with the same key
//! until Python says the snapshot changed ([`Generation::advance`]). An answer may be a weighted
//! set of plans ([`Routes`]: a Service's endpoints by capacity, a waypoint's instances), of which
//! the core picks one per connection, so load balancing stays per connection.
//!
//! Python's functions stay the only statement of the semantics: the table holds their answers,
//! and `tests/unit/test_decision_table.py` checks that what the core serves from it equals what
//! Python answers for each connection, on generated meshes.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;
use rand::Rng;

use crate::decision::Plan;

/// Answers one listener keeps; past this the table starts again empty. Keys are chosen by the
/// pods (any IP and port can be dialed), so the table must not grow with what they try; 4,096
/// destinations per pod is far beyond what a pod talks to between two snapshots.
pub const TABLE_CAPACITY: usize = 4_096;

/// Which snapshot the tables were filled from: advanced by Python after it swaps a snapshot.
#[derive(Default)]
pub struct Generation(AtomicU64);

impl Generation {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn advance(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// One listener's remembered answers, valid for one generation.
pub struct Table<K, V> {
    entries: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    generation: u64,
    map: HashMap<K, V>,
}

impl<K: Eq + Hash, V: Clone> Table<K, V> {
    pub fn new() -> Self {
        Self {
            entries: Mutex::new(Entries {
                generation: 0,
                map: HashMap::new(),
            }),
        }
    }

    /// The answer for `key` if one was given in generation `now`.
    pub fn get(&self, now: u64, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap();
        if entries.generation != now {
            return None;
        }
        entries.map.get(key).cloned()
    }

    /// Keep `value`, asked of Python in generation `asked`, unless the snapshot changed while
    /// Python was deciding (`asked != now`): that answer may come from the old snapshot.
    pub fn put(&self, asked: u64, now: u64, key: K, value: V) {
        if asked != now {
            return;
        }
        let mut entries = self.entries.lock().unwrap();
        if entries.generation != now || entries.map.len() >= TABLE_CAPACITY {
            entries.map.clear();
            entries.generation = now;
        }
        entries.map.insert(key, value);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap().map.len()
    }
}

/// A weighted set of plans; the core picks one per connection, with probability proportional
/// to its weight (Istio's ztunnel picks a Service endpoint the same way, at random per
/// connection).
#[pyclass(frozen, module = "ambient._core")]
pub struct Routes {
    plans: Vec<Plan>,
    /// Running sums of the weights: a pick is a binary search for a random number below the last.
    cumulative: Vec<u64>,
}

#[pymethods]
impl Routes {
    #[new]
    #[pyo3(signature = (plans, weights=None))]
    fn new(plans: &Bound<'_, PyList>, weights: Option<Vec<u32>>) -> PyResult<Self> {
        if plans.is_empty() {
            return Err(PyValueError::new_err(
                "Routes.plans: at least one plan is required",
            ));
        }
        let weights = weights.unwrap_or_else(|| vec![1; plans.len()]);
        if weights.len() != plans.len() {
            return Err(PyValueError::new_err(format!(
                "Routes.weights: {} weights for {} plans",
                weights.len(),
                plans.len()
            )));
        }
        let mut cumulative = Vec::with_capacity(weights.len());
        let mut total = 0u64;
        for (i, w) in weights.iter().enumerate() {
            if *w == 0 {
                return Err(PyValueError::new_err(format!(
                    "Routes.weights[{i}]: expected a weight above 0"
                )));
            }
            total += u64::from(*w);
            cumulative.push(total);
        }
        let plans = plans
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Plan::from_py(&p)
                    .map_err(|e| PyValueError::new_err(format!("Routes.plans[{i}]: {e}")))
            })
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Self { plans, cumulative })
    }

    #[getter]
    fn plans(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        self.plans.iter().map(|p| p.to_py(py)).collect()
    }

    #[getter]
    fn weights(&self) -> Vec<u64> {
        let mut previous = 0;
        self.cumulative
            .iter()
            .map(|c| {
                let w = c - previous;
                previous = *c;
                w
            })
            .collect()
    }

    fn __len__(&self) -> usize {
        self.plans.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "Routes(<{} plans>, weights={:?})",
            self.plans.len(),
            self.weights()
        )
    }
}

impl Routes {
    /// One plan, at random by weight.
    pub fn pick(&self) -> &Plan {
        if self.plans.len() == 1 {
            return &self.plans[0];
        }
        let total = *self.cumulative.last().expect("Routes is never empty");
        let draw = rand::rng().random_range(0..total);
        let index = self.cumulative.partition_point(|&c| c <= draw);
        &self.plans[index]
    }
}

/// What an outbound decision answered: one plan, or a set the core picks from per connection.
#[derive(Clone)]
pub enum Answer {
    One(Plan),
    Choice(Arc<Py<Routes>>),
}

impl Answer {
    pub fn from_py(obj: &Bound<'_, PyAny>) -> Result<Self, String> {
        if let Ok(routes) = obj.cast::<Routes>() {
            return Ok(Answer::Choice(Arc::new(routes.clone().unbind())));
        }
        Plan::from_py(obj).map(Answer::One).map_err(|_| {
            format!(
                "expected Routes, HboneTarget, TcpTarget or Deny, got {}",
                crate::decision::type_name(obj)
            )
        })
    }

    pub fn pick(&self) -> Plan {
        match self {
            Answer::One(plan) => plan.clone(),
            Answer::Choice(routes) => routes.get().pick().clone(),
        }
    }
}

/// What an inbound answer may depend on: everything the ztunnel's inbound decision reads.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub peer_identity: Option<Arc<str>>,
    pub peer_ip: IpAddr,
    pub authority: String,
    pub forwarded_host: Option<String>,
}

/// The `host=` parameter of a `Forwarded` header (RFC 7239) as the Python reference reads it
/// (`ambient.routing.forwarded_host`): the first `host` parameter with a non-empty value,
/// quotes stripped.
pub fn forwarded_host(value: &str) -> Option<String> {
    for part in value.split(';') {
        let part = part.trim();
        let (name, host) = part.split_once('=').unwrap_or((part, ""));
        let host = host.trim_matches('"');
        if name.eq_ignore_ascii_case("host") && !host.is_empty() {
            return Some(host.to_string());
        }
    }
    None
}

/// `forwarded_host` for Python, so the differential test can hold it to the reference.
#[pyfunction(name = "forwarded_host")]
pub fn py_forwarded_host(value: &str) -> Option<String> {
    forwarded_host(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_host_reads_the_first_nonempty_host() {
        assert_eq!(
            forwarded_host(r#"for="1.2.3.4:5";host=a.b"#).as_deref(),
            Some("a.b")
        );
        assert_eq!(forwarded_host(r#"HOST="x"; host=y"#).as_deref(), Some("x"));
        assert_eq!(forwarded_host("host=;host=z").as_deref(), Some("z"));
        assert_eq!(forwarded_host(r#"for="1.2.3.4:5""#), None);
    }

    #[test]
    fn a_table_forgets_an_old_generation_and_a_late_answer() {
        let table: Table<u32, u32> = Table::new();
        table.put(0, 0, 1, 10);
        assert_eq!(table.get(0, &1), Some(10));
        assert_eq!(table.get(1, &1), None);
        table.put(0, 1, 2, 20); // asked before the snapshot changed: not kept
        assert_eq!(table.get(1, &2), None);
        table.put(1, 1, 2, 20);
        assert_eq!(table.get(1, &2), Some(20));
        assert_eq!(table.get(1, &1), None);
    }

    #[test]
    fn a_full_table_starts_again() {
        let table: Table<usize, usize> = Table::new();
        for i in 0..TABLE_CAPACITY + 1 {
            table.put(0, 0, i, i);
        }
        assert_eq!(table.len(), 1);
    }
}
