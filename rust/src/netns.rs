//! Sockets inside a pod's network namespace (in-pod mode, as Istio's ztunnel with istio-cni).
//!
//! A socket belongs to the network namespace of the thread that called `socket(2)`; after that
//! it is used from any thread. So only socket *creation* enters the pod's namespace: each
//! `Netns` owns one small thread that has joined the namespace once (`setns`) and makes sockets
//! on request. The proxy code above it is the same in loopback mode and in-pod mode.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use socket2::{Domain, Protocol, Socket, Type};

/// Work run on the namespace's thread.
type Job = Box<dyn FnOnce() + Send>;

/// A network namespace the core can make sockets in; identified by its inode, as the kernel does.
pub struct NetnsHandle {
    inode: u64,
    name: String,
    jobs: mpsc::Sender<Job>,
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({}, net:[{}])", self.name, self.inode)
    }
}

impl NetnsHandle {
    /// Join the namespace of `fd` (a `/var/run/netns/<pod>` or `/proc/<pid>/ns/net` descriptor,
    /// borrowed: the caller keeps its copy) on a new thread.
    pub fn open(fd: BorrowedFd<'_>, name: &str) -> io::Result<Self> {
        let owned: OwnedFd = fd.try_clone_to_owned()?;
        let inode = inode_of(&owned)?;
        let (jobs, receiver) = mpsc::channel::<Job>();
        let (joined_tx, joined_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                // SAFETY: a valid namespace descriptor; setns affects this thread only.
                let rc = unsafe { libc::setns(owned.as_raw_fd(), libc::CLONE_NEWNET) };
                let joined = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                // The thread's membership keeps the namespace alive; the descriptor is not needed.
                drop(owned);
                let ok = joined.is_ok();
                let _ = joined_tx.send(joined);
                if ok {
                    // Ends when the last `NetnsHandle` (the sender) is dropped.
                    while let Ok(job) = receiver.recv() {
                        job();
                    }
                }
            })?;
        joined_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread ended before joining"))?
            .map_err(|e| io::Error::new(e.kind(), format!("setns into {name}: {e}")))?;
        Ok(Self {
            inode,
            name: name.to_string(),
            jobs,
        })
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    fn submit(&self, job: Job) -> io::Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| io::Error::other(format!("network namespace {} is gone", self.name)))
    }

    /// A TCP socket in this namespace, waiting for it (listener setup, called from Python).
    pub fn tcp_socket_blocking(&self, domain: Domain) -> io::Result<Socket> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move || {
            let _ = tx.send(new_tcp_socket(domain));
        }))?;
        rx.recv()
            .map_err(|_| io::Error::other(format!("network namespace {} is gone", self.name)))?
    }

    /// A TCP socket in this namespace, for a connection made on the runtime.
    pub async fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(new_tcp_socket(domain));
        }))?;
        rx.await
            .map_err(|_| io::Error::other(format!("network namespace {} is gone", self.name)))?
    }
}

pub fn new_tcp_socket(domain: Domain) -> io::Result<Socket> {
    Socket::new(domain, Type::STREAM, Some(Protocol::TCP))
}

fn inode_of(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: fstat fills the zeroed struct for a valid descriptor.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.st_ino)
}

/// A pod's network namespace, for `Core.serve_hbone(..., netns=)` and `Core.listen(..., netns=)`.
#[pyclass(frozen, module = "ambient._core")]
pub struct Netns {
    pub handle: Arc<NetnsHandle>,
}

#[pymethods]
impl Netns {
    /// `fd`: an open descriptor of the namespace (the core takes its own duplicate, so the caller
    /// may close it); `name` names it in errors and logs.
    #[new]
    #[pyo3(signature = (fd, name=""))]
    fn new(fd: RawFd, name: &str) -> PyResult<Self> {
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "fd: expected an open network-namespace descriptor, got {fd}"
            )));
        }
        // SAFETY: the descriptor stays open for the duration of this call (the caller's).
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let name = if name.is_empty() {
            format!("fd {fd}")
        } else {
            name.to_string()
        };
        let handle = NetnsHandle::open(borrowed, &name).map_err(|e| {
            PyOSError::new_err(format!("cannot enter network namespace {name}: {e}"))
        })?;
        Ok(Self {
            handle: Arc::new(handle),
        })
    }

    /// The namespace's inode (what `ls -l /proc/<pid>/ns/net` shows as `net:[inode]`).
    #[getter]
    fn inode(&self) -> u64 {
        self.handle.inode
    }

    #[getter]
    fn name(&self) -> &str {
        &self.handle.name
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.handle)
    }
}
