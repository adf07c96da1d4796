//! The appshot CLI as the bench drives it: a private run directory,
//! detached instances stopped by their guard, and foreground clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Deserialize;

use crate::net;
use crate::procs;

/// How long `appshot run -d` and a server's first listen may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// `appshot stop --time`: the grace before SIGKILL.
const STOP_GRACE_SECS: u64 = 2;

pub struct Appshot {
    binary: PathBuf,
    /// Our own APPSHOT_RUN_DIR: the registry and instances of this bench
    /// only, never those of other appshot users on the machine.
    run_dir: PathBuf,
    names: AtomicUsize,
}

#[derive(Deserialize)]
struct PsRow {
    name: String,
    supervisor_pid: u32,
}

#[derive(Deserialize)]
struct PortRow {
    virtual_port: u16,
    real_port: u16,
    owner: String,
}

impl Appshot {
    pub fn new(binary: &Path, run_dir: &Path) -> anyhow::Result<Appshot> {
        let binary = binary
            .canonicalize()
            .with_context(|| format!("appshot binary {}", binary.display()))?;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        Ok(Appshot {
            binary,
            run_dir: run_dir.to_path_buf(),
            names: AtomicUsize::new(0),
        })
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("APPSHOT_RUN_DIR", &self.run_dir);
        cmd
    }

    /// A unique instance name: `PREFIX-N`.
    fn name(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.names.fetch_add(1, Ordering::Relaxed))
    }

    /// `appshot run --aid AID -- ARGV` in the foreground, ready for
    /// `procs::run`: the application's output is the command's.
    pub fn foreground(&self, aid: &str, argv: &[String]) -> Command {
        let mut cmd = self.command();
        cmd.args([
            "run",
            "--aid",
            aid,
            "--name",
            &self.name(&format!("{aid}-client")),
        ])
        .arg("--")
        .args(argv);
        cmd
    }

    /// `appshot run --aid AID -d -- ARGV`, then waits until the instance
    /// listens on `virtual_port` (a server binds after it starts). The
    /// instance is stopped when the guard is dropped.
    pub fn server(
        &self,
        aid: &str,
        virtual_port: u16,
        argv: &[String],
    ) -> anyhow::Result<Instance<'_>> {
        let name = self.name(&format!("{aid}-server"));
        let what = format!("appshot instance {name} (AID {aid}: {})", argv.join(" "));
        let mut cmd = self.command();
        cmd.args(["run", "--aid", aid, "--name", &name, "-d", "--"])
            .args(argv);
        procs::run(
            &mut cmd,
            &format!("`appshot run -d` of {what}"),
            START_TIMEOUT,
        )?;
        let supervisor_pid = self
            .ps()?
            .into_iter()
            .find(|r| r.name == name)
            .map(|r| r.supervisor_pid);
        let instance = Instance {
            appshot: self,
            name,
            what,
            supervisor_pid,
        };
        let real = instance.wait_translation(virtual_port)?;
        net::wait_listening(real, START_TIMEOUT, || instance.check_running()).with_context(
            || {
                format!(
                    "{}: real port {real} of virtual port {virtual_port}",
                    instance.what
                )
            },
        )?;
        Ok(instance)
    }

    /// The subcommands `appshot help` lists.
    pub fn commands(&self) -> anyhow::Result<Vec<String>> {
        let help = procs::run(
            self.command().arg("help"),
            "appshot help",
            Duration::from_secs(30),
        )?;
        Ok(subcommands(&help))
    }

    /// Not interruptible: guards use it to clean up after an interrupt.
    fn ps(&self) -> anyhow::Result<Vec<PsRow>> {
        let out = procs::run_cleanup(
            self.command().args(["ps", "--json"]),
            "appshot ps --json",
            Duration::from_secs(30),
        )?;
        serde_json::from_str(&out).context("parsing `appshot ps --json`")
    }

    fn ports(&self) -> anyhow::Result<Vec<PortRow>> {
        let out = procs::run(
            self.command().args(["ports", "--json"]),
            "appshot ports --json",
            Duration::from_secs(30),
        )?;
        serde_json::from_str(&out).context("parsing `appshot ports --json`")
    }

    fn is_running(&self, name: &str) -> anyhow::Result<bool> {
        Ok(self.ps()?.iter().any(|r| r.name == name))
    }

    fn stop(&self, name: &str) -> anyhow::Result<()> {
        procs::run_cleanup(
            self.command()
                .args(["stop", "--time", &STOP_GRACE_SECS.to_string(), name]),
            &format!("appshot stop {name}"),
            Duration::from_secs(STOP_GRACE_SECS + 30),
        )
        .map(drop)
    }

    /// Stops every instance still registered: the last line of defence for
    /// whatever a guard could not stop.
    fn stop_all(&self) {
        let Ok(rows) = self.ps() else { return };
        for r in rows {
            eprintln!("appshot-bench: instance {} still runs: stopping it", r.name);
            if let Err(e) = self.stop(&r.name) {
                eprintln!("appshot-bench: {e:#}");
                kill_supervisor(r.supervisor_pid);
            }
        }
    }
}

impl Drop for Appshot {
    /// Runs after every `Instance` guard (they borrow this), on success,
    /// error and interrupt alike.
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The names of clap's "Commands:" section.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// SIGKILL of the supervisor ends the instance too: its namespace init dies
/// with it (parent-death signal), and every process of the namespace with
/// the init.
fn kill_supervisor(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// A detached instance; dropping it stops it.
pub struct Instance<'a> {
    appshot: &'a Appshot,
    name: String,
    what: String,
    supervisor_pid: Option<u32>,
}

impl Instance<'_> {
    pub fn check_running(&self) -> anyhow::Result<()> {
        if self.appshot.is_running(&self.name)? {
            return Ok(());
        }
        let log = self
            .appshot
            .run_dir
            .join("logs")
            .join(format!("{}.log", self.name));
        Err(anyhow!(
            "{} has exited{}",
            self.what,
            procs::tail(
                &log.display().to_string(),
                &std::fs::read_to_string(&log).unwrap_or_default()
            )
        ))
    }

    /// Waits for an instance meant to end on its own (a one-off server).
    pub fn wait_exit(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.appshot.is_running(&self.name)? {
            procs::check_interrupted()?;
            if std::time::Instant::now() > deadline {
                return Err(anyhow!(
                    "{} still running {}s after its client finished",
                    self.what,
                    timeout.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The real port this instance's socket on `virtual_port` is bound to,
    /// once its bind has gone through the multiplexer.
    fn wait_translation(&self, virtual_port: u16) -> anyhow::Result<u16> {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let found = self
                .appshot
                .ports()?
                .into_iter()
                .find(|t| t.owner == self.name && t.virtual_port == virtual_port);
            if let Some(t) = found {
                return Ok(t.real_port);
            }
            self.check_running()?;
            procs::check_interrupted()?;
            if std::time::Instant::now() > deadline {
                return Err(anyhow!(
                    "{}: no translation for virtual port {virtual_port} after {}s",
                    self.what,
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Instance<'_> {
    fn drop(&mut self) {
        // Gone already (a one-off server): nothing to stop. When `ps` fails
        // the stop is tried anyway.
        if let Ok(false) = self.appshot.is_running(&self.name) {
            return;
        }
        if let Err(e) = self.appshot.stop(&self.name) {
            eprintln!("appshot-bench: {e:#}");
            if let Some(pid) = self.supervisor_pid {
                kill_supervisor(pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subcommands_come_from_the_commands_section() {
        let help = "Run things\n\nUsage: appshot [OPTIONS] <COMMAND>\n\nCommands:\n  run       Run a command\n  snapshot  Save an instance\n  help      Print this message\n\nOptions:\n  -v, --verbose  More\n";
        assert_eq!(subcommands(help), ["run", "snapshot", "help"]);
        assert!(subcommands("no commands here").is_empty());
    }
}
