//! Ports: free ones for each server, and whether a server listens yet.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::time::Duration;

use anyhow::{bail, Context};

/// Where the bench's ports come from: below the ephemeral range (so a
/// client's outgoing connection never holds one) and outside appshot's
/// default allocation range 20000-29999 (so a real port appshot hands out
/// never collides with a port the bench picked for a native server).
pub const RANGE: std::ops::RangeInclusive<u16> = 18000..=18999;

pub struct PortPool {
    next: u16,
    given: HashSet<u16>,
}

impl PortPool {
    /// Starts at an offset derived from the PID, so that two benches on one
    /// machine rarely race for the same ports.
    pub fn new() -> PortPool {
        let span = RANGE.len() as u32;
        PortPool {
            next: RANGE.start() + (std::process::id() % span) as u16,
            given: HashSet::new(),
        }
    }

    /// A port no one listens on or has bound, on IPv4 or IPv6, and that
    /// this pool has not handed out before. Every server of a run gets its
    /// own, so a misrouted connection can never reach another
    /// configuration's server and pass for a measurement.
    pub fn take(&mut self) -> anyhow::Result<u16> {
        for _ in 0..RANGE.len() {
            let port = self.next;
            self.next = if port == *RANGE.end() {
                *RANGE.start()
            } else {
                port + 1
            };
            if !self.given.contains(&port) && bindable(port) {
                self.given.insert(port);
                return Ok(port);
            }
        }
        bail!("no free TCP port in {}-{}", RANGE.start(), RANGE.end())
    }
}

fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok()
        && TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).is_ok()
}

/// What a server does on its port once it serves.
#[derive(Clone, Copy, Debug)]
pub enum Serves {
    /// A TCP socket listens on it.
    Tcp,
    /// A UDP socket is bound to it.
    Udp,
}

/// Whether `port` is served as `serves` says, read from /proc/net rather
/// than probed with a connection or a datagram: a probe would be a client
/// of its own to a one-off server such as `iperf3 -s -1`.
pub fn is_serving(port: u16, serves: Serves) -> anyhow::Result<bool> {
    // A listening TCP socket is in state 0A (LISTEN); a bound, unconnected
    // UDP socket in 07 (CLOSE).
    let (tables, state) = match serves {
        Serves::Tcp => (["/proc/net/tcp", "/proc/net/tcp6"], "0A"),
        Serves::Udp => (["/proc/net/udp", "/proc/net/udp6"], "07"),
    };
    for table in tables {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {table}")),
        };
        if ports_in_state(&text, state).any(|p| p == port) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Local ports of the rows of a /proc/net/{tcp,udp}* table in `wanted`.
fn ports_in_state<'a>(table: &'a str, wanted: &'a str) -> impl Iterator<Item = u16> + 'a {
    table.lines().skip(1).filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != wanted {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// Waits until `port` is listened on; `alive` is asked meanwhile so a
/// server that died fails at once with its own reason, not at the timeout.
pub fn wait_listening(
    port: u16,
    timeout: Duration,
    alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    wait_serving(port, Serves::Tcp, timeout, alive)
}

/// Waits until `port` is served as `serves` says; `alive` as for
/// [`wait_listening`].
pub fn wait_serving(
    port: u16,
    serves: Serves,
    timeout: Duration,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let listening = crate::procs::wait_for(timeout, Duration::from_millis(10), || {
        if is_serving(port, serves)? {
            return Ok(Some(()));
        }
        alive()?;
        Ok(None)
    })?;
    if listening.is_none() {
        bail!(
            "nothing serves {serves:?} port {port} after {}s",
            timeout.as_secs()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4650 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:4651 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 00000000000000000000000000000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn only_listening_rows_count() {
        let ports: Vec<u16> = ports_in_state(SAMPLE, "0A").collect();
        assert_eq!(ports, [0x4650, 0x18EB]);
    }

    #[test]
    fn pool_gives_distinct_free_ports_in_range() {
        let mut pool = PortPool::new();
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a, b);
        assert!(RANGE.contains(&a) && RANGE.contains(&b));
    }

    #[test]
    fn a_listener_is_seen_and_its_port_is_not_handed_out() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(is_serving(port, Serves::Tcp).unwrap());
        assert!(!bindable(port));
    }

    #[test]
    fn a_bound_udp_socket_is_seen() {
        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = s.local_addr().unwrap().port();
        assert!(is_serving(port, Serves::Udp).unwrap());
        assert!(!is_serving(port, Serves::Tcp).unwrap());
    }
}
