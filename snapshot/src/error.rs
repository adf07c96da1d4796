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
    #[error("{path}: {why}; the image cannot be restored")]
    FileChanged { path: String, why: String },
    #[error("pid {pid}: fd {fd}: TCP connection {local} -> {peer}: {what}: {error}")]
    TcpConnection {
        pid: u32,
        fd: i32,
        local: String,
        peer: String,
        what: &'static str,
        error: std::io::Error,
    },
    #[error("restore: {0}")]
    Restore(String),
    #[error(
        "pid {pid}: snapshot cancelled (its requester went away); the process runs on unchanged"
    )]
    Cancelled { pid: u32 },
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
