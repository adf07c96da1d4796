//! The network lock: while a dump reads an instance's TCP connections,
//! and from a stopping snapshot until its restore has rebuilt them, the
//! packets of those connections (to and from the instance's real
//! addresses) are dropped by the kernel. The peer sees no answer and
//! retransmits; it never meets a moment without a socket, which would
//! answer with a reset.
//!
//! The rules live in two chains of `table inet appshot` per locked
//! instance, `as_<registry tag>/lock/<name>/in` and `…/out`. A record in
//! `<run dir>/locks/<name>` says who holds them: `dumping <pid> <init pid>
//! <init start time>` (a supervisor in the middle of a dump) or `image
//! <path>` (a stopped snapshot's connections, until that image is
//! restored). Every appshot command removes the locks of dumpers that died
//! (taking the sockets of their instance, if it still runs, out of repair
//! mode) and of images that no longer exist.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use appshot_sys::pidfd;
use nix::sys::socket::{getpeername, getsockname, getsockopt, sockopt, SockType, SockaddrStorage};

use tracing::{info, warn};

use crate::error::chain;
use crate::net::sourcerules::{nft, registry_tag, NftError, TABLE};
use crate::net::to_std;
use crate::tree;

/// Drops packets before conntrack and before the source rules' NAT.
const PRIORITY: i32 = -300;

/// A TCP connection of the instance: (its local address, its peer), real.
pub type Conn = (SocketAddr, SocketAddr);

/// The connections of the instance below `init_pid` (its network
/// namespace is the host's): every connected TCP socket its processes
/// hold, each read through a duplicate of it. (`/proc/PID/net/tcp` walks
/// the host's whole connection hash table again on every read: 2 ms a read
/// here, 10 ms a dump.) A socket whose connection is not complete (no
/// peer yet) is not listed: the dump saves it as reset.
pub fn connections(init_pid: u32) -> Vec<Conn> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for pid in tree::descendants(init_pid) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let Ok(pidfd) = pidfd::open_process(pid) else {
            continue;
        };
        for entry in fds.flatten() {
            let socket = std::fs::read_link(entry.path())
                .ok()
                .and_then(|l| tree::socket_inode(&l.to_string_lossy()));
            if !socket.is_some_and(|inode| seen.insert(inode)) {
                continue;
            };
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<RawFd>().ok())
            else {
                continue;
            };
            // Closed meanwhile, or not ours to read: nothing to lock.
            if let Ok(socket) = pidfd::get_fd(&pidfd, fd) {
                out.extend(tcp_connection(&socket));
            }
        }
    }
    out
}

/// (local, peer) of a connected TCP socket.
fn tcp_connection(socket: &OwnedFd) -> Option<Conn> {
    let stream = getsockopt(socket, sockopt::SockType).ok()? == SockType::Stream;
    let local = getsockname::<SockaddrStorage>(socket.as_raw_fd()).ok()?;
    let local = to_std(&local)?;
    if !stream {
        return None;
    }
    let peer = getpeername::<SockaddrStorage>(socket.as_raw_fd()).ok()?;
    Some((local, to_std(&peer)?))
}

fn chains(run_dir: &Path, name: &str) -> [String; 2] {
    let tag = registry_tag(run_dir);
    ["in", "out"].map(|d| format!("as_{tag}/lock/{name}/{d}"))
}

/// An IPv4-mapped address as the IPv4 address its packets carry.
fn on_wire(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// A rule matching packets from `src` to `dst`.
fn matcher(src: SocketAddr, dst: SocketAddr) -> String {
    let family = if src.is_ipv4() { "ip" } else { "ip6" };
    format!(
        "{family} saddr {} {family} daddr {} tcp sport {} tcp dport {} drop",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
}

/// Adds the chains: packets coming to the instance's end of each
/// connection are dropped on input, those leaving it on output.
fn lock_script(chains: &[String; 2], conns: &[Conn]) -> String {
    let mut s = format!("add table {TABLE}\n");
    for (chain, hook) in chains.iter().zip(["input", "output"]) {
        let _ = writeln!(
            s,
            "add chain {TABLE} {chain} {{ type filter hook {hook} priority {PRIORITY} ; policy accept ; }}"
        );
        let _ = writeln!(s, "flush chain {TABLE} {chain}");
        // A restore's forged segments (the FIN of a half-closed connection).
        let _ = writeln!(
            s,
            "add rule {TABLE} {chain} meta mark {:#x} accept",
            appshot_sys::tcprepair::INJECT_MARK
        );
        for &(local, peer) in conns {
            let (local, peer) = (on_wire(local), on_wire(peer));
            let rule = if hook == "input" {
                matcher(peer, local)
            } else {
                matcher(local, peer)
            };
            let _ = writeln!(s, "add rule {TABLE} {chain} {rule}");
        }
    }
    s
}

fn unlock_script(chains: &[String; 2]) -> String {
    let mut s = format!("add table {TABLE}\n");
    for chain in chains {
        let _ = writeln!(s, "add chain {TABLE} {chain}");
        let _ = writeln!(s, "delete chain {TABLE} {chain}");
    }
    s
}

fn record(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("locks").join(name)
}

/// Why an instance's connections could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("recording the lock in {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Nft(#[from] NftError),
}

/// The lock of one instance's connections, held by the dumping
/// supervisor. Dropped, it is removed; [`Lock::hold_for`] hands it to an
/// image instead.
pub struct Lock {
    run_dir: PathBuf,
    name: String,
}

impl Lock {
    /// Locks `conns` of instance `name`, whose namespace init is
    /// `init_pid`; `None` when there are none.
    pub fn take(
        run_dir: &Path,
        name: &str,
        init_pid: u32,
        conns: &[Conn],
    ) -> Result<Option<Lock>, LockError> {
        if conns.is_empty() {
            return Ok(None);
        }
        let path = record(run_dir, name);
        let holder = format!(
            "dumping {} {init_pid} {}\n",
            std::process::id(),
            start_time(init_pid).unwrap_or(0)
        );
        std::fs::create_dir_all(path.parent().expect("in a directory"))
            .and_then(|()| std::fs::write(&path, holder))
            .map_err(|source| LockError::Record {
                path: path.clone(),
                source,
            })?;
        let lock = Lock {
            run_dir: run_dir.to_path_buf(),
            name: name.to_string(),
        };
        nft(&lock_script(&chains(run_dir, name), conns))?;
        info!(instance = %name, connections = conns.len(), "network lock taken");
        Ok(Some(lock))
    }

    /// Keeps the rules after this process: the instance stopped and its
    /// connections wait, locked, for the restore of `image`.
    pub fn hold_for(self, image: &Path) {
        let path = record(&self.run_dir, &self.name);
        let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
        if let Err(e) = std::fs::write(&path, format!("image {}\n", image.display())) {
            warn!(instance = %self.name, "{}: {e}; the network lock goes now", path.display());
            return;
        }
        std::mem::forget(self);
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        remove(&self.run_dir, &self.name);
    }
}

fn remove(run_dir: &Path, name: &str) {
    match nft(&unlock_script(&chains(run_dir, name))) {
        Ok(()) => info!(instance = %name, "network lock removed"),
        Err(e) => warn!(instance = %name, "removing the network lock: {}", chain(&e)),
    }
    let _ = std::fs::remove_file(record(run_dir, name));
}

/// Removes the locks held for `image` (restored now, its connections
/// rebuilt or given up).
pub fn release_image(run_dir: &Path, image: &Path) {
    let image = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    for (name, holder) in records(run_dir) {
        if holder.strip_prefix("image ").map(Path::new) == Some(image.as_path()) {
            remove(run_dir, &name);
        }
    }
}

/// Removes the locks of dumps whose supervisor died and of images that
/// no longer exist.
pub fn sweep(run_dir: &Path) {
    for (name, holder) in records(run_dir) {
        if stale(&holder) {
            warn!(instance = %name, "removing a stale network lock ({holder})");
            if let Some(init) = abandoned_instance(&holder) {
                resume_sockets(init);
            }
            remove(run_dir, &name);
        }
    }
}

/// The start time (in clock ticks after boot) of `pid`, which tells it
/// from a later process that reuses its number.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised name; starttime is the 22nd field.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The namespace init of an instance whose dumping supervisor died, if it
/// still runs: its TCP sockets may still be in repair mode.
fn abandoned_instance(holder: &str) -> Option<u32> {
    let mut f = holder.strip_prefix("dumping ")?.split_whitespace().skip(1);
    let init: u32 = f.next()?.parse().ok()?;
    let started: u64 = f.next()?.parse().ok()?;
    (start_time(init) == Some(started)).then_some(init)
}

/// Takes every TCP socket of the instance below `init` out of repair mode
/// (a no-op on those that are not), sending nothing.
fn resume_sockets(init: u32) {
    for pid in tree::descendants(init) {
        let Ok(pidfd) = appshot_sys::pidfd::open_thread(pid) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_socket = std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:["));
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if is_socket {
                if let Ok(sock) = appshot_sys::pidfd::get_fd(&pidfd, n) {
                    // Not TCP, or not ours to change: nothing to undo.
                    let _ = appshot_sys::tcprepair::repair_off(&sock, false);
                }
            }
        }
    }
}

/// Whether the holder a lock record names is gone: a dumping supervisor
/// that died, an image that no longer exists, or a record not ours.
fn stale(holder: &str) -> bool {
    if let Some(pid) = holder.strip_prefix("dumping ") {
        pid.parse::<u32>()
            .map_or(true, |p| !Path::new(&format!("/proc/{p}")).exists())
    } else if let Some(image) = holder.strip_prefix("image ") {
        !Path::new(image).exists()
    } else {
        true
    }
}

fn records(run_dir: &Path) -> Vec<(String, String)> {
    let Ok(dir) = std::fs::read_dir(run_dir.join("locks")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let holder = std::fs::read_to_string(e.path()).ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                holder.trim().to_string(),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ends of a connection made here are found through this
    /// process's fds; a listener and a UDP socket are not connections.
    #[test]
    fn connected_tcp_sockets_are_found_through_the_processes_fds() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(server).unwrap();
        let found = connections(std::process::id());
        let ours = |c: &Conn| c.0 == server || c.1 == server || c.0 == udp.local_addr().unwrap();
        let mut mine: Vec<Conn> = found.into_iter().filter(ours).collect();
        mine.sort();
        let mut expected = vec![
            (client.local_addr().unwrap(), server),
            (server, client.local_addr().unwrap()),
        ];
        expected.sort();
        assert_eq!(mine, expected);
        drop(accepted);
    }

    #[test]
    fn locks_of_dead_dumpers_and_missing_images_are_stale() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        assert!(stale(&format!("dumping {dead}")));
        assert!(!stale(&format!("dumping {}", std::process::id())));
        let image = tempfile::NamedTempFile::new().unwrap();
        assert!(!stale(&format!("image {}", image.path().display())));
        assert!(stale("image /nonexistent/appshot.img"));
        assert!(stale("something else"));
    }

    #[test]
    fn an_abandoned_instance_is_known_by_pid_and_start_time() {
        let me = std::process::id();
        let started = start_time(me).unwrap();
        assert_eq!(
            abandoned_instance(&format!("dumping 1 {me} {started}")),
            Some(me)
        );
        assert_eq!(
            abandoned_instance(&format!("dumping 1 {me} {}", started + 1)),
            None
        );
        assert_eq!(abandoned_instance("image /x.img"), None);
    }

    #[test]
    fn the_lock_drops_each_direction_at_the_instance_end() {
        let chains = ["c/in".to_string(), "c/out".to_string()];
        let local: SocketAddr = "[::ffff:127.0.0.1]:20000".parse().unwrap();
        let s = lock_script(&chains, &[(local, "127.0.0.1:40000".parse().unwrap())]);
        assert!(s.contains("add chain inet appshot c/in { type filter hook input priority -300"));
        assert!(s.contains("add rule inet appshot c/in ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport 40000 tcp dport 20000 drop"));
        assert!(s.contains("add rule inet appshot c/out ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp sport 20000 tcp dport 40000 drop"));
    }
}
