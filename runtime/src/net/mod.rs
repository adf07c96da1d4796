//! The network around the multiplexer: clients outside appshot reaching an
//! instance through the kernel's NAT (`sourcerules`), negotiation with other
//! hosts (`remote` the client, `agent` the server), datagrams routed by AID
//! in the kernel (`cgroup`, `udproutes`) and the lock that drops a
//! connection's packets while it is dumped and restored (`netlock`).

pub mod agent;
pub(crate) mod cgroup;
pub mod netlock;
pub mod remote;
pub mod sourcerules;
pub mod udproutes;
