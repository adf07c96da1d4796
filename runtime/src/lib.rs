//! appshot's supervisor and commands as a library; `main.rs` is the
//! command line over it (parsing and printing, with `cli/` for the
//! detached supervisors and clones only the binary starts).
//!
//! Rooms, each depending only on those listed before it:
//! - `error`, `tree`: the crate's error (each room's failures, named by
//!   object) and an instance's processes and sockets as /proc shows them.
//! - `seccomp/`: the filter, the notification listener loop, calls made as
//!   the notifying task, the worker pool. Knows nothing of ports.
//! - `net/`: source rules (nftables NAT for outside clients), negotiation
//!   with other hosts (client and agent), datagram routes by AID (cgroups,
//!   BPF), the network lock of a dump.
//! - `multiplex/`: bind/connect/name policy behind a seam in front of the
//!   kernel, and its real side.
//! - `supervisor/`: one per instance: launch and namespace init, control
//!   socket, snapshots it takes, restarts, logs, `--user`, the template
//!   holders clones are forked from.
//! - `oci/` (appshot as an OCI runtime's seccomp agent) and `commands/`
//!   (`ps`, `ports`, `stop`, app configs, systemd units): the top.
// Denied rather than forbidden: claiming the inherited channel fd in
// `init` is a promise only its caller can make.
#![deny(unsafe_code)]

pub mod commands;
pub mod error;
mod multiplex;
pub mod net;
pub mod oci;
mod seccomp;
pub mod supervisor;
mod tree;

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
