//! The appshot CLI as the bench drives it: a private run directory,
//! detached instances stopped by their guard, and foreground clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::net::{self, Serves};
use crate::procs;

/// How long `appshot run -d` and a server's first listen may take.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// `appshot stop --time`: the grace before SIGKILL.
const STOP_GRACE_SECS: u64 = 2;
/// `appshot snapshot` of a GiB-sized instance on a busy machine.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How often waits on an instance ask `appshot ps` or `appshot ports`.
const POLL: Duration = Duration::from_millis(20);

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
    /// The application process, as the host sees it.
    pid: u32,
    supervisor_pid: u32,
}

#[derive(Deserialize)]
struct PortRow {
    virtual_port: u16,
    real_port: u16,
    instance: String,
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

    /// Any appshot command, bound to the bench's own run directory.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("APPSHOT_RUN_DIR", &self.run_dir);
        cmd
    }

    /// A unique instance name: `PREFIX-N`.
    pub fn name(&self, prefix: &str) -> String {
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
        self.server_of(aid, virtual_port, argv, Serves::Tcp)
    }

    /// [`Appshot::server`] for a server that serves `serves`.
    pub fn server_of(
        &self,
        aid: &str,
        virtual_port: u16,
        argv: &[String],
        serves: Serves,
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
        net::wait_serving(real, serves, START_TIMEOUT, || instance.check_running()).with_context(
            || {
                format!(
                    "{}: real port {real} of virtual port {virtual_port}",
                    instance.what
                )
            },
        )?;
        Ok(instance)
    }

    /// `appshot snapshot NAME -o IMAGE FLAGS…`; returns its output line.
    pub fn snapshot(&self, name: &str, image: &Path, flags: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command();
        cmd.args(["snapshot", name, "-o"]).arg(image).args(flags);
        procs::run(
            &mut cmd,
            &format!("appshot snapshot {name} {}", flags.join(" ")),
            SNAPSHOT_TIMEOUT,
        )
    }

    /// `appshot restore IMAGE --detach --name NAME` (the image's AID);
    /// returns the restored instance's guard and how long the command took.
    pub fn restore(&self, image: &Path, name: &str) -> anyhow::Result<(Instance<'_>, Duration)> {
        self.restore_with(image, name, &[])
    }

    /// [`Appshot::restore`] with more flags (`--lazy`).
    pub fn restore_with(
        &self,
        image: &Path,
        name: &str,
        flags: &[&str],
    ) -> anyhow::Result<(Instance<'_>, Duration)> {
        let mut cmd = self.command();
        cmd.arg("restore")
            .arg(image)
            .args(["--detach", "--name", name])
            .args(flags);
        let what = format!(
            "appshot restore {} --name {name} {}",
            image.display(),
            flags.join(" ")
        );
        let started = Instant::now();
        procs::run(&mut cmd, &format!("`{what}`"), START_TIMEOUT)?;
        let took = started.elapsed();
        Ok((self.adopt(name, what), took))
    }

    /// `appshot clone TEMPLATE --aid AID --count COUNT --detach`; returns a
    /// guard for each clone it printed and how long the command took.
    pub fn clone_template(
        &self,
        template: &Path,
        aid: &str,
        count: u32,
    ) -> anyhow::Result<(Vec<Instance<'_>>, Duration)> {
        self.clone_template_with(template, aid, count, &[])
    }

    /// [`Appshot::clone_template`] with more flags (`--pool 0`).
    pub fn clone_template_with(
        &self,
        template: &Path,
        aid: &str,
        count: u32,
        flags: &[&str],
    ) -> anyhow::Result<(Vec<Instance<'_>>, Duration)> {
        let mut cmd = self.command();
        cmd.arg("clone").arg(template).args([
            "--aid",
            aid,
            "--count",
            &count.to_string(),
            "--detach",
        ]);
        cmd.args(flags);
        let what = format!("appshot clone {} --aid {aid}", template.display());
        let started = Instant::now();
        let out = procs::run(&mut cmd, &format!("`{what}`"), START_TIMEOUT)?;
        let took = started.elapsed();
        let clones: Vec<Instance<'_>> = out
            .split_whitespace()
            .map(|name| self.adopt(name, format!("clone {name} ({what})")))
            .collect();
        if clones.len() != count as usize {
            return Err(anyhow!(
                "`{what} --count {count}` printed {} instance names: {out:?}",
                clones.len()
            ));
        }
        Ok((clones, took))
    }

    /// The guard of an instance started by another command.
    fn adopt(&self, name: &str, what: String) -> Instance<'_> {
        let supervisor_pid = self
            .ps()
            .ok()
            .and_then(|rows| rows.into_iter().find(|r| r.name == name))
            .map(|r| r.supervisor_pid);
        Instance {
            appshot: self,
            name: name.to_string(),
            what,
            supervisor_pid,
        }
    }

    /// Not interruptible: guards use it to clean up after an interrupt.
    fn ps(&self) -> anyhow::Result<Vec<PsRow>> {
        self.json("ps", procs::run_cleanup)
    }

    fn ports(&self) -> anyhow::Result<Vec<PortRow>> {
        self.json("ports", procs::run)
    }

    /// `appshot COMMAND --json`, run by `run` (`procs::run` or
    /// `procs::run_cleanup`), parsed.
    fn json<T: DeserializeOwned>(
        &self,
        command: &str,
        run: fn(&mut Command, &str, Duration) -> anyhow::Result<String>,
    ) -> anyhow::Result<T> {
        let what = format!("appshot {command} --json");
        let out = run(
            self.command().args([command, "--json"]),
            &what,
            Duration::from_secs(30),
        )?;
        serde_json::from_str(&out).with_context(|| format!("parsing `{what}`"))
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

    /// Ends the template holders the clones were forked from: they
    /// outlive their clones by design.
    fn remove_templates(&self) {
        let names: Vec<String> = std::fs::read_dir(self.run_dir.join("templates"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        if names.is_empty() {
            return;
        }
        let removed = procs::run(
            self.command().args(["template", "rm"]).args(&names),
            "appshot template rm",
            Duration::from_secs(30),
        );
        if let Err(e) = removed {
            eprintln!("appshot-bench: {e:#}");
        }
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
        self.remove_templates();
    }
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
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The application's PID, as the host sees it.
    pub fn app_pid(&self) -> anyhow::Result<u32> {
        self.appshot
            .ps()?
            .into_iter()
            .find(|r| r.name == self.name)
            .map(|r| r.pid)
            .ok_or_else(|| anyhow!("{} is not listed by `appshot ps`", self.what))
    }

    /// The supervisor's log: `RUN_DIR/logs/NAME/supervisor.log` (the
    /// application's output is `app.log` beside it).
    pub fn log(&self) -> anyhow::Result<String> {
        let path = self.log_path();
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn log_path(&self) -> PathBuf {
        self.appshot
            .run_dir
            .join("logs")
            .join(&self.name)
            .join("supervisor.log")
    }

    pub fn check_running(&self) -> anyhow::Result<()> {
        if self.appshot.is_running(&self.name)? {
            return Ok(());
        }
        let log = self.log_path();
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
        procs::wait_for(timeout, POLL, || {
            Ok((!self.appshot.is_running(&self.name)?).then_some(()))
        })?
        .ok_or_else(|| {
            anyhow!(
                "{} still running {}s after its client finished",
                self.what,
                timeout.as_secs()
            )
        })
    }

    /// The real port this instance's socket on `virtual_port` is bound to,
    /// once its bind has gone through the multiplexer.
    fn wait_translation(&self, virtual_port: u16) -> anyhow::Result<u16> {
        procs::wait_for(START_TIMEOUT, POLL, || {
            let found = self
                .appshot
                .ports()?
                .into_iter()
                .find(|t| t.instance == self.name && t.virtual_port == virtual_port);
            if found.is_none() {
                self.check_running()?;
            }
            Ok(found.map(|t| t.real_port))
        })?
        .ok_or_else(|| {
            anyhow!(
                "{}: no translation for virtual port {virtual_port} after {}s",
                self.what,
                START_TIMEOUT.as_secs()
            )
        })
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
