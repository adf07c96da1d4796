//! Child processes: run-to-completion with a deadline, and background
//! servers that are stopped when their guard goes out of scope, on success,
//! error or interrupt alike.
//!
//! Every child gets its own process group, so that stopping it reaches the
//! processes it forked (socat's per-connection children, appshot's
//! namespace init and application), and so that a Ctrl-C at the terminal
//! reaches the bench alone, which then tears everything down in order.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Set by SIGINT, SIGTERM or SIGHUP.
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// Whether the interrupt has been reported yet.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// How often waits look at their child; the figures are measured inside the
/// probes and tools, so this only bounds the bench's own reaction time.
const POLL: Duration = Duration::from_millis(5);
/// How long a background process gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(2);

/// Turns SIGINT, SIGTERM and SIGHUP into a flag that every wait checks, so
/// an interrupted bench unwinds through the guards and stops what it
/// started. A second signal exits at once. A handler rather than a blocked
/// mask and `sigwait`: children inherit a mask (std does not reset it) and
/// would then ignore the SIGTERM that stops them, while handlers are reset
/// by exec.
pub fn watch_signals() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::flag;
    let interrupted = INTERRUPTED.get_or_init(Arc::default);
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Registered first, so it sees the flag as the previous signal left it.
        flag::register_conditional_shutdown(sig, 130, Arc::clone(interrupted))
            .context("installing signal handlers")?;
        flag::register(sig, Arc::clone(interrupted)).context("installing signal handlers")?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    let set = INTERRUPTED.get().is_some_and(|f| f.load(Ordering::SeqCst));
    if set && !ANNOUNCED.swap(true, Ordering::SeqCst) {
        eprintln!(
            "appshot-bench: interrupted: stopping everything it started (again to exit at once)"
        );
    }
    set
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Marks the fds the bench inherited above stderr close-on-exec, so that
/// the processes it measures get only stdin, stdout and stderr. Whoever
/// started the bench (a CI runner, a terminal multiplexer) may have left
/// pipes and files open, from another mount namespace too: CRIU refuses to
/// dump a file it cannot find a mount for, and appshot would save it.
pub fn keep_inherited_fds() -> anyhow::Result<()> {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // The directory's own fd is closed by now: EBADF.
        match fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            Ok(_) | Err(Errno::EBADF) => {}
            Err(e) => return Err(e).with_context(|| format!("marking fd {fd} close-on-exec")),
        }
    }
    Ok(())
}

/// Makes the bench the reaper of the processes orphaned below it: the trees
/// `criu restore -d` leaves behind when the criu command exits, and an
/// nginx tree's workers killed after their master. Otherwise they go to the
/// PID namespace's init, which in a container need not reap them, and a
/// zombie keeps its PID, the one the next round's restore needs again.
pub fn become_subreaper() -> anyhow::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")
}

/// Processes that are not the bench's `Child`ren (a tree `criu restore -d`
/// left behind): killed when dropped and waited for until their PIDs are
/// free.
pub struct Orphans(pub Vec<u32>);

impl Drop for Orphans {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Err(e) = wait_gone(&self.0) {
            eprintln!("appshot-bench: {e:#}");
        }
    }
}

/// Waits until none of `pids` exists, reaping those that were orphaned to
/// the bench (`become_subreaper`); a PID is waited for by number, never
/// with -1, which would take the exit status of a `Child` std still owns.
pub fn wait_gone(pids: &[u32]) -> anyhow::Result<()> {
    let gone = || {
        pids.iter().all(|&p| {
            // ECHILD: not the bench's child, its parent reaps it.
            let _ = waitpid(Pid::from_raw(p as i32), Some(WaitPidFlag::WNOHANG));
            !Path::new(&format!("/proc/{p}")).exists()
        })
    };
    wait_for(Duration::from_secs(10), POLL, || Ok(gone().then_some(())))?
        .ok_or_else(|| anyhow!("processes {pids:?} still there 10 s after SIGKILL"))
}

/// `argv[0]` with the arguments `argv[1..]`.
pub fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Starts `cmd` in a process group of its own, with no standard input.
pub fn spawn(
    cmd: &mut Command,
    what: &str,
    stdout: impl Into<Stdio>,
    stderr: impl Into<Stdio>,
) -> anyhow::Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))
}

/// Starts `argv` as the leader of a session of its own (and so of its own
/// process group), with no standard input: the process a CRIU dump takes as
/// its root. CRIU refuses a root task whose session leader it cannot see
/// (`getsid` gives 0 when the caller runs in a PID namespace entered from
/// outside its session, as CI's does), and a session of its own needs no
/// `--shell-job`. Through setsid(1), which calls setsid(2) and execs in place
/// because the child it is started as does not lead a process group, so the
/// child's PID is the program's.
pub fn spawn_session_leader(
    argv: &[String],
    what: &str,
    stdout: impl Into<Stdio>,
    stderr: impl Into<Stdio>,
) -> anyhow::Result<Child> {
    Command::new("setsid")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {what} in a session of its own"))
}

/// Asks `ready` every `every` until it gives a value and returns that
/// value, or `None` once `timeout` has passed. Fails as soon as `ready`
/// fails or the bench is interrupted.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut ready: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = ready()? {
            return Ok(Some(value));
        }
        check_interrupted()?;
        if Instant::now() > deadline {
            return Ok(None);
        }
        std::thread::sleep(every);
    }
}

/// Runs `cmd` to its end and returns its standard output. Fails, with the
/// tail of its output, on a non-zero exit, after `timeout`, or when the
/// bench is interrupted (the process group is then killed).
pub fn run(cmd: &mut Command, what: &str, timeout: Duration) -> anyhow::Result<String> {
    run_inner(cmd, what, timeout, true)
}

/// `run` for cleanup (`appshot stop`), which must go on after an interrupt.
pub fn run_cleanup(cmd: &mut Command, what: &str, timeout: Duration) -> anyhow::Result<String> {
    run_inner(cmd, what, timeout, false)
}

fn run_inner(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
    interruptible: bool,
) -> anyhow::Result<String> {
    let mut child = spawn(cmd, what, Stdio::piped(), Stdio::piped())?;
    // Readers on their own threads: a child filling one pipe while we read
    // the other would otherwise deadlock.
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let reason = if interruptible && interrupted() {
            Some("interrupted".to_string())
        } else if Instant::now() > deadline {
            Some(format!("timed out after {}s", timeout.as_secs()))
        } else {
            None
        };
        if let Some(reason) = reason {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
            bail!("{what}: {reason}");
        }
        std::thread::sleep(POLL);
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{what} failed ({}){}{}",
            describe(status),
            tail("stderr", &stderr),
            tail("stdout", &stdout)
        );
    }
    Ok(stdout)
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = r.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The last lines of some output, as a labelled block for an error.
pub fn tail(label: &str, text: &str) -> String {
    const LINES: usize = 15;
    let lines: Vec<&str> = text.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let from = lines.len().saturating_sub(LINES);
    format!(
        "\n--- {label} (last lines) ---\n{}",
        lines[from..].join("\n")
    )
}

/// A process that runs until its guard is dropped, with its output in a
/// log file.
pub struct Background {
    what: String,
    child: Child,
    log: PathBuf,
    reaped: Option<ExitStatus>,
}

impl Background {
    pub fn spawn(mut cmd: Command, what: &str, log_dir: &Path) -> anyhow::Result<Background> {
        let log = log_dir.join(format!("{}.log", sanitize(what)));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = spawn(&mut cmd, what, file.try_clone()?, file)?;
        Ok(Background {
            what: what.to_string(),
            child,
            log,
            reaped: None,
        })
    }

    /// As [`Background::spawn`], `argv` leading a session of its own, as a
    /// daemon does (and a server under `appshot run -d`, whose supervisor
    /// calls setsid): a session is a scheduler autogroup too, which alone
    /// changed a one-CPU request/response rate by 8 % here.
    pub fn spawn_session(
        argv: &[String],
        what: &str,
        log_dir: &Path,
    ) -> anyhow::Result<Background> {
        let log = log_dir.join(format!("{}.log", sanitize(what)));
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = spawn_session_leader(argv, what, file.try_clone()?, file)?;
        Ok(Background {
            what: what.to_string(),
            child,
            log,
            reaped: None,
        })
    }

    /// An error, with its log, if the process has ended.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.poll()? {
            bail!(
                "{} exited ({}){}",
                self.what,
                describe(status),
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Waits for a process that is meant to end on its own (a one-off
    /// server) and fails unless it ends successfully within `timeout`.
    pub fn wait_success(&mut self, timeout: Duration) -> anyhow::Result<()> {
        match wait_for(timeout, POLL, || self.poll())? {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "{} failed ({}){}",
                self.what,
                describe(status),
                self.log_tail()
            ),
            None => Err(anyhow!(
                "{} still running {}s after its client finished{}",
                self.what,
                timeout.as_secs(),
                self.log_tail()
            )),
        }
    }

    pub fn log_tail(&self) -> String {
        tail(
            &self.log.display().to_string(),
            &std::fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }

    fn poll(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.reaped.is_none() {
            self.reaped = self.child.try_wait()?;
        }
        Ok(self.reaped)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let group = Pid::from_raw(self.child.id() as i32);
        if self.reaped.is_none() {
            // The leader stays a zombie, its PID and group ID reserved,
            // until it is reaped below: the SIGKILL cannot reach a stranger.
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + GRACE;
            while Instant::now() < deadline && !is_zombie_or_gone(self.child.id()) {
                std::thread::sleep(POLL);
            }
        }
        // Also for a leader already gone: its forked children may remain.
        let _ = killpg(group, Signal::SIGKILL);
        if self.reaped.is_none() {
            let _ = self.child.wait();
        }
    }
}

/// A child whose output is read line by line as it comes, each line with
/// the instant it arrived: when another process answered, measured without
/// a clock shared with it. Killed (with its process group) if dropped
/// before it ended.
pub struct Lines {
    what: String,
    child: Child,
    lines: Receiver<(Instant, String)>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reaped: bool,
}

impl Lines {
    pub fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Lines> {
        let mut child = spawn(cmd, what, Stdio::piped(), Stdio::piped())?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = drain(child.stderr.take().expect("piped"));
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Lines {
            what: what.to_string(),
            child,
            lines,
            stderr: Some(stderr),
            reaped: false,
        })
    }

    /// The next line and when it arrived. Fails, with the child's stderr,
    /// when the child ends its output first or after `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> anyhow::Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(POLL) {
                Ok(line) => return Ok(line),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    self.reaped = true;
                    let stderr = self.stderr_tail();
                    bail!(
                        "{} ended ({}) without printing the line expected{stderr}",
                        self.what,
                        describe(status),
                    );
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() > deadline => {
                    bail!("{}: no line within {}s", self.what, timeout.as_secs())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Waits for the child to end; fails unless it ends successfully
    /// within `timeout`.
    pub fn wait_success(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let Some(status) = wait_for(timeout, POLL, || Ok(self.child.try_wait()?))? else {
            bail!("{} still running after {}s", self.what, timeout.as_secs());
        };
        self.reaped = true;
        if !status.success() {
            let stderr = self.stderr_tail();
            bail!("{} failed ({}){stderr}", self.what, describe(status));
        }
        Ok(())
    }

    fn stderr_tail(&mut self) -> String {
        let text = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        tail("stderr", &text)
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // Only while the leader is unreaped: its group ID is reserved until
        // then, so the signal cannot reach a stranger.
        if !self.reaped {
            let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN_SECS: Duration = Duration::from_secs(10);

    fn sh(script: &str) -> Command {
        command(&["sh".into(), "-c".into(), script.into()])
    }

    /// Fails unless the error's message has every one of `parts`.
    fn assert_mentions<T: std::fmt::Debug>(result: anyhow::Result<T>, parts: &[&str]) {
        let err = result.unwrap_err().to_string();
        for part in parts {
            assert!(err.contains(part), "{err}");
        }
    }

    #[test]
    fn run_returns_stdout_and_reports_failures_with_output() {
        let out = run(&mut sh("echo hello"), "echo", TEN_SECS).unwrap();
        assert_eq!(out, "hello\n");
        assert_mentions(
            run(&mut sh("echo oops >&2; exit 3"), "failing", TEN_SECS),
            &["failing failed (exit status 3)", "oops"],
        );
    }

    #[test]
    fn run_kills_at_the_deadline() {
        let start = Instant::now();
        let err = run(
            Command::new("sleep").arg("30"),
            "sleeper",
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.to_string().contains("timed out"));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn lines_arrive_one_by_one_with_their_time() {
        let mut lines =
            Lines::spawn(&mut sh("echo first; sleep 0.3; echo second"), "two lines").unwrap();
        let (t1, first) = lines.next_line(TEN_SECS).unwrap();
        let (t2, second) = lines.next_line(TEN_SECS).unwrap();
        assert_eq!((first.as_str(), second.as_str()), ("first", "second"));
        assert!(t2 - t1 >= Duration::from_millis(250), "{:?}", t2 - t1);
        lines.wait_success(TEN_SECS).unwrap();
    }

    #[test]
    fn lines_report_a_child_that_ends_without_the_line() {
        let mut lines = Lines::spawn(&mut sh("echo refused >&2; exit 1"), "silent child").unwrap();
        assert_mentions(
            lines.next_line(TEN_SECS),
            &["silent child ended (exit status 1)", "refused"],
        );
    }

    #[test]
    fn a_session_leader_keeps_the_pid_it_was_started_with() {
        let mut child = spawn_session_leader(
            &["sleep".into(), "30".into()],
            "session leader",
            Stdio::null(),
            Stdio::null(),
        )
        .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // setsid(1) execs sleep; until then the comm is setsid's.
        let deadline = Instant::now() + TEN_SECS;
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n" {
            assert!(Instant::now() < deadline, "sleep never ran");
            std::thread::sleep(POLL);
        }
        assert_eq!(nix::unistd::getsid(Some(pid)).unwrap(), pid);
        assert_eq!(nix::unistd::getpgid(Some(pid)).unwrap(), pid);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn dropping_a_background_process_stops_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        let cmd = sh(&format!("sleep 60 & echo $! > {}; wait", pidfile.display()));
        let mut bg = Background::spawn(cmd, "group test", dir.path()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild = loop {
            if let Ok(p) = std::fs::read_to_string(&pidfile) {
                if let Ok(p) = p.trim().parse::<u32>() {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "no grandchild");
            std::thread::sleep(POLL);
        };
        bg.check_running().unwrap();
        drop(bg);
        // The grandchild was reparented and may linger as a zombie for a
        // moment, but it must not be running.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_zombie_or_gone(grandchild) {
            assert!(Instant::now() < deadline, "grandchild survived");
            std::thread::sleep(POLL);
        }
    }
}
