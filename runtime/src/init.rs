//! `appshot __init`: PID 1 of an instance's PID namespace.
//!
//! It starts the application under the seccomp filter (the filter's
//! listener goes to the supervisor over the inherited channel), forwards the
//! signals the supervisor sends it, and reaps every process of the
//! namespace. It exits when the last of them is gone, with the
//! application's status, so daemonising programs (nginx's default) keep
//! their instance alive.

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::filter;

/// Signals the kernel sends on its own (terminal keys, hangups) reach the
/// application directly through its process group; init forwards only those
/// sent by a process, such as the supervisor's SIGTERM on `appshot stop`.
const SI_KERNEL: i32 = 0x80;

pub struct InitArgs {
    pub channel_fd: RawFd,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub command: Vec<String>,
}

pub fn run(args: InitArgs) -> anyhow::Result<i32> {
    let channel = take_channel(args.channel_fd)?;
    let all = SigSet::all();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&all), None)
        .context("blocking signals in init")?;
    let signals = SignalFd::with_flags(&all, SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let program = filter::build()?;
    let Some((path, rest)) = args.command.split_first() else {
        bail!("no command to run");
    };
    let mut cmd = Command::new(path);
    cmd.args(rest).envs(args.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &args.cwd {
        cmd.current_dir(cwd);
    }
    appshot_sys::spawn::load_filter_before_exec(&mut cmd, program, channel);
    let child = cmd.spawn().with_context(|| format!("starting `{path}`"))?;
    drop(cmd);
    let main = Pid::from_raw(child.id() as i32);
    let mut status: Option<i32> = None;

    loop {
        let Some(info) = signals.read_signal().context("reading signals")? else {
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
                    Err(e) => bail!("waitpid: {e}"),
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

fn take_channel(fd: RawFd) -> anyhow::Result<OwnedFd> {
    let channel = appshot_sys::fd::inherit(fd).with_context(|| format!("channel fd {fd}"))?;
    // The application must not inherit the channel past exec.
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("setting close-on-exec on the channel")?;
    Ok(channel)
}
