//! Snapshot and restore of a supervised instance's process: freeze with
//! ptrace, dump through /proc and injected syscalls, write a checked image,
//! and rebuild the process from it.
#![forbid(unsafe_code)]

pub mod dump;
pub mod error;
pub mod holder;
pub mod image;
pub mod kinds;
pub mod lazy;
pub mod precopy;
pub mod proc;
pub mod ptrace;
pub mod regs;
pub mod restore;

pub use error::{ListenError, RestoreError, SnapshotError};
