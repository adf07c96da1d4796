//! The network around the multiplexer: clients outside appshot reaching an
//! instance through the kernel's NAT (`sourcerules`), negotiation with other
//! hosts (`remote` the client, `agent` the server), datagrams routed by AID
//! in the kernel (`cgroup`, `udproutes`), connects and names routed by the
//! kernel for the instances that leave them to it (`connroutes`), and the lock that drops a
//! connection's packets while it is dumped and restored (`netlock`).

pub mod agent;
pub(crate) mod cgroup;
pub mod connroutes;
#[cfg(test)]
mod fixtures;
pub mod netlock;
pub mod remote;
pub mod sourcerules;
pub mod udproutes;

/// An IPv4 or IPv6 socket address as std's; `None` for other families.
pub fn to_std(s: &nix::sys::socket::SockaddrStorage) -> Option<std::net::SocketAddr> {
    use std::net::SocketAddr;
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}
