//! Pipes: each end saved with the pipe's inode and capacity, and the
//! unread bytes, copied without being consumed, with the first fd of the
//! pipe in the tree. Restore creates one pipe per inode, writes its bytes
//! back and places every end.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use appshot_sys::pidfd;
use nix::fcntl::{fcntl, tee, FcntlArg, OFlag, SpliceFFlags};

use super::Stub;
use crate::error::SnapshotError;
use crate::image::model::{FdImage, FdKind};

/// The pipe end `fd` of process `pid` (`ino`: the inode its link names,
/// `pidfd`: the process's); its unread bytes go with the first fd of the
/// pipe in the tree (`pipes_seen`).
pub fn save(
    pid: u32,
    pidfd: &OwnedFd,
    fd: i32,
    link: &str,
    ino: &str,
    flags: i32,
    pipes_seen: &mut HashSet<u64>,
) -> Result<FdKind, SnapshotError> {
    let inode: u64 = ino.parse().map_err(|_| SnapshotError::Unsupported {
        pid,
        what: format!("fd {fd}: odd pipe link {link}"),
    })?;
    let theirs = pidfd::get_fd(pidfd, fd)
        .map_err(|e| SnapshotError::process(pid, format!("pidfd_getfd {fd}"), e))?;
    let capacity = fcntl(theirs.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| SnapshotError::process(pid, format!("F_GETPIPE_SZ on fd {fd}"), e))?
        as u32;
    let data = if pipes_seen.insert(inode) {
        peek_pipe(pid, fd, capacity)?
    } else {
        Vec::new()
    };
    Ok(FdKind::Pipe {
        inode,
        write_end: flags & libc::O_ACCMODE == libc::O_WRONLY,
        flags,
        capacity,
        data,
    })
}

/// Copies a pipe's unread bytes without consuming them: tee(2) from a new
/// read end of the same pipe into a private pipe.
fn peek_pipe(pid: u32, fd: i32, capacity: u32) -> Result<Vec<u8>, SnapshotError> {
    let path = format!("/proc/{pid}/fd/{fd}");
    let rd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| SnapshotError::process(pid, format!("opening {path} to read pipe data"), e))?;
    let (ours_r, ours_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| SnapshotError::process(pid, "pipe2", e))?;
    let _ = fcntl(ours_w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(capacity as i32));
    let n = match tee(
        rd.as_fd(),
        ours_w.as_fd(),
        capacity as usize,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(n) => n,
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => {
            return Err(SnapshotError::process(
                pid,
                format!("tee of pipe fd {fd}"),
                e,
            ))
        }
    };
    let mut data = vec![0u8; n];
    let mut got = 0;
    while got < n {
        got += nix::unistd::read(ours_r.as_raw_fd(), &mut data[got..])
            .map_err(|e| SnapshotError::process(pid, "reading pipe copy", e))?;
    }
    Ok(data)
}

/// Creates one pipe per inode among `fds` in the stub, with its capacity
/// and unread bytes, and places each of its ends.
pub fn restore(stub: &Stub, fds: &[FdImage]) -> Result<(), SnapshotError> {
    let Stub {
        inj,
        mem,
        pid,
        data,
        ..
    } = *stub;
    let to_high = stub.to_high;
    let place = stub.place;
    let mut pipes: BTreeMap<u64, Vec<&FdImage>> = BTreeMap::new();
    for f in fds {
        if let FdKind::Pipe { inode, .. } = &f.kind {
            pipes.entry(*inode).or_default().push(f);
        }
    }
    for fds in pipes.values() {
        inj.ok(
            pid,
            "pipe2",
            libc::SYS_pipe2,
            &[data, libc::O_CLOEXEC as u64],
        )?;
        let mut b = [0u8; 8];
        mem.read(data, &mut b)?;
        let rd = to_high(i32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as u64)?;
        let wr = to_high(i32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")) as u64)?;
        for f in fds {
            let FdKind::Pipe {
                write_end,
                flags,
                capacity,
                data: bytes,
                ..
            } = &f.kind
            else {
                continue;
            };
            if !bytes.is_empty() || fds.iter().position(|x| std::ptr::eq(*x, *f)) == Some(0) {
                inj.call(
                    pid,
                    libc::SYS_fcntl,
                    &[wr, libc::F_SETPIPE_SZ as u64, *capacity as u64],
                )?;
            }
            for chunk in bytes.chunks(stub.data_len as usize) {
                mem.write(data, chunk)?;
                inj.ok(
                    pid,
                    "write of pipe data",
                    libc::SYS_write,
                    &[wr, data, chunk.len() as u64],
                )?;
            }
            place(if *write_end { wr } else { rd }, f, *flags)?;
        }
        inj.call(pid, libc::SYS_close, &[rd])?;
        inj.call(pid, libc::SYS_close, &[wr])?;
    }
    Ok(())
}
