//! Process creation that the standard library cannot express: a child that
//! is PID 1 of a new PID namespace, and a `Command` that loads the seccomp
//! filter and hands its listener to the supervisor just before `exec`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::abi::CloneArgs;
use crate::seccomp::{self, SockFilter};

/// What the namespace init's process changes about itself between clone
/// and exec.
#[derive(Clone, Copy, Debug, Default)]
pub struct InitSetup {
    /// A descriptor the parent created close-on-exec, so that no other
    /// process it spawns meanwhile inherits it, which this child alone keeps
    /// across its exec (its FD_CLOEXEC is cleared in the child).
    pub keep_fd: Option<RawFd>,
    /// `RLIMIT_NOFILE` (soft, hard) for the child, e.g. the limit the
    /// parent had before it raised its own.
    pub nofile: Option<(u64, u64)>,
    /// A cgroup2 directory (an open descriptor of it) the child starts in
    /// (`CLONE_INTO_CGROUP`): moving a process later, through
    /// `cgroup.procs`, first waits for an RCU grace period (about 10 ms
    /// here) whenever no move happened in the last moments.
    pub cgroup: Option<RawFd>,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7; libc lacks it).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Starts `argv` (absolute path first) as PID 1 of a new PID namespace and
/// returns its PID in ours and a pidfd of it (close-on-exec), obtained
/// atomically with the clone (`CLONE_PIDFD`): signals sent through it can
/// never reach another process that later got the same PID. The child gets
/// SIGKILL when the calling thread exits, and because it is the namespace's
/// init, its death takes every process of the namespace with it: a
/// supervisor killed with SIGKILL leaves no orphaned instance behind.
///
/// The calling process may be multi-threaded: between clone and exec the
/// child only makes raw syscalls on memory prepared before the clone, and
/// exits with status 127 if one of them fails.
pub fn spawn_namespace_init(
    argv: &[CString],
    env: &[CString],
    setup: InitSetup,
) -> io::Result<(u32, OwnedFd)> {
    if argv.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let nofile = setup.nofile.map(|(cur, max)| libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    });
    let mut pidfd: libc::c_int = -1;
    let mut flags = (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64;
    if setup.cgroup.is_some() {
        flags |= CLONE_INTO_CGROUP;
    }
    let args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: setup.cgroup.map_or(0, |fd| fd as u64),
        ..CloneArgs::default()
    };

    // SAFETY: clone3 without CLONE_VM and with no stack behaves like fork:
    // the child runs on a private copy of this stack. With CLONE_PIDFD the
    // kernel writes the new pidfd to `pidfd`, which lives on this stack, as
    // does `args`, of which it reads exactly `size_of_val(&args)` bytes.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of_val(&args),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // In the child only async-signal-safe raw syscalls follow, on
        // pointers into memory that was fully built before the clone.
        // SAFETY: integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        if let Some(fd) = setup.keep_fd {
            // SAFETY: integer arguments only.
            if unsafe { libc::syscall(libc::SYS_fcntl, fd, libc::F_SETFD, 0) } < 0 {
                child_fails();
            }
        }
        if let Some(limit) = &nofile {
            // SAFETY: the kernel reads one rlimit from `limit`, built before
            // the clone, and writes nothing (null old-limit pointer).
            let set = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    libc::RLIMIT_NOFILE,
                    limit as *const libc::rlimit,
                    std::ptr::null_mut::<libc::rlimit>(),
                )
            };
            if set < 0 {
                child_fails();
            }
        }
        // SAFETY: both arrays are NUL-terminated arrays of pointers to
        // NUL-terminated strings that `argv` and `env` keep alive.
        unsafe { libc::execve(argv_ptrs[0], argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
        child_fails();
    }
    // SAFETY: the kernel stored a new pidfd there for the child it created;
    // nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((pid as u32, pidfd))
}

/// Forks the calling process into a child with PID `pid` in the caller's
/// PID namespace (`clone3` with `set_tid`). Returns 0 in the child and the
/// child's PID in the parent.
///
/// # Safety
///
/// As for `fork(2)`: if the calling process has other threads, the child
/// may only make async-signal-safe calls until it execs or exits (another
/// thread may have held a lock, such as the allocator's, at the fork).
unsafe fn fork_with_pid(pid: u32) -> io::Result<u32> {
    let set_tid = [pid as libc::pid_t];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM is a fork, whose child the caller
    // vouches for; `args` and `set_tid` live on this stack for the duration
    // of the call, and the kernel reads exactly `size_of_val(&args)` bytes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of_val(&args),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u32)
}

/// Forks a child with PID `pid` in the caller's PID namespace that does
/// nothing but wait (in `pause`) until something replaces it, such as a
/// restore that rebuilds a process in it. Returns the child's PID.
pub fn fork_waiting_stub(pid: u32) -> io::Result<u32> {
    // SAFETY: the child only calls pause, a raw async-signal-safe syscall,
    // so the fork is sound whatever threads the caller has.
    let child = unsafe { fork_with_pid(pid) }?;
    if child == 0 {
        loop {
            // SAFETY: pause takes no arguments.
            unsafe { libc::pause() };
        }
    }
    Ok(child)
}

/// Starts a process that belongs to no one: a child of a child that exits
/// at once, so it is reparented to the host's init (or the nearest
/// subreaper) and outlives the caller. It leads a session of its own, has
/// /dev/null as its standard streams (and closes every other fd), and
/// waits in `pause` until something replaces it (a template holder is built
/// in it). Returns its PID once its session and streams are its own.
pub fn spawn_orphan() -> io::Result<u32> {
    let null = c"/dev/null";
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned this fd to us; nothing else owns it.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as for the read end.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    let middle = fork_raw()?;
    if middle == 0 {
        // Raw syscalls only, on memory prepared before the fork: the
        // caller may have had other threads.
        let orphan = fork_raw();
        if matches!(orphan, Ok(0)) {
            // SAFETY: no arguments.
            unsafe { libc::setsid() };
            // SAFETY: a static NUL-terminated path.
            let fd = unsafe { libc::open(null.as_ptr(), libc::O_RDWR) };
            if fd < 0 {
                exit_now(127);
            }
            for std in 0..=2 {
                // SAFETY: integer arguments only.
                unsafe { libc::dup2(fd, std) };
            }
            // Its PID, told only now that its session and standard streams
            // are its own: the caller may stop it for good at any moment
            // from then on (fds above stdio it closes itself).
            // SAFETY: no arguments.
            let pid = unsafe { libc::getpid() } as u32;
            // SAFETY: write reads the 4 bytes of a local.
            unsafe { libc::write(write.as_raw_fd(), (&pid as *const u32).cast(), 4) };
            // SAFETY: integer arguments only; closes every fd above stdio.
            unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
            loop {
                // SAFETY: pause takes no arguments.
                unsafe { libc::pause() };
            }
        }
        exit_now(if orphan.is_ok() { 0 } else { 127 });
    }
    drop(write);
    let mut status = 0;
    // SAFETY: waitpid writes the status into an int we own.
    unsafe { libc::waitpid(middle as libc::pid_t, &mut status, 0) };
    let mut pid = [0u8; 4];
    // SAFETY: read writes at most 4 bytes into the array we own.
    let n = unsafe { libc::read(read.as_raw_fd(), pid.as_mut_ptr().cast(), 4) };
    if n != 4 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(io::Error::other("the orphan process could not be forked"));
    }
    Ok(u32::from_ne_bytes(pid))
}

/// A fork by a raw clone: 0 in the child, the child's PID in the parent.
/// The child may only make async-signal-safe calls (see
/// [`spawn_orphan`]).
fn fork_raw() -> io::Result<u32> {
    // SAFETY: clone without CLONE_VM and with a null stack is a fork; the
    // children of its caller make only raw async-signal-safe syscalls on
    // memory prepared before it, whatever threads the caller has.
    let ret = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as u32)
}

/// Ends the calling process without running any exit handler.
fn exit_now(status: i32) -> ! {
    // SAFETY: _exit only ends the calling process.
    unsafe { libc::_exit(status) }
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

/// Makes the child of `cmd` run as `uid`/`gid` with the supplementary
/// `groups` just before `exec`. Registered after
/// [`load_filter_before_exec`], so the filter is loaded while the child is
/// still root (loading it unprivileged would need no_new_privs, which would
/// take set-uid programs away from the application).
pub fn become_user_before_exec(cmd: &mut Command, uid: u32, gid: u32, groups: Vec<u32>) {
    let hook = move || -> io::Result<()> {
        // SAFETY: setgroups reads `groups.len()` gids from a vector
        // allocated before the fork; the child has a single thread.
        if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: integer arguments only.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: integer arguments only; the last change, after which the
        // child holds no capability.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and makes only raw
    // syscalls on memory it owns.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Ends the child of a clone whose setup failed, without running any of
/// the parent's exit handlers.
fn child_fails() -> ! {
    // SAFETY: _exit only ends the calling process.
    unsafe { libc::_exit(127) }
}

/// Makes the child of `cmd` start with RLIMIT_NOFILE (soft, hard), as
/// `prlimit` would.
pub fn limit_nofile_before_exec(cmd: &mut Command, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    let hook = move || -> io::Result<()> {
        // SAFETY: setrlimit reads one rlimit owned by the hook.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs between fork and exec and makes one raw
    // syscall on memory it owns.
    unsafe {
        cmd.pre_exec(hook);
    }
}

fn unblock_all_signals() -> io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe { libc::sigemptyset(set.as_mut_ptr()) };
    // SAFETY: sigemptyset initialised the whole set above.
    let set = unsafe { set.assume_init() };
    // SAFETY: pthread_sigmask reads the set and writes nothing (null old
    // mask).
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe with both ends close-on-exec.
    fn pipe() -> (std::io::PipeReader, OwnedFd) {
        let (r, w) = std::io::pipe().unwrap();
        (r, w.into())
    }

    fn cstrings(items: &[&str]) -> Vec<CString> {
        items.iter().map(|s| CString::new(*s).unwrap()).collect()
    }

    /// A new cgroup2 directory for a test, or why there is none.
    fn test_cgroup() -> Result<std::path::PathBuf, String> {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(std::path::Path::new)
            .find(|r| r.join("cgroup.procs").exists() && r.join("cgroup.controllers").exists())
            .ok_or("no cgroup2 mount")?;
        let dir = root.join(format!("appshot-spawn-test-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(dir)
    }

    #[test]
    fn namespace_init_starts_in_the_given_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: a new PID namespace needs root");
            return;
        }
        let dir = match test_cgroup() {
            Ok(dir) => dir,
            Err(why) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIP: {why}");
                return;
            }
            Err(why) => panic!("CI must have a cgroup2 directory to make: {why}"),
        };
        let (mut out, kept) = pipe();
        let k = kept.as_raw_fd();
        let script = format!("grep '^0::' /proc/self/cgroup >&{k}");
        let argv = cstrings(&["/bin/sh", "-c", &script]);
        let env = cstrings(&["PATH=/usr/bin:/bin"]);
        let cgroup = std::fs::File::open(&dir).unwrap();
        let setup = InitSetup {
            keep_fd: Some(k),
            nofile: None,
            cgroup: Some(cgroup.as_raw_fd()),
        };
        let (pid, _pidfd) = spawn_namespace_init(&argv, &env, setup).unwrap();
        drop(kept);
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        let mut status = 0;
        // SAFETY: waitpid writes the status into an int we own.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(reaped, pid as libc::pid_t);
        std::fs::remove_dir(&dir).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            text.trim_end().ends_with(&format!("/{name}")),
            "started in {text:?}, not in {name}"
        );
    }

    #[test]
    fn namespace_init_keeps_only_the_named_fd_and_starts_with_the_given_limit() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: a new PID namespace needs root");
            return;
        }
        let (mut out, kept) = pipe();
        let (_other_r, other) = pipe();
        let (k, o) = (kept.as_raw_fd(), other.as_raw_fd());
        let script = format!(
            "echo pid=$$ nofile=$(ulimit -n):$(ulimit -Hn) >&{k}; \
             if (: >&{o}) 2>/dev/null; then echo leaked >&{k}; fi; exit 3"
        );
        let argv = cstrings(&["/bin/sh", "-c", &script]);
        let env = cstrings(&["PATH=/usr/bin:/bin"]);
        let mut limits = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one struct rlimit we own.
        let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limits) };
        assert_eq!(r, 0);
        let soft = limits.rlim_max.min(1000) - 1;
        let setup = InitSetup {
            keep_fd: Some(k),
            nofile: Some((soft, limits.rlim_max)),
            cgroup: None,
        };
        let (pid, pidfd) = spawn_namespace_init(&argv, &env, setup).unwrap();
        drop(kept);
        drop(other);

        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).unwrap();
        assert!(fdinfo.contains(&format!("Pid:\t{pid}\n")), "{fdinfo}");
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(
            text,
            format!("pid=1 nofile={soft}:{}\n", limits.rlim_max),
            "the kept fd works, no other fd of ours leaks, the limit applies"
        );
        let mut status = 0;
        // SAFETY: waitpid writes the status into an int we own.
        let reaped = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(reaped, pid as libc::pid_t);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 3);
        // Reaped: its PID may be anyone's now, the pidfd still names it.
        let err = crate::pidfd::send_signal(&pidfd, libc::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }
}
