//! pidfd_open, pidfd_getfd, pidfd_send_signal and kcmp: how the supervisor
//! reaches into a supervised task's file table without ptrace, and signals
//! a process without racing the reuse of its PID.

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

/// Opens a pidfd for the process `pid` (a thread-group leader): it polls
/// readable once the whole process has exited.
pub fn open_process(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
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

/// Sends signal `sig` to the process behind `pidfd`, as `kill(2)` would,
/// but never to a later owner of its PID: once the process has been reaped
/// this fails with ESRCH.
pub fn send_signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd that stays open for the call
    // (borrowed), a signal number, a null siginfo (the kernel then fills in
    // the one kill(2) would send) and flags 0; it touches no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `KCMP_FILE` of `linux/kcmp.h`.
const KCMP_FILE: libc::c_int = 0;

/// Whether fds `a` and `b` of process `pid` refer to one open file
/// description (`dup`, `dup2`, `F_DUPFD`, or one received twice), which
/// the fd links in /proc cannot tell apart from two opens of one file.
pub fn same_file(pid: u32, a: RawFd, b: RawFd) -> io::Result<bool> {
    // SAFETY: kcmp takes five integers and touches no memory of ours.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid as libc::pid_t,
            pid as libc::pid_t,
            KCMP_FILE,
            a as libc::c_ulong,
            b as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret == 0)
}

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Whether fd `fd1` of process `pid1` and fd `fd2` of process `pid2` are
/// one open file description (kcmp KCMP_FILE; the caller needs ptrace
/// access to both). `None` if either fd is not open or kcmp is refused.
pub fn same_file_across(pid1: u32, fd1: RawFd, pid2: u32, fd2: RawFd) -> Option<bool> {
    // SAFETY: kcmp takes two pids, a type and two fd numbers by value and
    // reads no memory of ours; it returns 0 for equal, 1 or 2 for an
    // ordering, 3 for not comparable, or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid1 as libc::pid_t,
            pid2 as libc::pid_t,
            KCMP_FILE,
            fd1 as libc::c_ulong,
            fd2 as libc::c_ulong,
        )
    };
    (ret >= 0).then_some(ret == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_file_tells_a_dup_from_a_second_open() {
        let me = std::process::id();
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let g = std::fs::File::open("/proc/self/status").unwrap();
        let d = f.try_clone().unwrap();
        assert!(same_file(me, f.as_raw_fd(), d.as_raw_fd()).unwrap());
        assert!(!same_file(me, f.as_raw_fd(), g.as_raw_fd()).unwrap());
    }

    #[test]
    fn send_signal_reaches_the_process_and_fails_once_it_is_reaped() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pidfd = open_thread(child.id()).unwrap();
        send_signal(&pidfd, 0).unwrap();
        send_signal(&pidfd, libc::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        let err = send_signal(&pidfd, libc::SIGTERM).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
