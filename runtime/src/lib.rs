//! appshot's supervisor and commands as a library; `main.rs` is the
//! command line over it. Modules, by room: the supervisor (`supervisor`,
//! `init`, `filter`, `notify`, `astask`, `pool`, `control`, `restart`,
//! `logs`), the multiplexer (`multiplex`, `sockaddr`, `tree`; datagrams:
//! `cgroup`, `udproutes`), across hosts
//! and outside clients (`remote`, `agent`, `sourcerules`, `netlock`), OCI
//! containers (`oci`), snapshots and templates (`snapshots`, `pending`,
//! `templates`) and the commands
//! the CLI runs (`commands`, `apps`, `systemd`, `user`).
// Denied rather than forbidden: claiming the inherited channel fd in
// `init` is a promise only its caller can make.
#![deny(unsafe_code)]

pub mod agent;
pub mod apps;
mod astask;
mod cgroup;
pub mod commands;
mod control;
pub mod error;
mod filter;
pub mod init;
pub mod logs;
mod multiplex;
pub mod netlock;
mod notify;
pub mod oci;
pub mod pending;
mod pool;
pub mod remote;
pub mod restart;
pub mod snapshots;
mod sockaddr;
pub mod sourcerules;
pub mod supervisor;
pub mod systemd;
pub mod templates;
mod tree;
pub mod udproutes;
pub mod user;

/// Where the registry and instance state live unless `--run-dir` says.
pub const DEFAULT_RUN_DIR: &str = "/run/appshot";

/// `--version`: the crate's version and the commit it was built from
/// (see build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("APPSHOT_COMMIT"),
    ")"
);
