//! `appshot __init`: PID 1 of an instance's PID namespace.
//!
//! It gives the instance a mount namespace and a `/proc` of its own, starts
//! the application under the seccomp filter (the filter's
//! listener goes to the supervisor over the inherited channel), forwards the
//! signals the supervisor sends it, and reaps every process of the
//! namespace. It exits when the last of them is gone, with the
//! application's status, so daemonising programs (nginx's default) keep
//! their instance alive.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::seccomp::filter;
use crate::supervisor::APP_ENV;

/// Signals the kernel sends on its own (terminal keys, hangups) reach the
/// application directly through its process group; init forwards only those
/// sent by a process, such as the supervisor's SIGTERM on `appshot stop`.
const SI_KERNEL: i32 = 0x80;

/// Why init failed, naming the call or object.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{call}")]
    Sys {
        call: &'static str,
        #[source]
        error: Errno,
    },
    #[error("creating PID {pid} to restore into")]
    Stub {
        pid: u32,
        #[source]
        error: std::io::Error,
    },
    #[error("no PID to restore into")]
    NoStub,
    #[error("channel fd {fd}: {what}")]
    Channel {
        fd: RawFd,
        what: &'static str,
        #[source]
        error: std::io::Error,
    },
    #[error("bind-mounting the instance's own file over {}", target.display())]
    IdentityFile {
        target: PathBuf,
        #[source]
        error: Errno,
    },
    #[error("the supervisor closed the channel before sending the clone's identity")]
    NoIdentity,
    #[error("decoding the clone's identity")]
    Identity(#[source] serde_json::Error),
    #[error("decoding {APP_ENV}")]
    AppEnv(#[source] serde_json::Error),
    #[error("{APP_ENV} is not valid Unicode")]
    AppEnvNotUnicode,
    #[error("no command to run")]
    NoCommand,
    #[error("working directory {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Filter(#[from] crate::error::FilterError),
    #[error("setting the hostname {hostname}")]
    Hostname {
        hostname: String,
        #[source]
        error: Errno,
    },
}

/// An `InitError::Sys` for `call`.
fn sys(call: &'static str) -> impl FnOnce(Errno) -> InitError {
    move |error| InitError::Sys { call, error }
}

/// What init starts.
pub enum Start {
    /// The command, whose filter's listener goes to `channel_fd`.
    Launch { channel_fd: RawFd },
    /// A stub with each of these PIDs for a restore to rebuild (the image's
    /// top-level processes); the first is looked after as the application.
    Restore { pids: Vec<u32> },
    /// A clone forked from a template holder: it appears as init's child
    /// with PID `pid` once its supervisor forked it into init's
    /// namespaces. Over `channel_fd` init says `shell` once its namespaces
    /// exist, then takes the clone's [`Identity`] (which may come much
    /// later: an instance shell waits in a template's pool until a clone
    /// claims it) and says `ready` once it applied it.
    Await { pid: u32, channel_fd: RawFd },
}

/// What makes an awaiting init's instance the clone's own, sent by its
/// supervisor as one JSON message.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    pub hostname: Option<String>,
    /// (source, target) as [`InitArgs::files`].
    pub files: Vec<(PathBuf, PathBuf)>,
}

pub struct InitArgs {
    pub start: Start,
    /// (source, target): bind-mount each of the instance's own files (its
    /// identity and environment files) over `target` in the instance's
    /// mount namespace.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// A hostname of its own, in a UTS namespace of its own (a clone's).
    pub hostname: Option<String>,
    pub cwd: Option<PathBuf>,
    /// Who the launched application runs as.
    pub user: Option<crate::supervisor::user::RunAs>,
    pub command: Vec<String>,
    /// Which calls the launched application's filter notifies.
    pub routing: crate::net::connroutes::Routing,
}

pub fn run(args: InitArgs) -> Result<i32, InitError> {
    let app_env = app_env()?;
    let all = SigSet::all();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), None)
        .map_err(sys("blocking signals in init"))?;
    let signals = SignalFd::with_flags(&all, SfdFlags::SFD_CLOEXEC).map_err(sys("signalfd"))?;
    keep_inherited_fds_from_app();
    own_mounts(&args.files)?;
    // An awaiting init learns its hostname later, in the UTS namespace it
    // makes now.
    let awaits = matches!(args.start, Start::Await { .. });
    if args.hostname.is_some() || awaits {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)
            .map_err(sys("unsharing the UTS namespace"))?;
    }
    if let Some(hostname) = &args.hostname {
        set_hostname(hostname)?;
    }

    let main = match &args.start {
        Start::Restore { pids } => {
            let mut main = None;
            for &pid in pids {
                // The restore replaces everything the stub has; until then
                // it must do nothing.
                let child = appshot_sys::spawn::fork_waiting_stub(pid)
                    .map_err(|error| InitError::Stub { pid, error })?;
                main.get_or_insert(Pid::from_raw(child as i32));
            }
            main.ok_or(InitError::NoStub)?
        }
        Start::Await { pid, channel_fd } => {
            let channel = take_channel(*channel_fd)?;
            nix::unistd::write(&channel, b"shell").map_err(sys("saying the namespaces exist"))?;
            take_identity(&channel)?;
            nix::unistd::write(&channel, b"ready")
                .map_err(sys("saying the namespaces are ready"))?;
            Pid::from_raw(*pid as i32)
        }
        Start::Launch { channel_fd } => {
            let channel = take_channel(*channel_fd)?;
            let confirm = channel.try_clone().map_err(|error| InitError::Channel {
                fd: *channel_fd,
                what: "duplicating it",
                error,
            })?;
            let main = match launch(&args, &app_env, channel) {
                Ok(main) => main,
                // Like a shell (and podman): 127 when the command is not
                // found, 126 when it cannot be executed; the supervisor
                // passes the status on as the CLI's.
                Err(Launch::Exec(e)) => {
                    eprintln!("appshot: {}: {e}", args.command[0]);
                    return Ok(exec_status(&e));
                }
                Err(Launch::Other(e)) => return Err(e),
            };
            // The listener went out before exec; only now is it known that
            // exec succeeded, and the supervisor waits for this word.
            nix::unistd::write(&confirm, b"started").map_err(sys("confirming the start"))?;
            main
        }
    };
    let mut status: Option<i32> = None;

    loop {
        let Some(info) = signals.read_signal().map_err(sys("reading signals"))? else {
            continue;
        };
        let signo = info.ssi_signo as i32;
        if signo == libc::SIGCHLD {
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) if pid == main => status = Some(code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) if pid == main => {
                        status = Some(128 + sig as i32)
                    }
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => {}
                    Err(Errno::ECHILD) => return Ok(status.unwrap_or(0)),
                    Err(e) => return Err(sys("waitpid")(e)),
                }
            }
            continue;
        }
        if info.ssi_code == SI_KERNEL {
            continue;
        }
        let Ok(sig) = Signal::try_from(signo) else {
            continue;
        };
        // Once the main process is gone the remaining daemons get it.
        let target = if status.is_none() {
            main
        } else {
            Pid::from_raw(-1)
        };
        let _ = kill(target, sig);
    }
}

/// Gives the instance a mount namespace of its own, with a `/proc` of its
/// PID namespace, so that it sees its own processes only (and `/proc/1` is
/// this init), and with the identity file, if any, bind-mounted over its
/// target. The application and a restore's stub are forked after this and
/// inherit it.
fn own_mounts(files: &[(PathBuf, PathBuf)]) -> Result<(), InitError> {
    use nix::mount::{mount, MsFlags};
    // An IPC namespace of its own too: its System V objects are its own,
    // and a restore can make them again with their ids.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWIPC)
        .map_err(sys("unsharing the mount and IPC namespaces"))?;
    // Slave: mounts the host makes later (a volume with files a restore
    // maps) still appear here, and nothing mounted here reaches the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("making / a slave of the host's mounts"))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("mounting the instance's /proc"))?;
    for (source, target) in files {
        bind_file(source, target)?;
    }
    Ok(())
}

/// Bind-mounts a file of the instance's own (its identity or environment
/// file) over `target` in its mount namespace.
fn bind_file(source: &Path, target: &Path) -> Result<(), InitError> {
    use nix::mount::{mount, MsFlags};
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|error| InitError::IdentityFile {
        target: target.to_path_buf(),
        error,
    })
}

/// Waits for the clone's identity on `channel` and applies it: its
/// identity and environment files and its hostname (its supervisor moves
/// init into the instance's cgroup once the clone runs).
fn take_identity(channel: &OwnedFd) -> Result<(), InitError> {
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match nix::unistd::read(channel.as_raw_fd(), &mut buf) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(sys("reading the clone's identity"))?,
        }
    };
    if n == 0 {
        return Err(InitError::NoIdentity);
    }
    let identity: Identity = serde_json::from_slice(&buf[..n]).map_err(InitError::Identity)?;
    for (source, target) in &identity.files {
        bind_file(source, target)?;
    }
    if let Some(hostname) = &identity.hostname {
        set_hostname(hostname)?;
    }
    Ok(())
}

/// Sets the hostname of init's own UTS namespace: what `uname` and
/// `gethostname` answer its processes.
fn set_hostname(hostname: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(hostname).map_err(|error| InitError::Hostname {
        hostname: hostname.to_string(),
        error,
    })
}

/// The config's variables for the application, which the supervisor passes
/// in [`APP_ENV`] rather than on init's command line.
fn app_env() -> Result<Vec<(String, String)>, InitError> {
    match std::env::var(APP_ENV) {
        Ok(json) => serde_json::from_str(&json).map_err(InitError::AppEnv),
        Err(std::env::VarError::NotPresent) => Ok(Vec::new()),
        Err(std::env::VarError::NotUnicode(_)) => Err(InitError::AppEnvNotUnicode),
    }
}

/// Why the application did not start: the exec itself (its status tells
/// the operator what to fix) or anything before it.
enum Launch {
    Exec(std::io::Error),
    Other(InitError),
}

/// The status a shell gives a command that could not be executed.
fn exec_status(e: &std::io::Error) -> i32 {
    match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        _ => 126,
    }
}

fn launch(args: &InitArgs, app_env: &[(String, String)], channel: OwnedFd) -> Result<Pid, Launch> {
    let program = filter::build(args.routing).map_err(|e| Launch::Other(e.into()))?;
    let Some((path, rest)) = args.command.split_first() else {
        return Err(Launch::Other(InitError::NoCommand));
    };
    // The application gets init's environment (the supervisor's, which is
    // its starter's) with the config's variables over it, and none of
    // appshot's internal ones.
    let mut cmd = Command::new(path);
    cmd.args(rest)
        .env_remove(APP_ENV)
        .envs(app_env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &args.cwd {
        // Checked here so that a missing directory is appshot's error
        // (125), not taken for a missing command (127).
        if !cwd.is_dir() {
            return Err(Launch::Other(InitError::NotADirectory(cwd.clone())));
        }
        cmd.current_dir(cwd);
    }
    appshot_sys::spawn::load_filter_before_exec(&mut cmd, program, channel);
    if let Some(user) = &args.user {
        appshot_sys::spawn::become_user_before_exec(
            &mut cmd,
            user.uid,
            user.gid,
            user.groups.clone(),
        );
    }
    let child = cmd.spawn().map_err(Launch::Exec)?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// Descriptors the supervisor inherited from whoever started it (a shell's
/// stray fds) must not reach the application: like a container runtime,
/// the application starts with stdio only.
fn keep_inherited_fds_from_app() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
}

/// The one `unsafe` outside `sys`: only this process's command line can
/// vouch for who owns an fd it names.
#[allow(unsafe_code)]
fn take_channel(fd: RawFd) -> Result<OwnedFd, InitError> {
    // SAFETY: the supervisor created `fd` for this process alone and names
    // it once on the command line, and `run` claims it once.
    let channel = unsafe { appshot_sys::fd::inherit(fd) }.map_err(|error| InitError::Channel {
        fd,
        what: "not open",
        error,
    })?;
    // The application must not inherit the channel past exec.
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| InitError::Channel {
        fd,
        what: "setting close-on-exec",
        error: e.into(),
    })?;
    Ok(channel)
}
