//! Pipes and FIFOs: each end saved with the pipe's inode (a FIFO's path)
//! and capacity, and the unread bytes, copied without being consumed, with
//! the first fd of the pipe in the tree. Restore creates one pipe per inode
//! (opens the FIFO), writes its bytes back and places every end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use appshot_sys::pidfd;
use nix::fcntl::{fcntl, tee, FcntlArg, OFlag, SpliceFFlags};

use super::files::file_ref;
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
    let inode: u64 = ino.parse().map_err(|_| SnapshotError::UnsupportedFd {
        pid,
        fd,
        what: format!("odd pipe link {link}"),
    })?;
    let theirs =
        pidfd::get_fd(pidfd, fd).map_err(|e| SnapshotError::fd_call(pid, fd, "pidfd_getfd", e))?;
    let capacity = fcntl(theirs.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| SnapshotError::fd_call(pid, fd, "F_GETPIPE_SZ", e))? as u32;
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

/// Whether `path` is a FIFO.
pub fn is_fifo(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The fd `fd` of process `pid` open on the FIFO `link`; its unread bytes
/// go with the first fd of it in the tree (`pipes_seen`, by inode).
pub fn save_fifo(
    pid: u32,
    pidfd: &OwnedFd,
    fd: i32,
    link: &str,
    flags: i32,
    pipes_seen: &mut HashSet<u64>,
) -> Result<FdKind, SnapshotError> {
    let theirs =
        pidfd::get_fd(pidfd, fd).map_err(|e| SnapshotError::fd_call(pid, fd, "pidfd_getfd", e))?;
    let capacity = fcntl(theirs.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)
        .map_err(|e| SnapshotError::fd_call(pid, fd, "F_GETPIPE_SZ", e))? as u32;
    let file = file_ref(link, pid)?;
    // Unread bytes belong to the FIFO, not to one of its fds.
    let data = if pipes_seen.insert(file.ino) {
        peek_pipe(pid, fd, capacity)?
    } else {
        Vec::new()
    };
    Ok(FdKind::Fifo {
        file,
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
        let [rd, wr]: [i32; 2] = mem.read_value(data)?;
        let (rd, wr) = (to_high(rd as u64)?, to_high(wr as u64)?);
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
            write_bytes(stub, wr, bytes, "pipe data")?;
            place(if *write_end { wr } else { rd }, f, *flags)?;
        }
        inj.call(pid, libc::SYS_close, &[rd])?;
        inj.call(pid, libc::SYS_close, &[wr])?;
    }
    Ok(())
}

/// Opens the FIFO of `f` (an `FdKind::Fifo`) in the stub and places it;
/// `helpers` holds the stub's helper fd of each FIFO (by inode), closed by
/// [`close_fifo_helpers`] once every end is placed.
pub fn restore_fifo(
    stub: &Stub,
    f: &FdImage,
    helpers: &mut HashMap<u64, u64>,
) -> Result<(), SnapshotError> {
    let FdKind::Fifo {
        file,
        flags,
        capacity,
        data: bytes,
    } = &f.kind
    else {
        return Ok(());
    };
    let Stub {
        inj,
        mem,
        pid,
        data,
        ..
    } = *stub;
    let to_high = stub.to_high;
    // Opened read-write, a FIFO never blocks its opener, and
    // while that fd is open no other open of it blocks either:
    // the saved ends are opened through it, and its unread
    // bytes written through it.
    let helper = match helpers.get(&file.ino) {
        Some(&h) => h,
        None => {
            let h = to_high(crate::restore::open_in(
                inj,
                mem,
                pid,
                data,
                &file.path,
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )?)?;
            helpers.insert(file.ino, h);
            h
        }
    };
    if !bytes.is_empty() {
        inj.call(
            pid,
            libc::SYS_fcntl,
            &[helper, libc::F_SETPIPE_SZ as u64, *capacity as u64],
        )?;
    }
    write_bytes(stub, helper, bytes, "FIFO data")?;
    let path = format!("/proc/self/fd/{helper}");
    let open_flags = flags & !(libc::O_CREAT | libc::O_TRUNC) | libc::O_CLOEXEC;
    let temp = to_high(crate::restore::open_in(
        inj, mem, pid, data, &path, open_flags,
    )?)?;
    (stub.place)(temp, f, *flags)?;
    inj.call(pid, libc::SYS_close, &[temp])?;
    Ok(())
}

/// Closes the helper fds [`restore_fifo`] opened.
pub fn close_fifo_helpers(stub: &Stub, helpers: HashMap<u64, u64>) -> Result<(), SnapshotError> {
    for helper in helpers.into_values() {
        stub.inj.call(stub.pid, libc::SYS_close, &[helper])?;
    }
    Ok(())
}

/// Writes `bytes` into the process's `fd` through the scratch data area.
fn write_bytes(stub: &Stub, fd: u64, bytes: &[u8], what: &str) -> Result<(), SnapshotError> {
    for chunk in bytes.chunks(stub.data_len as usize) {
        stub.mem.write(stub.data, chunk)?;
        stub.inj.ok(
            stub.pid,
            &format!("write of {what}"),
            libc::SYS_write,
            &[fd, stub.data, chunk.len() as u64],
        )?;
    }
    Ok(())
}
