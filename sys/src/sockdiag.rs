//! What the kernel knows of Unix sockets that no syscall on the socket
//! itself tells: its peer, the client sockets waiting in a listener's
//! backlog, queue lengths. Asked through `NETLINK_SOCK_DIAG`
//! (`linux/unix_diag.h`); a few structs, so written here rather than pulled
//! in as a crate.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_VFS: u32 = 0x02;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

#[repr(C)]
#[derive(Clone, Copy)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UnixDiagReq {
    family: u8,
    protocol: u8,
    pad: u16,
    states: u32,
    ino: u32,
    show: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UnixDiagMsg {
    family: u8,
    kind: u8,
    state: u8,
    pad: u8,
    ino: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct NlAttr {
    len: u16,
    kind: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    hdr: NlMsgHdr,
    req: UnixDiagReq,
}

/// One Unix socket as `sock_diag` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnixDiag {
    pub ino: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: u8,
    /// TCP_LISTEN (10), TCP_ESTABLISHED (1), TCP_CLOSE (7)…
    pub state: u8,
    /// `sun_path` as bound (a leading NUL for an abstract name).
    pub name: Option<Vec<u8>>,
    /// Inode of the socket file a path name created.
    pub vfs_ino: Option<u64>,
    pub peer: Option<u64>,
    /// A listener's not yet accepted connections: their client sockets.
    pub icons: Vec<u64>,
    /// Listener: (pending connections, backlog); otherwise (bytes or
    /// messages queued to read, bytes sent and not yet read by the peer).
    pub rqlen: Option<(u32, u32)>,
    /// SHUT_RD/SHUT_WR bits (1, 2), as the peer or the socket set them.
    pub shutdown: u8,
}

/// Every Unix socket of this network namespace.
pub fn unix_sockets() -> io::Result<Vec<UnixDiag>> {
    // SAFETY: socket takes three integers and returns a new fd or -1.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            seq: 1,
            pid: 0,
        },
        req: UnixDiagReq {
            family: libc::AF_UNIX as u8,
            protocol: 0,
            pad: 0,
            states: u32::MAX,
            ino: 0,
            show: UDIAG_SHOW_NAME
                | UDIAG_SHOW_VFS
                | UDIAG_SHOW_PEER
                | UDIAG_SHOW_ICONS
                | UDIAG_SHOW_RQLEN,
            cookie: [u32::MAX; 2],
        },
    };
    // SAFETY: send reads size_of::<Request>() bytes from a live repr(C)
    // value without padding; an unconnected netlink socket sends to the
    // kernel.
    let sent = unsafe {
        libc::send(
            sock.as_raw_fd(),
            (&request as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv writes at most buf.len() bytes into the live buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while let Some(hdr) = read::<NlMsgHdr>(rest) {
            let len = hdr.len as usize;
            if len < size_of::<NlMsgHdr>() || len > rest.len() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            let body = &rest[size_of::<NlMsgHdr>()..len];
            match hdr.kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(out),
                libc::NLMSG_ERROR => {
                    let errno = read::<i32>(body).ok_or(io::ErrorKind::InvalidData)?;
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ => out.push(parse(body).ok_or(io::ErrorKind::InvalidData)?),
            }
            rest = &rest[align4(len).min(rest.len())..];
        }
    }
}

fn parse(body: &[u8]) -> Option<UnixDiag> {
    let msg = read::<UnixDiagMsg>(body)?;
    let mut d = UnixDiag {
        ino: msg.ino.into(),
        sock_type: msg.kind,
        state: msg.state,
        ..UnixDiag::default()
    };
    let mut attrs = body.get(size_of::<UnixDiagMsg>()..)?;
    while let Some(a) = read::<NlAttr>(attrs) {
        let len = a.len as usize;
        let payload = attrs.get(size_of::<NlAttr>()..len)?;
        let u32_at = |i: usize| read::<u32>(payload.get(i * 4..)?);
        match a.kind {
            UNIX_DIAG_NAME => d.name = Some(payload.to_vec()),
            // struct unix_diag_vfs: inode, then device.
            UNIX_DIAG_VFS => d.vfs_ino = u32_at(0).map(u64::from),
            UNIX_DIAG_PEER => d.peer = u32_at(0).map(u64::from),
            UNIX_DIAG_ICONS => {
                d.icons = payload
                    .chunks_exact(4)
                    .filter_map(|c| read::<u32>(c).map(u64::from))
                    .collect()
            }
            // struct unix_diag_rqlen: rqueue, wqueue.
            UNIX_DIAG_RQLEN => d.rqlen = Some((u32_at(0)?, u32_at(1)?)),
            UNIX_DIAG_SHUTDOWN => d.shutdown = *payload.first()?,
            _ => {}
        }
        attrs = attrs.get(align4(len).min(attrs.len())..)?;
    }
    Some(d)
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A `T` from the start of `b`, if `b` is long enough. Only used for the
/// plain-integer repr(C) types above, for which every bit pattern is valid.
fn read<T: Copy>(b: &[u8]) -> Option<T> {
    if b.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: `b` holds at least size_of::<T>() bytes, the read is
    // unaligned-safe, and T is one of the integer-only types of this module.
    Some(unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn ino(fd: &impl AsRawFd) -> u64 {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let link = link.to_string_lossy();
        link.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap()
    }

    #[test]
    fn a_pair_is_each_others_peer_and_a_pending_client_is_an_icon() {
        let (a, b) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&a).write_all(b"four").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("l.sock")).unwrap();
        let client = UnixStream::connect(dir.path().join("l.sock")).unwrap();
        let all = unix_sockets().unwrap();
        let find = |i: u64| all.iter().find(|d| d.ino == i).unwrap().clone();
        let (da, db) = (find(ino(&a)), find(ino(&b)));
        assert_eq!(da.peer, Some(ino(&b)));
        assert_eq!(db.peer, Some(ino(&a)));
        assert_eq!(db.rqlen, Some((4, 0)));
        let dl = find(ino(&listener));
        assert_eq!(dl.state, 10);
        assert_eq!(dl.icons, vec![ino(&client)]);
        assert!(dl.name.unwrap().windows(6).any(|w| w == b"l.sock"));
        assert!(dl.vfs_ino.is_some());
    }
}
