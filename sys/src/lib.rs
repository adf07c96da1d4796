//! The one thin layer of raw syscalls appshot needs that `nix` does not wrap.
//!
//! Every `unsafe` block of the project lives in this crate, each with a
//! `// SAFETY:` comment. Functions return `std::io::Result` carrying the raw
//! errno, so callers can hand the exact error back to a supervised
//! application.

pub mod abi;
pub mod counter;
pub mod creds;
pub mod fd;
pub mod handle;
pub mod net;
pub mod pidfd;
pub mod ptrace;
pub mod seccomp;
pub mod sockdiag;
pub mod spawn;
pub mod sysv;
pub mod tcprepair;
pub mod timerfd;
pub mod udpbpf;
pub mod uffd;
