//! ztunnel's side of ZDS (`istio.workload.zds`, Istio's `proto/zds.proto`): the hello it sends,
//! the requests istio-cni sends it (decoded), and the acks it answers with (encoded).
//!
//! The messages are prost structs written from the published schema (field numbers matter on
//! the wire: `DelWorkload.uid` is field 2, `KeepWorkload` is `WorkloadRequest`'s field 5,
//! `WorkloadInfo`'s field 4 is reserved). A running ztunnel uses these instead of Python's
//! protobuf runtime, whose descriptor machinery alone is ~4 MiB resident; the CNI side
//! (`ambient.zds.server`, the testbed's) keeps protobuf's messages (`ambient.zds.messages`), and
//! tests/unit/test_zds_codec.py holds the two to the same bytes.

use prost::Message;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    NotUsed = 0,
    V1 = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Payload {
    #[prost(message, tag = "1")]
    Add(AddWorkload),
    #[prost(message, tag = "2")]
    Del(DelWorkload),
    #[prost(message, tag = "3")]
    SnapshotSent(SnapshotSent),
    #[prost(message, tag = "5")]
    Keep(KeepWorkload),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "Payload", tags = "1, 2, 3, 5")]
    pub payload: Option<Payload>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Ack(Ack),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "Response", tags = "1")]
    pub payload: Option<Response>,
}

/// The `ZdsHello` ztunnel sends first, as bytes.
#[pyfunction]
pub fn zds_hello(py: Python<'_>, version: i32) -> Bound<'_, PyBytes> {
    PyBytes::new(py, &ZdsHello { version }.encode_to_vec())
}

/// The `WorkloadResponse` acking one request (`error` empty for success), as bytes.
#[pyfunction]
pub fn zds_ack<'py>(py: Python<'py>, error: &str) -> Bound<'py, PyBytes> {
    let ack = Ack {
        error: error.to_owned(),
    };
    let response = WorkloadResponse {
        payload: Some(Response::Ack(ack)),
    };
    PyBytes::new(py, &response.encode_to_vec())
}

/// A `WorkloadRequest` (kind, uid, name, namespace, service account): kind `"add"`, `"del"`,
/// `"keep"`, `"snapshot_sent"` (the oneof's member names) or None when it has no payload; the
/// strings empty where the request has none. `ValueError` when the bytes are not one.
#[pyfunction]
pub fn zds_request(
    data: &[u8],
) -> PyResult<(Option<&'static str>, String, String, String, String)> {
    let request =
        WorkloadRequest::decode(data).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let empty = String::new;
    Ok(match request.payload {
        None => (None, empty(), empty(), empty(), empty()),
        Some(Payload::Add(add)) => {
            let info = add.workload_info.unwrap_or_default();
            (
                Some("add"),
                add.uid,
                info.name,
                info.namespace,
                info.service_account,
            )
        }
        Some(Payload::Del(del)) => (Some("del"), del.uid, empty(), empty(), empty()),
        Some(Payload::Keep(keep)) => (Some("keep"), keep.uid, empty(), empty(), empty()),
        Some(Payload::SnapshotSent(_)) => {
            (Some("snapshot_sent"), empty(), empty(), empty(), empty())
        }
    })
}
