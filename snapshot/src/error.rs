use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("image {path} is {what}, not a regular file")]
    NotRegularFile { path: PathBuf, what: &'static str },
    #[error("image {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("image {path} has format version {found}; this appshot reads version {supported}")]
    Version {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("encoding the manifest: {0}")]
    Encode(String),
    #[error("pid {pid}: {what}: {error}")]
    Process {
        pid: u32,
        what: String,
        error: std::io::Error,
    },
    #[error("pid {pid}: reading /proc/{pid}/status")]
    Status {
        pid: u32,
        #[source]
        error: procfs::ProcError,
    },
    #[error("pid {pid}: {what}")]
    Unsupported { pid: u32, what: String },
    /// A file descriptor of a kind, or in a state, the dump cannot save.
    #[error("pid {pid}: fd {fd}: {what}")]
    UnsupportedFd { pid: u32, fd: i32, what: String },
    /// A call on one of the process's file descriptors failed.
    #[error("pid {pid}: fd {fd}: {call}")]
    FdCall {
        pid: u32,
        fd: i32,
        call: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("{path}: {why}; the image cannot be restored")]
    FileChanged { path: String, why: String },
    #[error("pid {pid}: fd {fd}: TCP connection {local} -> {peer}: {what}")]
    TcpConnection {
        pid: u32,
        fd: i32,
        local: String,
        peer: String,
        what: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("no process to dump")]
    NoProcess,
    /// The parent of an incremental image is missing, corrupt or
    /// otherwise unreadable.
    #[error("image {image}: its parent image {parent} cannot be used")]
    ParentUnusable {
        image: PathBuf,
        parent: PathBuf,
        #[source]
        source: Box<SnapshotError>,
    },
    /// The file at the parent's path is not the image the child was taken
    /// on: replaced by another image, or rewritten.
    #[error("image {image}: its parent image {parent} was replaced since (it holds another snapshot than the one the child was taken on)")]
    ParentReplaced { image: PathBuf, parent: PathBuf },
    #[error("image {image}: a chain of more than {max} images (merge it with `appshot merge`)")]
    ChainTooLong { image: PathBuf, max: usize },
    #[error(
        "pid {pid}: snapshot cancelled (its requester went away); the process runs on unchanged"
    )]
    Cancelled { pid: u32 },
}

/// Why a restore failed, naming the object of the image or of the process
/// being rebuilt that it failed on.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Parts of an image that passed its checksums do not agree.
    #[error("restore: the image {what}")]
    Image { what: String },
    /// A stub forked to restore into is not as a stub should be.
    #[error("restore: stub {pid}: {what}")]
    Stub { pid: u32, what: String },
    #[error("restore: process {pid}: {what}")]
    Process { pid: u32, what: String },
    #[error("restore: thread {tid}: {what}")]
    Thread { tid: u32, what: String },
    /// `what` is "thread" or "process"; `id` its PID in the image.
    #[error("restore: clone3 of {what} {id}")]
    Clone {
        what: &'static str,
        id: u32,
        #[source]
        error: std::io::Error,
    },
    #[error("restore: fd {fd}: {what}")]
    Fd { fd: i32, what: String },
    #[error("restore: fd {fd}: bad address {addr}")]
    BadAddress { fd: i32, addr: String },
    /// The supervisor did not take on a restored listening socket.
    #[error("restore: fd {fd}: TCP socket for {addr}")]
    Listen {
        fd: i32,
        addr: SocketAddr,
        #[source]
        error: ListenError,
    },
    /// The supervisor did not bind a restored UDP socket.
    #[error("restore: fd {fd}: UDP socket for {addr}")]
    Udp {
        fd: i32,
        addr: SocketAddr,
        #[source]
        error: ListenError,
    },
    #[error("restore: unix socket {ino}: {what}")]
    UnixSocket { ino: u64, what: String },
    #[error("restore: {path}: {what}")]
    Path { path: String, what: String },
    #[error("restore: mapping {start:#x}-{end:#x}: {what}")]
    Mapping { start: u64, end: u64, what: String },
    /// What a lazy restore cannot serve.
    #[error("restore --lazy: {0}")]
    Lazy(String),
    #[error("restore: System V {kind} object {id}: {what}")]
    SysV {
        kind: &'static str,
        id: i32,
        what: String,
    },
    #[error("restore: the image holds System V IPC objects but the restored instance shares the host's IPC namespace")]
    HostIpcNamespace,
    #[error("restore: the System V IPC thread panicked")]
    SysVThreadPanicked,
    #[error("restore: no free address for the scratch mapping")]
    NoScratchAddress,
}

/// Why the supervisor could not take on a restored listening or UDP socket
/// ([`crate::restore::RestoreHooks::listen`], `bind_udp`).
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("real port {real_port} (virtual port {virtual_port}) is taken; its connections cannot come back (restore with --tcp-close to drop them)")]
    RealPortTaken { real_port: u16, virtual_port: u16 },
    #[error("no real port free for virtual port {virtual_port} in {start}-{end}")]
    NoRealPort {
        virtual_port: u16,
        start: u16,
        end: u16,
    },
    #[error("{call} on the socket for port {port}")]
    Socket {
        call: &'static str,
        port: u16,
        #[source]
        error: std::io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        SnapshotError::Io {
            path: path.to_path_buf(),
            error,
        }
    }

    pub(crate) fn corrupt(path: &Path, why: &str) -> Self {
        SnapshotError::Corrupt {
            path: path.to_path_buf(),
            why: why.to_string(),
        }
    }

    pub(crate) fn fd_call(
        pid: u32,
        fd: i32,
        call: &'static str,
        error: impl Into<std::io::Error>,
    ) -> Self {
        SnapshotError::FdCall {
            pid,
            fd,
            call,
            error: error.into(),
        }
    }

    pub(crate) fn process(
        pid: u32,
        what: impl Into<String>,
        error: impl Into<std::io::Error>,
    ) -> Self {
        SnapshotError::Process {
            pid,
            what: what.into(),
            error: error.into(),
        }
    }
}
