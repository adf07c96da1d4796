//! Errors of the supervisor and its commands. The binary edge wraps them in
//! `anyhow` for context; each variant names the object it failed on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("building the seccomp filter: {0}")]
    Filter(String),
    #[error("{what}: {error}")]
    Sys { what: String, error: std::io::Error },
    #[error("instance `{name}` did not start: {reason}")]
    Start { name: String, reason: String },
    #[error("instance `{name}` cannot be snapshotted: {reason}")]
    NotSnapshottable { name: String, reason: String },
    #[error("--user {user}: {why}")]
    User { user: String, why: String },
    #[error("snapshot of `{name}` failed: {message}")]
    SnapshotFailed { name: String, message: String },
    #[error("no running instance named `{0}`")]
    NoInstance(String),
    #[error("control socket {path}: {message}")]
    Control { path: PathBuf, message: String },
    #[error("OCI: {0}")]
    Oci(String),
    #[error(transparent)]
    Vpm(#[from] appshot_vpm::VpmError),
    #[error(transparent)]
    Config(#[from] appshot_configurator::ConfigError),
    #[error(transparent)]
    Snapshot(#[from] appshot_snapshot::SnapshotError),
}

impl RuntimeError {
    pub fn sys(what: impl Into<String>, error: impl Into<std::io::Error>) -> Self {
        RuntimeError::Sys {
            what: what.into(),
            error: error.into(),
        }
    }
}
