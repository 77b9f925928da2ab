//! Python filters at the waypoint (ambient's WasmPlugin): per request, the core hands the request
//! head to the filters that apply, in Istio's phase order, on the core's decision threads (never a
//! runtime worker), each call bounded by the filter's time budget. A filter may let the request
//! go on (its headers or path changed) or answer it; with `on_response` it sees the response head
//! too. A filter that raises, overruns its budget or has too many calls still running gets its
//! fail strategy: FAIL_CLOSE answers 500, FAIL_OPEN goes on as if it were not there.
//!
//! What a filter is and how its file is loaded and reloaded is Python's
//! (`ambient/waypoint/plugins.py`); the table only says which filters apply where and how.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::decision::{DecisionError, DecisionPool};

/// Where in the chain a filter runs (Istio's WasmPlugin phases): AUTHN before JWT authentication,
/// AUTHZ between it and authorization, STATS (and unspecified) after authorization, before
/// routing.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Phase {
    Authn,
    Authz,
    Stats,
}

#[derive(Deserialize, Debug)]
pub struct PluginSpec {
    /// `namespace/name` of the WasmPlugin.
    pub name: Arc<str>,
    pub phase: Phase,
    pub fail_open: bool,
    /// How long one call may take, seconds.
    pub budget: f64,
    /// The ports it applies to (`match[].ports`); empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Its class defines `on_response`.
    #[serde(default)]
    pub on_response: bool,
    /// It reads the request body, up to this many bytes (0: never sees the body).
    #[serde(default)]
    pub body_limit: usize,
}

pub struct Plugin {
    pub spec: PluginSpec,
    pub budget: Duration,
    /// Calls of this filter still running in Python: bounded, so a filter that hangs holds a
    /// few decision threads, never all of them.
    slots: Arc<Semaphore>,
}

/// Calls of one filter that may run at once; past it a call waits for one to end, within its
/// budget ("busy" when none does).
const CALLS_PER_FILTER: usize = 4;
/// Decision threads for filters, shared by every filter of the waypoint, and calls that may
/// wait for one.
const THREADS: usize = 8;
const QUEUE: usize = 1024;

/// What stays across table swaps: the Python host, its threads, each filter's running calls and
/// failure counts.
#[derive(Default)]
pub struct PluginHost {
    runner: RwLock<Option<Arc<Py<PyAny>>>>,
    pool: OnceLock<Arc<DecisionPool>>,
    slots: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
    /// `(filter, reason)` → failures: `raised`, `timeout`, `busy`, `invalid`.
    pub failures: Mutex<HashMap<(Arc<str>, &'static str), u64>>,
    /// Requests a filter answered itself.
    pub answered: AtomicU64,
}

impl PluginHost {
    /// The Python object whose `on_request` / `on_response` run the filters.
    pub fn set_runner(&self, runner: Py<PyAny>) -> std::io::Result<()> {
        if self.pool.get().is_none() {
            let _ = self.pool.set(DecisionPool::start(THREADS, QUEUE)?);
        }
        *self.runner.write().unwrap() = Some(Arc::new(runner));
        Ok(())
    }

    /// The table's filters, with the running-call bound each keeps across snapshots.
    pub fn compile(&self, specs: Vec<PluginSpec>) -> Result<Vec<Plugin>, String> {
        let mut slots = self.slots.lock().unwrap();
        specs
            .into_iter()
            .map(|spec| {
                let budget = Duration::try_from_secs_f64(spec.budget)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("filter {}: bad budget {}", spec.name, spec.budget))?;
                let slots = slots
                    .entry(spec.name.clone())
                    .or_insert_with(|| Arc::new(Semaphore::new(CALLS_PER_FILTER)))
                    .clone();
                Ok(Plugin {
                    spec,
                    budget,
                    slots,
                })
            })
            .collect()
    }

    /// The filter answered something that is not a verdict (a bad header, an unknown kind).
    fn invalid(&self, plugin: &Plugin, text: String) -> Failure {
        self.failed(plugin, "invalid");
        Failure {
            reason: "invalid",
            text,
        }
    }

    fn failed(&self, plugin: &Plugin, reason: &'static str) {
        *self
            .failures
            .lock()
            .unwrap()
            .entry((plugin.spec.name.clone(), reason))
            .or_default() += 1;
    }

    /// Run one Python call of `plugin` within its budget.
    async fn call<T, F>(&self, plugin: &Plugin, f: F) -> Result<T, Failure>
    where
        T: Send + 'static,
        F: FnOnce(Python<'_>, &Py<PyAny>) -> PyResult<T> + Send + 'static,
    {
        let failure = |reason, text: String| {
            self.failed(plugin, reason);
            Failure { reason, text }
        };
        let (Some(runner), Some(pool)) = (self.runner.read().unwrap().clone(), self.pool.get())
        else {
            return Err(failure("raised", "no filter host is running".into()));
        };
        // The budget covers the whole call: waiting for one of the filter's slots (its calls
        // still running), for a filter thread, and Python itself.
        let slots = plugin.slots.clone();
        let mut slot_taken = false;
        let run = async {
            let permit = slots
                .acquire_owned()
                .await
                .expect("a filter's slots are never closed");
            slot_taken = true;
            pool.call(move |py| {
                let _permit: OwnedSemaphorePermit = permit;
                f(py, &runner).map_err(|e| describe(py, e))
            })
            .await
        };
        let result = tokio::time::timeout(plugin.budget, run).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(DecisionError::Failed(why))) => Err(failure("raised", why)),
            Ok(Err(e)) => Err(failure("busy", e.to_string())),
            Err(_) if !slot_taken => Err(failure(
                "busy",
                format!(
                    "its {CALLS_PER_FILTER} calls still running did not end within its budget \
                     of {:?}",
                    plugin.budget
                ),
            )),
            Err(_) => Err(failure(
                "timeout",
                format!("took longer than its budget of {:?}", plugin.budget),
            )),
        }
    }

    /// `plugin`'s verdict on a request head (and its body, when it asked for it).
    pub async fn on_request(
        &self,
        plugin: &Plugin,
        request: FilterRequest,
    ) -> Result<Verdict, Failure> {
        let name = plugin.spec.name.clone();
        let answer = self
            .call(plugin, move |py, runner| {
                let headers = request.headers_list();
                let body = request.body.as_deref().map(|b| PyBytes::new(py, b));
                let args = (
                    &*name,
                    &request.method,
                    &request.path,
                    &request.authority,
                    headers,
                    &request.source_principal,
                    &request.source_ip,
                    &request.destination,
                    &request.service,
                    request.request_principal.as_deref(),
                    body,
                );
                let out = runner.call_method1(py, "on_request", args)?;
                Verdict::from_py(out.bind(py))
            })
            .await?;
        answer.map_err(|why| self.invalid(plugin, why))
    }

    /// `plugin`'s look at a response head: new headers, or None to keep them.
    pub async fn on_response(
        &self,
        plugin: &Plugin,
        state: Py<PyAny>,
        status: u16,
        headers: &HeaderMap,
    ) -> Result<Option<HeaderMap>, Failure> {
        let name = plugin.spec.name.clone();
        let headers: Vec<(String, String)> = headers_list(headers)
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect();
        let answer = self
            .call(plugin, move |py, runner| {
                let out =
                    runner.call_method1(py, "on_response", (&*name, state, status, headers))?;
                let out = out.bind(py);
                Ok(if out.is_none() {
                    Ok(None)
                } else {
                    out.extract::<Vec<(String, String)>>()
                        .map_err(|e| format!("on_response returned {e}"))
                        .and_then(|h| header_map(&h).map(Some))
                })
            })
            .await?;
        answer.map_err(|why| self.invalid(plugin, why))
    }
}

/// A Python exception as one line: its type and message.
fn describe(py: Python<'_>, e: PyErr) -> String {
    let kind = e
        .get_type(py)
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "exception".into());
    format!("raised {kind}: {}", e.value(py))
}

/// Why a filter gave no verdict.
pub struct Failure {
    pub reason: &'static str,
    pub text: String,
}

/// What a filter sees of a request.
pub struct FilterRequest {
    pub method: String,
    /// Path and query.
    pub path: String,
    pub authority: String,
    pub headers: HeaderMap,
    pub source_principal: String,
    pub source_ip: String,
    pub destination: String,
    pub service: String,
    pub request_principal: Option<String>,
    pub body: Option<Bytes>,
}

impl FilterRequest {
    fn headers_list(&self) -> Vec<(&str, String)> {
        headers_list(&self.headers)
    }
}

fn headers_list(headers: &HeaderMap) -> Vec<(&str, String)> {
    headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

fn header_map(headers: &[(String, String)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = HeaderName::try_from(name.as_str())
            .map_err(|_| format!("set a bad header name {name:?}"))?;
        let v = HeaderValue::try_from(value.as_str())
            .map_err(|_| format!("set a bad value for header {name}: {value:?}"))?;
        map.append(n, v);
    }
    Ok(map)
}

/// A filter's verdict on a request.
pub enum Verdict {
    /// Go on; with new headers and path when the filter changed them, and the state to hand
    /// `on_response` when it has one.
    Continue {
        headers: Option<HeaderMap>,
        path: Option<String>,
        state: Option<Py<PyAny>>,
    },
    /// Answer the request with this instead of sending it on.
    Respond {
        status: u16,
        body: Bytes,
        headers: HeaderMap,
    },
}

impl Verdict {
    /// `("continue", headers | None, path | None, state | None)` or `("respond", status, body,
    /// headers)`, as `ambient.waypoint.plugins` returns them.
    fn from_py(out: &Bound<'_, PyAny>) -> PyResult<Result<Verdict, String>> {
        let tuple = out.cast::<PyTuple>()?;
        let kind: String = tuple.get_item(0)?.extract()?;
        Ok(match kind.as_str() {
            "continue" => {
                let headers: Option<Vec<(String, String)>> = tuple.get_item(1)?.extract()?;
                let path: Option<String> = tuple.get_item(2)?.extract()?;
                let state = tuple.get_item(3)?;
                let headers = match headers {
                    Some(h) => match header_map(&h) {
                        Ok(map) => Some(map),
                        Err(e) => return Ok(Err(e)),
                    },
                    None => None,
                };
                Ok(Verdict::Continue {
                    headers,
                    path,
                    state: (!state.is_none()).then(|| state.unbind()),
                })
            }
            "respond" => {
                let status: u16 = tuple.get_item(1)?.extract()?;
                let body: Vec<u8> = tuple.get_item(2)?.extract()?;
                let headers: Vec<(String, String)> = tuple.get_item(3)?.extract()?;
                if !(200..=599).contains(&status) {
                    return Ok(Err(format!("answered with status {status}")));
                }
                match header_map(&headers) {
                    Ok(headers) => Ok(Verdict::Respond {
                        status,
                        body: Bytes::from(body),
                        headers,
                    }),
                    Err(e) => Err(e),
                }
            }
            other => Err(format!("returned an unknown verdict {other:?}")),
        })
    }
}
