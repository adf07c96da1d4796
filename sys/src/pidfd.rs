//! pidfd_open and pidfd_getfd: how the supervisor reaches into a supervised
//! task's file table without ptrace.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `PIDFD_THREAD` (Linux 6.9): the pidfd names one thread, so `pidfd_getfd`
/// reads that thread's own file table, which is right even for tasks cloned
/// without `CLONE_FILES`.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// Opens a pidfd for the thread `tid` (a TID from a seccomp notification).
pub fn open_thread(tid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid as libc::pid_t, PIDFD_THREAD) };
    owned(fd)
}

/// Duplicates file descriptor `target_fd` of the task behind `pidfd` into
/// this process (close-on-exec). The copy shares the open file description.
pub fn get_fd(pidfd: &OwnedFd, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a valid pidfd, an fd number and flags 0, and
    // returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    owned(fd)
}

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}
