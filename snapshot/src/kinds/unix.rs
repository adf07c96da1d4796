//! Unix sockets of one process, saved and restored side by side.
//!
//! Only sockets whose every peer is in the process can be rebuilt, so the
//! whole set is judged at once: `sock_diag` names each socket's peer and a
//! listener's pending clients, and anything leading outside is refused
//! before the process is touched. A later process's socket connected to
//! one of this process's (or waiting on its listener) is in the set too,
//! stashed at a high fd (`tree::FdTable`): read from the process that
//! holds it, rebuilt here, and fetched by that process on restore. Queued bytes are peeked without being
//! consumed (`SO_PEEK_OFF` walks the queue, as CRIU does) and sent again by
//! the peer on restore. Restore runs in the stub before its seccomp filter
//! exists, so binds and connects there are the kernel's own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use appshot_sys::abi;
use appshot_sys::net::{get_int_opt, set_int_opt};
use appshot_sys::sockdiag::{self, UnixDiag};
use nix::sys::socket::{getsockopt, recvmsg, sockopt, ControlMessageOwned, MsgFlags, UnixAddr};

use super::Stub;
use crate::error::{RestoreError, SnapshotError};
use crate::image::model::{FdImage, FdKind, UnixFile, UnixName, UnixRole, UnixSocket};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// Largest message peeked; a restore writes each one from its scratch
/// area in one call.
const MAX_MESSAGE: usize = 512 * 1024;
/// More queued bytes than any socket buffer holds means the walk is lost.
const MAX_QUEUE: usize = 64 << 20;

/// A Unix socket fd of the process (the lowest of those sharing its open
/// file description), with a duplicate of it; or a socket of a later
/// process stashed at `fd` in this one, whose `holder` (host PID, fd)
/// takes it from there.
pub struct Found {
    pub fd: i32,
    pub inode: u64,
    pub flags: i32,
    pub sock: OwnedFd,
    pub holder: Option<(u32, i32)>,
}

fn type_name(t: i32) -> &'static str {
    match t {
        libc::SOCK_STREAM => "stream",
        libc::SOCK_DGRAM => "datagram",
        libc::SOCK_SEQPACKET => "seqpacket",
        _ => "unknown-type",
    }
}

fn show_name(name: Option<&[u8]>) -> String {
    match name {
        None | Some([]) => "unnamed".into(),
        Some([0, rest @ ..]) => format!("@{}", String::from_utf8_lossy(rest)),
        Some(p) => String::from_utf8_lossy(p).into_owned(),
    }
}

/// A path name as `sock_diag` reports it may carry the terminating NUL.
fn diag_name(d: &UnixDiag) -> Option<Vec<u8>> {
    let mut n = d.name.clone().filter(|n| !n.is_empty())?;
    if n[0] != 0 {
        while n.last() == Some(&0) {
            n.pop();
        }
    }
    Some(n)
}

/// Saves every Unix socket of process `pid` (its own and those stashed in
/// it), or refuses naming the first that leads outside them, by the PID
/// and fd that hold it. `holders`: where each socket of the instance is
/// held (host PID, fd), to name a peer in another process. With
/// `external_close`, one connected to a peer outside the instance is saved
/// as closed ([`UnixRole::Closed`]) instead.
pub fn save(
    pid: u32,
    found: Vec<Found>,
    holders: &HashMap<u64, (u32, i32)>,
    external_close: bool,
) -> Result<Vec<(i32, FdKind)>, SnapshotError> {
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let all = sockdiag::unix_sockets()
        .map_err(|e| SnapshotError::process(pid, "sock_diag of Unix sockets", e))?;
    let diag: HashMap<u64, &UnixDiag> = all.iter().map(|d| (d.ino, d)).collect();
    let ours: HashMap<u64, i32> = found.iter().map(|f| (f.inode, f.fd)).collect();
    let mut pending_of: HashMap<u64, u64> = HashMap::new();
    for f in &found {
        if let Some(d) = diag.get(&f.inode).filter(|d| d.state == TCP_LISTEN) {
            for &c in &d.icons {
                pending_of.insert(c, f.inode);
            }
        }
    }
    let stashed: HashSet<u64> = found
        .iter()
        .filter(|f| f.holder.is_some())
        .map(|f| f.inode)
        .collect();
    let held_at: HashMap<u64, (u32, i32)> = found
        .iter()
        .map(|f| (f.inode, f.holder.unwrap_or((pid, f.fd))))
        .collect();
    let mut out = Vec::new();
    for f in found {
        // Refusals and errors name the process and fd that hold the socket.
        let (rpid, rfd) = f.holder.unwrap_or((pid, f.fd));
        let d = diag.get(&f.inode).copied().ok_or_else(|| {
            refuse(
                rpid,
                rfd,
                "unix socket the kernel's sock_diag does not list",
            )
        })?;
        let sock_type = i32::from(d.sock_type);
        let what = format!("unix {} socket", type_name(sock_type));
        let refuse_it = |why: String| refuse(rpid, rfd, &format!("{what} {why}"));
        if !matches!(
            sock_type,
            libc::SOCK_STREAM | libc::SOCK_DGRAM | libc::SOCK_SEQPACKET
        ) {
            return Err(refuse_it("of a type that cannot be saved".into()));
        }
        if d.shutdown != 0 {
            return Err(refuse_it(
                "that is shut down (by itself or a closed peer)".into(),
            ));
        }
        let name = diag_name(d);
        let peer_name = |p: u64| show_name(diag.get(&p).and_then(|d| diag_name(d)).as_deref());
        let role = if d.state == TCP_LISTEN {
            if let Some(c) = d.icons.iter().find(|c| !ours.contains_key(c)) {
                return Err(refuse_it(format!(
                    "listening on {} has a pending connection from a client outside the \
                     instance (socket {c})",
                    show_name(name.as_deref())
                )));
            }
            UnixRole::Listening {
                backlog: d.rqlen.map_or(128, |r| r.1),
                pending: d.icons.clone(),
            }
        } else if let Some(&listener) = pending_of.get(&f.inode) {
            // Its peer is the not yet accepted socket, which no fd holds.
            if let Some((_, sent)) = d.rqlen.filter(|r| r.1 != 0) {
                return Err(refuse_it(format!(
                    "has sent {sent} bytes on a connection its listener (fd {} of pid {pid}) \
                     has not accepted yet",
                    ours[&listener]
                )));
            }
            UnixRole::Pending { listener }
        } else if let Some((l, (hpid, hfd))) = all
            .iter()
            .filter(|l| l.state == TCP_LISTEN && l.icons.contains(&f.inode))
            .find_map(|l| holders.get(&l.ino).map(|h| (l, *h)))
        {
            // Its listener is in a later process: rebuilt after this one.
            return Err(refuse_it(format!(
                "waits in the backlog of listener {} (socket {}) held by pid {hpid} fd {hfd} of \
                 the instance, a process restored after it, which a restore cannot rebuild yet",
                show_name(diag_name(l).as_deref()),
                l.ino
            )));
        } else if let Some(p) = d.peer.filter(|p| *p != 0) {
            if ours.contains_key(&p) {
                let accepted_from = if sock_type == libc::SOCK_DGRAM {
                    None
                } else {
                    name.as_ref().and_then(|n| {
                        all.iter()
                            .find(|l| {
                                l.state == TCP_LISTEN
                                    && ours.contains_key(&l.ino)
                                    && diag_name(l).as_ref() == Some(n)
                            })
                            .map(|l| l.ino)
                    })
                };
                UnixRole::Connected {
                    peer: p,
                    accepted_from,
                }
            } else if let Some((hpid, hfd)) = holders.get(&p) {
                // A peer connected back in another process was stashed
                // here; one that is not (a datagram socket connected one
                // way to another process's socket) is not rebuilt yet.
                return Err(refuse_it(format!(
                    "connected one way to socket {p} ({}) held by pid {hpid} fd {hfd} of the \
                     instance, which a restore cannot rebuild yet",
                    peer_name(p)
                )));
            } else if external_close {
                UnixRole::Closed
            } else {
                return Err(refuse_it(format!(
                    "connected to a peer outside the instance ({}); `appshot snapshot \
                     --external-unix close` saves it closed",
                    peer_name(p)
                )));
            }
        } else if sock_type != libc::SOCK_DGRAM && d.state == TCP_ESTABLISHED {
            // A closed peer would have shut it down: this one waits in the
            // backlog of a listener elsewhere.
            return Err(refuse_it(
                "waiting to be accepted by a listener outside the instance".into(),
            ));
        } else {
            UnixRole::Unconnected
        };
        if let UnixRole::Connected { peer, .. } = role {
            let mutual = diag.get(&peer).and_then(|p| p.peer) == Some(f.inode);
            let peer_named = diag.get(&peer).and_then(|p| diag_name(p)).is_some();
            if !mutual && !peer_named {
                return Err(refuse_it(
                    "connected to an unnamed socket that is not connected back".into(),
                ));
            }
            // A connection split across processes is rebuilt here as a
            // socketpair unless this process also holds the listener that
            // accepted it; a name would be lost.
            let accepted_here = matches!(
                role,
                UnixRole::Connected {
                    accepted_from: Some(_),
                    ..
                }
            );
            let split = f.holder.is_some() || stashed.contains(&peer);
            if split && sock_type != libc::SOCK_DGRAM && name.is_some() && !accepted_here {
                let (ppid, pfd) = held_at.get(&peer).copied().unwrap_or((pid, 0));
                return Err(refuse_it(format!(
                    "named {} (accepted from a listener of that name, or bound) and connected to \
                     socket {peer} held by pid {ppid} fd {pfd}, which does not hold the listener \
                     that accepted it (the name would be lost); a restore cannot rebuild it yet",
                    show_name(name.as_deref())
                )));
            }
        }
        // A stream or seqpacket socket has a queue only once connected
        // (recv refuses with EINVAL before).
        let queue = if role == UnixRole::Closed
            || (sock_type != libc::SOCK_DGRAM && d.state != TCP_ESTABLISHED)
        {
            Vec::new()
        } else {
            peek_queue(rpid, rfd, &f.sock, sock_type)?
        };
        let mutual = match role {
            UnixRole::Connected { peer, .. } => {
                diag.get(&peer).and_then(|p| p.peer) == Some(f.inode)
            }
            _ => false,
        };
        if !queue.is_empty() && !mutual {
            return Err(refuse_it(format!(
                "has {} queued message(s) from senders a restore cannot stand in for",
                queue.len()
            )));
        }
        let name = match name {
            None => None,
            Some(n) => {
                let file = if n[0] == 0 {
                    None
                } else {
                    let cwd = std::fs::read_link(format!("/proc/{rpid}/cwd"))
                        .map_err(|e| SnapshotError::process(rpid, "reading cwd", e))?;
                    Some(socket_file(rpid, &cwd, &n, d).map_err(&refuse_it)?)
                };
                Some(UnixName { sun_path: n, file })
            }
        };
        let opt = |what: &str, e: nix::errno::Errno| {
            SnapshotError::process(rpid, format!("{what} of fd {rfd}"), e)
        };
        let int_opt = |what: &str, o| {
            get_int_opt(&f.sock, libc::SOL_SOCKET, o)
                .map_err(|e| SnapshotError::process(rpid, format!("{what} of fd {rfd}"), e))
        };
        out.push((
            f.fd,
            FdKind::Unix(UnixSocket {
                inode: f.inode,
                sock_type,
                flags: f.flags,
                name,
                role,
                passcred: getsockopt(&f.sock, sockopt::PassCred)
                    .map_err(|e| opt("SO_PASSCRED", e))?,
                sndbuf: getsockopt(&f.sock, sockopt::SndBuf).map_err(|e| opt("SO_SNDBUF", e))?
                    as i32,
                rcvbuf: getsockopt(&f.sock, sockopt::RcvBuf).map_err(|e| opt("SO_RCVBUF", e))?
                    as i32,
                peek_off: int_opt("SO_PEEK_OFF", libc::SO_PEEK_OFF)?,
                queue,
            }),
        ));
    }
    Ok(out)
}

/// One line for `appshot inspect`.
pub fn describe(s: &UnixSocket) -> String {
    let name = show_name(s.name.as_ref().map(|n| n.sun_path.as_slice()));
    let role = match &s.role {
        UnixRole::Unconnected => "unconnected".to_string(),
        UnixRole::Listening { pending, .. } => {
            format!("listening, {} pending", pending.len())
        }
        UnixRole::Connected { peer, .. } => format!("connected to socket {peer}"),
        UnixRole::Pending { listener } => format!("pending on socket {listener}"),
        UnixRole::Closed => "closed (its peer was outside the instance)".to_string(),
    };
    let queued: usize = s.queue.iter().map(Vec::len).sum();
    format!(
        "unix {} {name} {role}, {queued} bytes queued",
        type_name(s.sock_type)
    )
}

/// sock_diag reports a socket file's inode in 32 bits.
fn same_ino(diag: Option<u64>, ino: u64) -> bool {
    diag == Some(ino & u64::from(u32::MAX))
}

fn refuse(pid: u32, fd: i32, what: &str) -> SnapshotError {
    SnapshotError::UnsupportedFd {
        pid,
        fd,
        what: what.into(),
    }
}

/// The socket file a path name made, found where the process sees it and
/// checked to be that socket's (a relative name resolves in the cwd).
fn socket_file(pid: u32, cwd: &Path, name: &[u8], d: &UnixDiag) -> Result<UnixFile, String> {
    let shown = String::from_utf8_lossy(name).into_owned();
    let path = cwd.join(&shown);
    let path = path.to_string_lossy().into_owned();
    let meta = std::fs::symlink_metadata(format!("/proc/{pid}/root{path}"))
        .ok()
        .filter(|m| m.file_type().is_socket() && same_ino(d.vfs_ino, m.ino()))
        .ok_or_else(|| {
            format!(
                "bound to {shown}, whose socket file is not at {path} (removed, replaced, or \
                 bound in another directory)"
            )
        })?;
    let dir = Path::new(&path)
        .parent()
        .map_or("/".into(), |p| p.to_string_lossy().into_owned());
    Ok(UnixFile {
        path,
        dir,
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.permissions().mode() & 0o7777,
    })
}

/// What waits to be read on the socket, without consuming it: each peek
/// moves SO_PEEK_OFF on, and the original offset is put back after.
fn peek_queue(
    pid: u32,
    fd: i32,
    sock: &OwnedFd,
    sock_type: i32,
) -> Result<Vec<Vec<u8>>, SnapshotError> {
    let err = |what: &str, e: std::io::Error| {
        SnapshotError::process(pid, format!("{what} of fd {fd}"), e)
    };
    let original = get_int_opt(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| err("SO_PEEK_OFF", e))?;
    set_int_opt(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(|e| err("SO_PEEK_OFF", e))?;
    let walked = walk_queue(pid, fd, sock, sock_type);
    set_int_opt(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, original)
        .map_err(|e| err("restoring SO_PEEK_OFF", e))?;
    walked
}

fn walk_queue(
    pid: u32,
    fd: i32,
    sock: &OwnedFd,
    sock_type: i32,
) -> Result<Vec<Vec<u8>>, SnapshotError> {
    let what = format!("unix {} socket", type_name(sock_type));
    let mut queue = Vec::new();
    let mut total = 0;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 253], libc::ucred);
    loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let got = match recvmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(r) => r,
            Err(nix::errno::Errno::EAGAIN) => return Ok(queue),
            Err(e) => return Err(SnapshotError::fd_call(pid, fd, "recv (MSG_PEEK)", e)),
        };
        let mut in_flight = false;
        match got.cmsgs() {
            Ok(cmsgs) => {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        in_flight = true;
                        for f in fds {
                            let _ = nix::unistd::close(f);
                        }
                    }
                }
            }
            Err(_) => in_flight = true,
        }
        if in_flight {
            return Err(refuse(
                pid,
                fd,
                &format!("{what} has file descriptors in flight (SCM_RIGHTS) in its queue"),
            ));
        }
        if got.flags.contains(MsgFlags::MSG_TRUNC) {
            return Err(refuse(
                pid,
                fd,
                &format!("{what} has a queued message larger than {MAX_MESSAGE} bytes"),
            ));
        }
        let n = got.bytes;
        if n == 0 {
            if sock_type == libc::SOCK_STREAM {
                return Ok(queue);
            }
            // A peek offset cannot step over an empty message.
            return Err(refuse(
                pid,
                fd,
                &format!("{what} has an empty message queued"),
            ));
        }
        total += n;
        if total > MAX_QUEUE {
            return Err(refuse(
                pid,
                fd,
                &format!("{what} has more than {MAX_QUEUE} bytes queued"),
            ));
        }
        queue.push(buf[..n].to_vec());
    }
}

impl Stub<'_> {
    fn ok(&self, what: &str, nr: i64, args: &[u64]) -> Result<u64, SnapshotError> {
        self.inj.ok(self.pid, what, nr, args)
    }

    fn socket(&self, s: &UnixSocket) -> Result<u64, SnapshotError> {
        let kind = s.sock_type | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        let fd = self.ok(
            "socket(AF_UNIX)",
            libc::SYS_socket,
            &[libc::AF_UNIX as u64, kind as u64, 0],
        )?;
        (self.to_high)(fd)
    }

    fn int_opt(&self, fd: u64, what: &str, opt: i32, value: i32) -> Result<(), SnapshotError> {
        self.mem.write_value(self.data, &value)?;
        self.ok(
            what,
            libc::SYS_setsockopt,
            &[fd, libc::SOL_SOCKET as u64, opt as u64, self.data, 4],
        )?;
        Ok(())
    }

    fn options(&self, fd: u64, s: &UnixSocket) -> Result<(), SnapshotError> {
        // getsockopt shows twice what was set; the FORCE variants (root,
        // as the stub still is) pass the rmem_max/wmem_max caps that the
        // original may have been allowed over.
        self.int_opt(fd, "SO_SNDBUFFORCE", libc::SO_SNDBUFFORCE, s.sndbuf / 2)?;
        self.int_opt(fd, "SO_RCVBUFFORCE", libc::SO_RCVBUFFORCE, s.rcvbuf / 2)?;
        if s.passcred {
            self.int_opt(fd, "SO_PASSCRED", libc::SO_PASSCRED, 1)?;
        }
        Ok(())
    }

    /// Writes a `sockaddr_un` for `name` to the data area; returns its
    /// length.
    fn sockaddr(&self, name: &[u8]) -> Result<u64, SnapshotError> {
        let addr = abi::sockaddr_un(name).ok_or_else(|| RestoreError::Process {
            pid: self.pid,
            what: format!("Unix socket name {} is too long", show_name(Some(name))),
        })?;
        self.mem.write(self.data, &addr)?;
        Ok(addr.len() as u64)
    }

    fn bind(&self, fd: u64, name: &UnixName) -> Result<(), SnapshotError> {
        let shown = show_name(Some(&name.sun_path));
        if let Some(file) = &name.file {
            // The dead original's socket file stays behind; anything else
            // at the path, or a socket file some live socket is bound to
            // (a running original of a --leave-running copy), is not ours
            // to remove.
            let seen = format!("/proc/{}/root{}", self.pid, file.path);
            if let Ok(m) = std::fs::symlink_metadata(&seen) {
                if !m.file_type().is_socket() {
                    return Err(RestoreError::Path {
                        path: file.path.clone(),
                        what: format!(
                            "exists and is not a socket; the Unix socket {shown} cannot be bound there"
                        ),
                    }
                    .into());
                }
                let live = sockdiag::unix_sockets()
                    .map_err(|e| SnapshotError::process(self.pid, "sock_diag of Unix sockets", e))?
                    .iter()
                    .any(|d| same_ino(d.vfs_ino, m.ino()));
                if live {
                    return Err(RestoreError::Path {
                        path: file.path.clone(),
                        what: format!(
                            "a running socket is bound there; the Unix socket {shown} cannot be \
                             bound again"
                        ),
                    }
                    .into());
                }
                std::fs::remove_file(&seen).map_err(|e| SnapshotError::io(Path::new(&seen), e))?;
            }
            if name.sun_path[0] != b'/' {
                let mut dir = file.dir.as_bytes().to_vec();
                dir.push(0);
                self.mem.write(self.data, &dir)?;
                self.ok(
                    &format!("chdir {}", file.dir),
                    libc::SYS_chdir,
                    &[self.data],
                )?;
            }
        }
        let len = self.sockaddr(&name.sun_path)?;
        self.ok(
            &format!("bind {shown}"),
            libc::SYS_bind,
            &[fd, self.data, len],
        )?;
        if let Some(file) = &name.file {
            let seen = format!("/proc/{}/root{}", self.pid, file.path);
            std::os::unix::fs::chown(&seen, Some(file.uid), Some(file.gid))
                .and_then(|()| {
                    std::fs::set_permissions(&seen, std::fs::Permissions::from_mode(file.mode))
                })
                .map_err(|e| SnapshotError::io(Path::new(&seen), e))?;
        }
        Ok(())
    }

    fn connect(&self, fd: u64, to: &UnixName) -> Result<(), SnapshotError> {
        let len = self.sockaddr(&to.sun_path)?;
        self.ok(
            &format!("connect to {}", show_name(Some(&to.sun_path))),
            libc::SYS_connect,
            &[fd, self.data, len],
        )?;
        Ok(())
    }

    /// A socketpair of `sock_type`, both ends above the saved fds.
    fn socketpair(&self, sock_type: i32) -> Result<(u64, u64), SnapshotError> {
        let kind = sock_type | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        self.ok(
            "socketpair(AF_UNIX)",
            libc::SYS_socketpair,
            &[libc::AF_UNIX as u64, kind as u64, 0, self.data],
        )?;
        let [a, b]: [i32; 2] = self.mem.read_value(self.data)?;
        Ok(((self.to_high)(a as u64)?, (self.to_high)(b as u64)?))
    }

    /// Sends `bytes` from `fd` without blocking: the peer's buffers held
    /// them before, so they fit again.
    fn send(&self, fd: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        let flags = (libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u64;
        let mut rest = bytes;
        loop {
            let n = rest.len().min(self.data_len as usize);
            self.mem.write(self.data, &rest[..n])?;
            let sent = self.ok(
                "send of queued bytes",
                libc::SYS_sendto,
                &[fd, self.data, n as u64, flags, 0, 0],
            )? as usize;
            rest = &rest[sent..];
            if rest.is_empty() {
                return Ok(());
            }
        }
    }
}

/// Rebuilds the Unix sockets `fds` (all `FdKind::Unix`) in the stub and
/// places each at its saved fd number.
pub fn restore(stub: &Stub, fds: &[&FdImage]) -> Result<(), SnapshotError> {
    let socks: BTreeMap<u64, (&FdImage, &UnixSocket)> = fds
        .iter()
        .filter_map(|f| match &f.kind {
            FdKind::Unix(s) => Some((s.inode, (*f, s))),
            _ => None,
        })
        .collect();
    let get = |ino: u64| {
        socks.get(&ino).copied().ok_or_else(|| {
            SnapshotError::from(RestoreError::Image {
                what: format!("names unix socket {ino}, which it does not hold"),
            })
        })
    };
    let name_of = |ino: u64| -> Result<&UnixName, SnapshotError> {
        let (f, s) = get(ino)?;
        s.name.as_ref().ok_or_else(|| {
            SnapshotError::from(RestoreError::Fd {
                fd: f.fd,
                what: "unix socket has no name to connect to".into(),
            })
        })
    };
    // A connection both of whose ends point at each other is rebuilt as
    // one; a datagram socket connected one way connects to a name.
    let mutual = |ino: u64, s: &UnixSocket| match s.role {
        UnixRole::Connected { peer, .. } => get(peer).is_ok_and(
            |(_, p)| matches!(p.role, UnixRole::Connected { peer: back, .. } if back == ino),
        ),
        _ => false,
    };
    let mut made: HashMap<u64, u64> = HashMap::new();
    // Named, listening and one-way sockets first: others connect to them.
    for (&ino, &(_, s)) in &socks {
        if matches!(s.role, UnixRole::Pending { .. }) || mutual(ino, s) {
            continue;
        }
        if s.role == UnixRole::Closed {
            let (a, z) = stub.socketpair(s.sock_type)?;
            stub.options(a, s)?;
            stub.inj.call(stub.pid, libc::SYS_close, &[z])?;
            made.insert(ino, a);
            continue;
        }
        let fd = stub.socket(s)?;
        stub.options(fd, s)?;
        if let Some(name) = &s.name {
            stub.bind(fd, name)?;
        }
        if let UnixRole::Listening { backlog, .. } = s.role {
            stub.ok("listen", libc::SYS_listen, &[fd, backlog as u64])?;
        }
        made.insert(ino, fd);
    }
    for (&ino, &(_, s)) in &socks {
        let UnixRole::Connected {
            peer,
            accepted_from,
        } = s.role
        else {
            continue;
        };
        if made.contains_key(&ino) {
            continue;
        }
        let (_, p) = get(peer)?;
        if let Some(listener) = accepted_from {
            // The client connects to the rebuilt listener, whose backlog is
            // still empty, so what it accepts is this socket.
            let client = stub.socket(p)?;
            stub.options(client, p)?;
            if let Some(name) = &p.name {
                stub.bind(client, name)?;
            }
            stub.connect(client, name_of(listener)?)?;
            let lfd = *made
                .get(&listener)
                .ok_or_else(|| RestoreError::UnixSocket {
                    ino: listener,
                    what: "the listener was not rebuilt".into(),
                })?;
            let server = stub.ok(
                "accept4",
                libc::SYS_accept4,
                &[lfd, 0, 0, (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64],
            )?;
            let server = (stub.to_high)(server)?;
            stub.options(server, s)?;
            made.insert(ino, server);
            made.insert(peer, client);
        } else if !matches!(
            p.role,
            UnixRole::Connected {
                accepted_from: Some(_),
                ..
            }
        ) {
            let (a, z) = stub.socketpair(s.sock_type)?;
            stub.options(a, s)?;
            stub.options(z, p)?;
            made.insert(ino, a);
            made.insert(peer, z);
        }
    }
    for (&ino, &(_, s)) in &socks {
        if let UnixRole::Connected { peer, .. } = s.role {
            if !mutual(ino, s) {
                stub.connect(made[&ino], name_of(peer)?)?;
            }
        }
    }
    // Pending connections in the order the listener would accept them.
    for &(lf, s) in socks.values() {
        let UnixRole::Listening { ref pending, .. } = s.role else {
            continue;
        };
        for &client in pending {
            let (_, c) = get(client)?;
            let fd = stub.socket(c)?;
            stub.options(fd, c)?;
            if let Some(name) = &c.name {
                stub.bind(fd, name)?;
            }
            stub.connect(
                fd,
                s.name.as_ref().ok_or_else(|| RestoreError::Fd {
                    fd: lf.fd,
                    what: "a listener with pending connections has no name".into(),
                })?,
            )?;
            made.insert(client, fd);
        }
    }
    // Queued bytes come from the peer, which sends them again.
    for &(_, s) in socks.values() {
        if let UnixRole::Connected { peer, .. } = s.role {
            for m in &s.queue {
                stub.send(made[&peer], m)?;
            }
        }
    }
    for (&ino, &(f, s)) in &socks {
        let fd = *made.get(&ino).ok_or_else(|| RestoreError::Fd {
            fd: f.fd,
            what: "unix socket was not rebuilt".into(),
        })?;
        (stub.place)(fd, f, s.flags)?;
        if s.peek_off >= 0 {
            stub.int_opt(f.fd as u64, "SO_PEEK_OFF", libc::SO_PEEK_OFF, s.peek_off)?;
        }
        stub.inj.call(stub.pid, libc::SYS_close, &[fd])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_shown_as_tools_show_them() {
        assert_eq!(show_name(None), "unnamed");
        assert_eq!(show_name(Some(b"\0keeper")), "@keeper");
        assert_eq!(show_name(Some(b"/run/x.sock")), "/run/x.sock");
    }

    #[test]
    fn a_path_name_loses_its_terminating_nul_and_an_abstract_one_keeps_its_bytes() {
        let d = |n: &[u8]| UnixDiag {
            name: Some(n.to_vec()),
            ..UnixDiag::default()
        };
        assert_eq!(diag_name(&d(b"/a.sock\0")), Some(b"/a.sock".to_vec()));
        assert_eq!(diag_name(&d(b"\0ab\0")), Some(b"\0ab\0".to_vec()));
        assert_eq!(diag_name(&d(b"")), None);
    }
}
