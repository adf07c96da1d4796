//! Process creation that the standard library cannot express: a child that
//! is PID 1 of a new PID namespace, and a `Command` that loads the seccomp
//! filter and hands its listener to the supervisor just before `exec`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::seccomp::{self, SockFilter};

/// Starts `argv` (absolute path first) as PID 1 of a new PID namespace and
/// returns its PID in ours. The child gets SIGKILL when the calling thread
/// exits, and because it is the namespace's init, its death takes every
/// process of the namespace with it: a supervisor killed with SIGKILL leaves
/// no orphaned instance behind.
///
/// The calling process may be multi-threaded: between clone and exec the
/// child only makes raw syscalls on memory prepared before the clone.
pub fn spawn_namespace_init(argv: &[CString], env: &[CString]) -> io::Result<u32> {
    if argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());

    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork:
    // the child runs on a private copy of this stack.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWPID | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child only async-signal-safe raw syscalls follow, on
        // pointers into memory that was fully built before the clone.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), env_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    Ok(pid as u32)
}

/// Forks the calling (single-threaded) process into a child with PID `pid`
/// in the caller's PID namespace (`clone3` with `set_tid`). Returns 0 in the
/// child and the child's PID in the parent.
pub fn fork_with_pid(pid: u32) -> io::Result<u32> {
    let set_tid = [pid as libc::pid_t];
    // struct clone_args: flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls, set_tid, set_tid_size, cgroup.
    let args: [u64; 11] = [
        0,
        0,
        0,
        0,
        libc::SIGCHLD as u64,
        0,
        0,
        0,
        set_tid.as_ptr() as u64,
        1,
        0,
    ];
    // SAFETY: clone3 without CLONE_VM is a fork; `args` and `set_tid` live
    // on this stack for the duration of the call, and the kernel reads
    // exactly `size_of_val(&args)` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args.as_ptr(),
            std::mem::size_of_val(&args),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u32)
}

/// Arranges for `cmd`'s child to load `program` right before `exec` and send
/// the new listener fd over `channel` (a connected Unix socket) with
/// SCM_RIGHTS. The application itself never holds the listener: it is
/// closed before `exec`, so the application cannot answer its own
/// notifications. The child's signal mask is emptied first: the namespace
/// init blocks every signal, and an application that inherited that mask
/// would never see SIGTERM.
pub fn load_filter_before_exec(cmd: &mut Command, program: Vec<SockFilter>, channel: OwnedFd) {
    let hook = move || -> io::Result<()> {
        unblock_all_signals()?;
        let listener = seccomp::load_with_listener(&program)?;
        let sent = crate::fd::send_fd(channel.as_raw_fd(), listener);
        // SAFETY: `listener` was returned by the kernel above and is ours.
        unsafe { libc::close(listener) };
        sent
    };
    // SAFETY: the hook runs between fork and exec; it allocates nothing and
    // makes only raw syscalls (rt_sigprocmask, seccomp, prctl, sendmsg,
    // close).
    unsafe {
        cmd.pre_exec(hook);
    }
}

fn unblock_all_signals() -> io::Result<()> {
    // SAFETY: sigemptyset initialises the set on the stack before
    // pthread_sigmask reads it.
    let ret = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}
