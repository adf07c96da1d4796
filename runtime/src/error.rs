//! Errors of the supervisor and its commands. The binary edge wraps them in
//! `anyhow` for context; each variant names the object it failed on.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use libseccomp::ScmpArch;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{what}: {error}")]
    Sys { what: String, error: std::io::Error },
    #[error("{op} {path}")]
    File {
        op: FileOp,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("instance `{name}` did not start: {reason}")]
    Start { name: String, reason: String },
    /// The settings of cross-host negotiation or source rules, or the
    /// cluster key, are not usable: a `net::remote::ClusterError`, boxed so
    /// that this module, which every room uses, depends on none of them.
    #[error("instance `{name}` did not start")]
    Cluster {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("instance `{name}`: `{program}` {}", if *.status == 127 { "not found" } else { "cannot be executed" })]
    Exec {
        name: String,
        program: String,
        status: i32,
    },
    #[error("appshot {command} needs root, or the capabilities {missing}: it makes PID and mount namespaces for the instance (CAP_SYS_ADMIN) and reads and writes its processes' descriptors and memory (CAP_SYS_PTRACE)")]
    NotPrivileged { command: String, missing: String },
    #[error("instance `{name}` cannot be snapshotted: {reason}")]
    NotSnapshottable { name: String, reason: String },
    #[error("--user {user}: {why}")]
    User { user: String, why: String },
    #[error("snapshot of `{name}` interrupted: no image was written{}", if *leave_running { "; the instance runs on" } else { "; the instance was left running" })]
    SnapshotInterrupted { name: String, leave_running: bool },
    #[error("instance `{name}`: no incremental snapshot on parent image {}", parent.display())]
    ParentRefused {
        name: String,
        parent: PathBuf,
        #[source]
        source: Box<appshot_snapshot::SnapshotError>,
    },
    #[error("snapshot of `{name}` failed: {message}")]
    SnapshotFailed { name: String, message: String },
    #[error("template `{name}` holds another image, {}: remove it with `appshot template rm {name}` or clone from a file of another name", image.display())]
    TemplateName { name: String, image: PathBuf },
    #[error("no template named `{0}` (`appshot templates` lists them)")]
    NoTemplate(String),
    #[error("no running instance named `{0}`")]
    NoInstance(String),
    #[error("instance `{0}` is running: stop it first")]
    StillRunning(String),
    #[error("no logs of an instance named `{0}` (only detached instances keep them)")]
    NoLogs(String),
    #[error("{} is claimed by two application configs: {} and {}", executable.display(), first.display(), second.display())]
    AppClaimedTwice {
        executable: PathBuf,
        first: PathBuf,
        second: PathBuf,
    },
    /// The supervisor answered, refusing; `message` is its reason.
    #[error("control socket {path}: {message}")]
    Control { path: PathBuf, message: String },
    #[error("control socket {path}: {step}")]
    ControlIo {
        path: PathBuf,
        step: ControlStep,
        #[source]
        error: std::io::Error,
    },
    #[error("control socket {path}: bad reply")]
    ControlReply {
        path: PathBuf,
        #[source]
        error: serde_json::Error,
    },
    #[error("control socket {path}: the supervisor closed the connection without a reply")]
    ControlClosed { path: PathBuf },
    #[error("instance `{name}` still running {}s after SIGKILL", after.as_secs())]
    StopTimedOut {
        name: String,
        after: std::time::Duration,
    },
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
    /// The CLI's exit status for this error, as podman's: 126 and 127 when
    /// the command could not be executed or found, 125 for appshot's own
    /// errors.
    pub fn exit_status(&self) -> u8 {
        match self {
            RuntimeError::Exec { status, .. } => *status as u8,
            // As a command ended by SIGINT: 128 + 2.
            RuntimeError::SnapshotInterrupted { .. } => 130,
            _ => 125,
        }
    }

    pub fn file(op: FileOp, path: &Path, error: impl Into<std::io::Error>) -> Self {
        RuntimeError::File {
            op,
            path: path.to_path_buf(),
            error: error.into(),
        }
    }

    pub fn sys(what: impl Into<String>, error: impl Into<std::io::Error>) -> Self {
        RuntimeError::Sys {
            what: what.into(),
            error: error.into(),
        }
    }
}

/// What was done to the file or directory of a [`RuntimeError::File`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileOp {
    #[error("binding")]
    Bind,
    #[error("chmod")]
    Chmod,
    #[error("chown")]
    Chown,
    #[error("creating")]
    Create,
    #[error("locking")]
    Lock,
    #[error("opening")]
    Open,
    #[error("reading")]
    Read,
    #[error("removing")]
    Remove,
    #[error("moving")]
    Rename,
    #[error("writing")]
    Write,
}

/// What a request over a control socket was doing when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlStep {
    #[error("connecting")]
    Connect,
    #[error("sending the request")]
    Send,
    #[error("reading the reply")]
    Receive,
}

/// Why the filter was not built.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("building the seccomp filter")]
    Seccomp(#[source] libseccomp::error::SeccompError),
    #[error(
        "building the seccomp filter: unsupported architecture {0:?}: appshot supports x86_64 only"
    )]
    Architecture(ScmpArch),
    #[error("exporting the seccomp filter")]
    Export(#[source] std::io::Error),
}

/// The error and its sources, for a log line or a reason sent as text.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_error_says_what_was_done_to_which_path_then_why() {
        let e = RuntimeError::file(
            FileOp::Write,
            Path::new("/run/appshot/instances/web/state"),
            std::io::ErrorKind::PermissionDenied,
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(
            chain(&e),
            "writing /run/appshot/instances/web/state: permission denied"
        );
    }
}
