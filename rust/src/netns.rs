//! Sockets inside a pod's network namespace (in-pod mode, as Istio's ztunnel with istio-cni).
//!
//! A socket belongs to the network namespace of the thread that called `socket(2)`; after that
//! it is used from any thread. So only socket *creation* enters the pod's namespace, and it does
//! so on the calling thread, as Istio's ztunnel does: `setns` into the pod, `socket`, `setns`
//! back, no hand-off (a thread per namespace cost two context switches per connection to the
//! app, measured at ~5 % of a ztunnel's CPU). The proxy code above it is the same in loopback
//! mode and in-pod mode.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, OnceLock};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use socket2::{Domain, Protocol, Socket, Type};

/// A network namespace the core can make sockets in; identified by its inode, as the kernel does.
pub struct NetnsHandle {
    inode: u64,
    name: String,
    /// Open, it keeps the namespace alive as long as the core may make sockets in it.
    fd: OwnedFd,
}

impl fmt::Debug for NetnsHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Netns({}, net:[{}])", self.name, self.inode)
    }
}

/// The namespace the proxy's own threads live in (the node's), to come back to.
fn home() -> io::Result<BorrowedFd<'static>> {
    static HOME: OnceLock<Result<OwnedFd, String>> = OnceLock::new();
    let home = HOME.get_or_init(|| {
        std::fs::File::open("/proc/self/ns/net")
            .map(OwnedFd::from)
            .map_err(|e| format!("opening /proc/self/ns/net: {e}"))
    });
    match home {
        Ok(fd) => Ok(fd.as_fd()),
        Err(e) => Err(io::Error::other(e.clone())),
    }
}

fn enter(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a valid namespace descriptor; setns moves this thread only.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl NetnsHandle {
    /// The namespace of `fd` (a `/var/run/netns/<pod>` or `/proc/<pid>/ns/net` descriptor,
    /// borrowed: the core takes its own duplicate); checked by entering it once.
    pub fn open(fd: BorrowedFd<'_>, name: &str) -> io::Result<Self> {
        let owned: OwnedFd = fd.try_clone_to_owned()?;
        let inode = inode_of(&owned)?;
        let handle = Self {
            inode,
            name: name.to_string(),
            fd: owned,
        };
        handle
            .run(|| Ok(()))
            .map_err(|e| io::Error::new(e.kind(), format!("setns into {name}: {e}")))?;
        Ok(handle)
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Run `f` on this thread inside the namespace, and come back.
    fn run<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = home()?;
        enter(self.fd.as_fd())?;
        let result = f();
        if let Err(e) = enter(home) {
            // A runtime thread left in a pod's namespace would make every later socket there:
            // nothing sensible can continue.
            log::error!("cannot return from network namespace {}: {e}", self.name);
            std::process::abort();
        }
        result
    }

    /// A TCP socket in this namespace.
    pub fn tcp_socket(&self, domain: Domain) -> io::Result<Socket> {
        self.run(|| new_tcp_socket(domain))
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
