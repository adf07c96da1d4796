//! Detached instances: `appshot __supervise` started in a session of its
//! own, logging to `RUN_DIR/logs/NAME/`, and its answer on a pipe: whether
//! the instance runs. Several can be under way at once (`clone --count`).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use appshot_vpm::Registry;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use appshot::supervisor::{logs, pool};
use appshot::supervisor::{Launch, LAUNCH_ENV};

/// How long a supervisor may take to answer before it is taken for hung
/// (and killed, with its instance).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a claimed shell that failed may take to end (and finish its
/// log) before its log is read anyway.
const SHELL_END_TIMEOUT_MS: u16 = 5000;

/// Starts the supervisor of `launch` and returns once the instance has run
/// for the supervisor's start period: 0 when it runs (its name printed),
/// an error (125, or 126/127 when the command could not be executed) when
/// it ended before.
pub fn detach_supervisor(launch: &Launch, verbose: u8) -> anyhow::Result<i32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let starting = spawn(launch, verbose, 0, &tx)?;
    drop(tx);
    report(launch, starting, &rx)
}

/// [`detach_supervisor`] for a single clone whose launch was made without
/// opening its template: it claims one of the template's instance shells,
/// which completes the launch from the image it holds and makes the
/// clone's logs (`pool::claim` unopened). `None` when no shell took it
/// (none is ready, or the image changed since they opened it): the caller
/// then opens the template and starts the clone as any.
pub fn detach_unopened(launch: &Launch) -> anyhow::Result<Option<i32>> {
    // Checked before a shell touches the logs: they belong to the running
    // instance.
    if appshot_vpm::is_alive(&launch.run_dir, &launch.name) {
        return Err(appshot_vpm::VpmError::NameInUse(launch.name.clone()).into());
    }
    let Some(claim) = pool::claim(launch, true) else {
        return Ok(None);
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let log_dir = logs::dir(&launch.run_dir, &launch.name);
    let starting = claimed(launch, claim, log_dir, 0, &tx);
    drop(tx);
    report(launch, starting, &rx).map(Some)
}

/// Waits for the answer of a single detached start and says how it went:
/// the instance's name when it runs, or why not.
fn report(
    launch: &Launch,
    starting: Starting,
    answers: &Receiver<(usize, String)>,
) -> anyhow::Result<i32> {
    let answer = next_answer(answers, starting.deadline()).map(|(_, line)| line);
    match starting.finish(answer)? {
        Started::Running => {
            println!("{}", launch.name);
            Ok(0)
        }
        Started::NotExecuted { status, output } => {
            eprintln!("{}", output.trim_end());
            Ok(status)
        }
        Started::Refused { status, message } => {
            eprintln!("appshot: {message}");
            Ok(status)
        }
    }
}

/// A supervisor started and not yet heard from.
pub struct Starting {
    name: String,
    log_dir: PathBuf,
    pidfile: Option<PathBuf>,
    supervisor: Supervisor,
    since: Instant,
}

/// The supervisor of a start: our child, or a claimed instance shell.
enum Supervisor {
    Child(Child),
    Shell {
        pid: u32,
        pidfd: std::os::fd::OwnedFd,
    },
}

impl Supervisor {
    fn id(&self) -> u32 {
        match self {
            Supervisor::Child(c) => c.id(),
            Supervisor::Shell { pid, .. } => *pid,
        }
    }

    fn kill(&mut self) {
        match self {
            Supervisor::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Supervisor::Shell { pidfd, .. } => {
                let _ = appshot_sys::pidfd::send_signal(pidfd, libc::SIGKILL);
            }
        }
    }

    /// Its exit status, once it ended; a shell, not our child, has none to
    /// give (its log says why), but its end is awaited all the same: it
    /// closes the claim's connection before it logs why it failed, and its
    /// log's tail is read next.
    fn wait(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self {
            Supervisor::Child(c) => Ok(Some(c.wait().context("waiting for the supervisor")?)),
            Supervisor::Shell { pidfd, .. } => {
                let mut ended = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
                let _ = poll(&mut ended, PollTimeout::from(SHELL_END_TIMEOUT_MS));
                Ok(None)
            }
        }
    }
}

/// How a start went that did not fail in appshot itself.
pub enum Started {
    Running,
    /// The command could not be executed (126) or found (127): the
    /// supervisor's output says why.
    NotExecuted {
        status: i32,
        output: String,
    },
    /// A claimed instance shell refused the clone before it started
    /// anything (see [`REFUSED`]), as the CLI would have: `message` is
    /// the error the CLI prints, `status` its exit status.
    Refused {
        status: i32,
        message: String,
    },
}

/// How a claimed shell that completes its clone's launch refuses it (the
/// name in use, its logs that cannot be made): `refused STATUS MESSAGE`,
/// one line, on the claim's connection instead of `running`.
pub const REFUSED: &str = "refused";

/// The line a claimed shell sends to refuse its clone with `error`.
pub fn refusal(status: u8, error: &anyhow::Error) -> String {
    let message = format!("{error:#}").replace('\n', " ");
    format!("{REFUSED} {status} {message}\n")
}

/// A refusal line's status and message.
fn parse_refusal(line: &str) -> Option<(i32, String)> {
    let rest = line.trim_end().strip_prefix(REFUSED)?.strip_prefix(' ')?;
    let (status, message) = rest.split_once(' ')?;
    Some((status.parse().ok()?, message.to_string()))
}

/// Starts `appshot __supervise` for `launch` in its own session. Its
/// answer (a line, empty if it ended without one) arrives on `answers`
/// tagged with `tag`.
pub fn spawn(
    launch: &Launch,
    verbose: u8,
    tag: usize,
    answers: &Sender<(usize, String)>,
) -> anyhow::Result<Starting> {
    // Checked before the logs are touched: they belong to the running
    // instance.
    if appshot_vpm::is_alive(&launch.run_dir, &launch.name) {
        return Err(appshot_vpm::VpmError::NameInUse(launch.name.clone()).into());
    }
    // Opened first: it creates the run directory private, and so the logs.
    let registry = Registry::open(&launch.run_dir)?;
    let log_dir = logs::make_dir(&registry, &launch.name)?;
    if let Some(claim) = pool::claim(launch, false) {
        return Ok(claimed(launch, claim, log_dir, tag, answers));
    }
    let log = logs::append(&log_dir.join(logs::SUPERVISOR_LOG))?;
    let exe = std::env::current_exe().context("locating the appshot binary")?;
    let mut cmd = Command::new(exe);
    if verbose > 0 {
        cmd.arg(format!("-{}", "v".repeat(verbose as usize)));
    }
    let mut child = cmd
        .arg("--run-dir")
        .arg(&launch.run_dir)
        .arg("__supervise")
        .env(LAUNCH_ENV, serde_json::to_string(launch)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting the supervisor")?;
    // The supervisor answers on its stdout: `running`, or `exited STATUS`;
    // nothing (end of file) when it failed before the instance ran.
    let pipe = child.stdout.take().expect("piped stdout");
    let tx = answers.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(pipe), &mut line);
        let _ = tx.send((tag, line));
    });
    Ok(Starting {
        name: launch.name.clone(),
        log_dir,
        pidfile: launch.pidfile.clone(),
        supervisor: Supervisor::Child(child),
        since: Instant::now(),
    })
}

/// The start of `launch` by the shell it claimed; its answer arrives on
/// `answers` tagged with `tag`.
fn claimed(
    launch: &Launch,
    claim: pool::Claim,
    log_dir: PathBuf,
    tag: usize,
    answers: &Sender<(usize, String)>,
) -> Starting {
    let tx = answers.clone();
    let pipe = claim.answer;
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(pipe), &mut line);
        let _ = tx.send((tag, line));
    });
    Starting {
        name: launch.name.clone(),
        log_dir,
        pidfile: launch.pidfile.clone(),
        supervisor: Supervisor::Shell {
            pid: claim.pid,
            pidfd: claim.pidfd,
        },
        since: Instant::now(),
    }
}

/// The next answer on `answers` before `deadline`; `None` past it.
pub fn next_answer(
    answers: &Receiver<(usize, String)>,
    deadline: Instant,
) -> Option<(usize, String)> {
    // Never disconnected first: every reader thread sends before it ends.
    answers
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .ok()
}

impl Starting {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When its answer is overdue.
    pub fn deadline(&self) -> Instant {
        self.since + START_TIMEOUT
    }

    /// Ends the start with the supervisor's `answer`, or, without one (it
    /// is overdue), by killing the supervisor, which takes its instance
    /// with it: no start is left under way unaccounted for.
    pub fn finish(mut self, answer: Option<String>) -> anyhow::Result<Started> {
        let Some(answer) = answer else {
            self.supervisor.kill();
            bail!(
                "instance `{}` did not start within {}s and was stopped; see {}",
                self.name,
                START_TIMEOUT.as_secs(),
                self.log_dir.display()
            );
        };
        if answer.trim() == "running" {
            if let Some(path) = &self.pidfile {
                std::fs::write(path, format!("{}\n", self.supervisor.id()))
                    .with_context(|| format!("writing the pidfile {}", path.display()))?;
            }
            return Ok(Started::Running);
        }
        if let Some((status, message)) = parse_refusal(&answer) {
            return Ok(Started::Refused { status, message });
        }
        let status = self.supervisor.wait()?;
        let output = logs::tail(&self.log_dir);
        let why = match answer.trim().strip_prefix("exited ") {
            Some(code) => format!("exited during start with status {code}"),
            // The supervisor's own error (its status is 125, 126 or 127).
            None => match status.and_then(|s| s.code()) {
                Some(status @ (126 | 127)) => {
                    return Ok(Started::NotExecuted { status, output });
                }
                _ => match status {
                    Some(status) => format!("failed to start ({status})"),
                    None => "failed to start".to_string(),
                },
            },
        };
        bail!(
            "instance `{}` {why}; {}:\n{}",
            self.name,
            self.log_dir.display(),
            output.trim_end()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_status_and_message_on_one_line() {
        let error = anyhow::anyhow!("second line").context("first");
        let line = refusal(125, &error);
        assert_eq!(line, "refused 125 first: second line\n");
        assert_eq!(
            parse_refusal(&line),
            Some((125, "first: second line".to_string()))
        );
        let multi = anyhow::anyhow!("a\nb");
        assert_eq!(
            parse_refusal(&refusal(1, &multi)),
            Some((1, "a b".to_string()))
        );
        for other in ["running\n", "exited 3\n", "", "refused\n", "refused x y\n"] {
            assert_eq!(parse_refusal(other), None, "{other:?}");
        }
    }
}
