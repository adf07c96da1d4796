//! The object kinds a snapshot holds, one module each, with its save and
//! its restore side by side (firecracker's `Persist` per component is the
//! model): `dump` and `restore` orchestrate, the kinds know their objects.

pub mod creds;
pub mod sysv;
pub mod tree;
pub mod unix;
