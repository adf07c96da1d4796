//! Shared harness of the integration tests: one private registry
//! (`APPSHOT_RUN_DIR`) per test, detached instances that are always stopped
//! again, supervised clients, and bounded polling instead of sleeps.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tempfile::TempDir;

pub mod pagewriter;

/// How long an application may take to start serving or to die.
pub const READY: Duration = Duration::from_secs(10);
/// Upper bound for any single appshot or client invocation, so a hang fails
/// the test instead of stalling the suite.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Outside CI a machine that cannot run a test (not root, program missing)
/// skips it; in CI that same gap means the CI image is broken, so it fails.
fn skip(test: &str, reason: &str) {
    if in_ci() {
        panic!("{test}: {reason} (CI=true: a missing capability is a failure)");
    }
    uncaptured(&format!("SKIP {test}: {reason}"));
}

/// libtest swallows `eprintln!` of passing tests; a skip, a stale binary or
/// a measurement must be visible in a plain `cargo test` run.
pub fn uncaptured(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// `program` as an absolute path: searched in PATH and the sbin
/// directories, which a non-login root shell may lack but nginx lives in.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(program))
        .find(|p| is_executable(p));
    found
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

fn appshot_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("APPSHOT_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            is_executable(&bin),
            "APPSHOT_BIN={} is not an executable file",
            bin.display()
        );
        return bin;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join("appshot");
    assert!(
        is_executable(&bin),
        "appshot binary not found at {}: run `cargo build -p appshot` first \
         (scripts/test.sh does) or point APPSHOT_BIN at it",
        bin.display()
    );
    static STALE_CHECK: std::sync::Once = std::sync::Once::new();
    STALE_CHECK.call_once(|| warn_if_stale(&bin));
    bin
}

/// `cargo test -p appshot-tests` does not rebuild the binary, so tests could
/// silently exercise old code after a runtime change.
fn warn_if_stale(bin: &Path) {
    let Ok(built) = fs::metadata(bin).and_then(|m| m.modified()) else {
        return;
    };
    let root = workspace_root();
    let newest = ["runtime", "vpm", "sys", "configurator", "snapshot"]
        .iter()
        .filter_map(|c| newest_mtime(&root.join(c).join("src")))
        .max();
    if newest.is_some_and(|n| n > built) {
        uncaptured(&format!(
            "WARNING: {} is older than the runtime sources; run `cargo build -p appshot`",
            bin.display()
        ));
    }
}

fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            if path.is_dir() {
                newest_mtime(&path)
            } else {
                e.metadata().and_then(|m| m.modified()).ok()
            }
        })
        .max()
}

/// Result of a finished command.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Runs `cmd` to completion, killing it after `timeout`. Output is drained
/// on threads so a chatty child cannot block on a full pipe.
pub fn run(cmd: &mut Command, timeout: Duration) -> Ran {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {timeout:?}: killed");
        }
        std::thread::sleep(POLL);
    };
    Ran {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Makes a FIFO at `path`. Nothing ever writes to it: a command that opens
/// it for reading and waits hangs.
pub fn mkfifo(path: &Path) {
    let ran = run(Command::new("mkfifo").arg(path), COMMAND_TIMEOUT);
    assert!(ran.success(), "mkfifo {}: {ran}", path.display());
}

/// Runs `cmd`, which names the FIFO `fifo` as an image or config, and asserts
/// it is refused within a second (not left hanging) with a message that
/// names the path and says FIFO.
pub fn refused_as_fifo(cmd: &mut Command, fifo: &Path) {
    let ran = run(cmd, Duration::from_secs(1));
    assert!(!ran.success(), "a FIFO must be refused: {ran}");
    let path = fifo.to_str().expect("a UTF-8 path");
    assert!(
        ran.stderr.contains(path) && ran.stderr.contains("FIFO"),
        "the message must name {path} and say FIFO: {ran}"
    );
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The whole answer a program serving one reply per connection gives on
/// loopback port `real` (retried for 30 s while it does not answer yet),
/// trailing whitespace trimmed; `what` names the program in the failure.
pub fn answer_of(real: u16, what: &str) -> String {
    let mut answer = String::new();
    let asked = poll(Duration::from_secs(30), || {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", real)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        answer.clear();
        s.read_to_string(&mut answer).is_ok() && !answer.is_empty()
    });
    assert!(asked, "{what} on port {real} does not answer");
    answer.trim_end().to_string()
}

/// Whether `pid` is a running process (zombies count as dead: they hold no
/// sockets and run no code).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command, which may contain spaces.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The application's PID of a `ps --json` row.
pub fn pid_of(row: &Value) -> u32 {
    row["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("ps row without pid: {row}")) as u32
}

pub fn cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A process identified by PID and start time, so a PID the kernel reused
/// for something else is never mistaken for it (and never killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: u64,
}

impl Proc {
    fn of(pid: u32) -> Option<Proc> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 22 (starttime); fields after the command start at 3.
        let start = stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()?;
        Some(Proc { pid, start })
    }

    fn ppid(&self) -> Option<u32> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).ok()?;
        stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
    }

    fn running(&self) -> bool {
        alive(self.pid) && Proc::of(self.pid) == Some(*self)
    }

    fn kill(&self) {
        if self.running() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether IPv6 loopback works here; containers often run without it.
/// Without it the IPv6 half of a test is skipped (a failure in CI).
pub fn ipv6_or_skip(test: &str) -> bool {
    if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok() {
        return true;
    }
    skip(test, "no IPv6 loopback: IPv6 checks skipped");
    false
}

/// A port in `range` that nothing on the host listens on, IPv4 or IPv6.
/// Only a snapshot: the caller must choose ranges no other test uses.
pub fn free_port(range: std::ops::RangeInclusive<u16>) -> u16 {
    range
        .clone()
        .find(|&p| {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, p)).is_ok()
                && TcpListener::bind((Ipv6Addr::UNSPECIFIED, p)).is_ok()
        })
        .unwrap_or_else(|| panic!("no free port in {range:?}"))
}

/// Path of a helper script in `tests/py/`.
/// `appshot run` flags that multiplex one free virtual port from `virt`
/// with a single free real port from `spare` to hand out, so the second
/// instance of another AID takes it and a third finds none.
pub fn one_spare_port(
    virt: std::ops::RangeInclusive<u16>,
    spare: std::ops::RangeInclusive<u16>,
    allocation_timeout_ms: u32,
) -> (String, u16, Vec<String>) {
    let virt = free_port(virt).to_string();
    let spare = free_port(spare);
    let flags = vec![
        "--port".to_string(),
        virt.clone(),
        "--port-range".to_string(),
        format!("{spare}-{spare}"),
        "--allocation-timeout-ms".to_string(),
        allocation_timeout_ms.to_string(),
    ];
    (virt, spare, flags)
}

/// The lines of `py/udpclient.py` without the datagram counts
/// `py/udpecho.py` puts in its answers (`b#3:ping` reads `b:ping`).
pub fn udp_answers(out: &str) -> Vec<String> {
    out.lines()
        .map(|l| match (l.find('#'), l.find(':')) {
            (Some(hash), Some(colon)) if hash < colon => format!("{}{}", &l[..hash], &l[colon..]),
            _ => l.to_string(),
        })
        .collect()
}

pub fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("py")
        .join(name);
    assert!(path.is_file(), "missing helper script {}", path.display());
    path.to_string_lossy().into_owned()
}

/// Live processes (of our PID namespace) whose command line contains
/// `needle`: with a needle unique to a test, every process an instance of
/// it runs, its namespace init included.
pub fn pids_with_arg(needle: &str) -> BTreeSet<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|&pid| alive(pid) && cmdline(pid).contains(needle))
        .collect()
}

/// One port translation of an instance as `ps --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPair {
    pub address: String,
    pub virtual_port: u16,
    pub real: u16,
}

pub fn port_pairs(row: &Value) -> Vec<PortPair> {
    row["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("ps row without ports: {row}"))
        .iter()
        .map(|p| PortPair {
            address: p["address"].as_str().expect("address").to_string(),
            virtual_port: p["virtual_port"].as_u64().expect("virtual_port") as u16,
            real: p["real_port"].as_u64().expect("real_port") as u16,
        })
        .collect()
}

/// A private appshot registry plus the instances a test started in it.
pub struct Harness {
    test: String,
    bin: PathBuf,
    run_dir: TempDir,
    work: TempDir,
    started: Vec<String>,
    /// Namespace init and supervisor of every instance started, killed on
    /// drop if still there: a broken runtime must not leak processes that
    /// `appshot stop` and `ps` no longer know about.
    processes: Vec<Proc>,
}

impl Harness {
    /// `None` (after printing SKIP) when the test cannot run here; see
    /// [`skip`] for CI.
    pub fn new(test: &str, programs: &[&str]) -> Option<Harness> {
        if !nix::unistd::geteuid().is_root() {
            skip(
                test,
                "needs root (PID namespaces and seccomp user notification)",
            );
            return None;
        }
        if let Some(missing) = programs.iter().find(|p| which(p).is_none()) {
            skip(test, &format!("`{missing}` is not installed"));
            return None;
        }
        Some(Self::unprivileged(test))
    }

    /// For tests that never start an instance (config validation).
    pub fn unprivileged(test: &str) -> Harness {
        Harness {
            test: test.to_string(),
            bin: appshot_bin(),
            run_dir: tempfile::Builder::new()
                .prefix("appshot-run-")
                .tempdir()
                .expect("creating the run dir"),
            work: tempfile::Builder::new()
                .prefix("appshot-work-")
                .tempdir()
                .expect("creating the work dir"),
            started: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// An `appshot` command bound to this test's registry.
    pub fn appshot(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("APPSHOT_RUN_DIR", self.run_dir.path())
            // Assertions read the supervisor's default (info) log output.
            .env_remove("RUST_LOG")
            // Python block-buffers a redirected stdout; polled logs need it now.
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(self.work.path());
        cmd
    }

    /// This test's run directory (registry, instances, logs).
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// A fresh directory private to this test (cwd of an instance, configs).
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).expect("creating a work dir");
        dir
    }

    /// `appshot run --aid AID --name NAME -d FLAGS -- COMMAND` in `cwd`.
    pub fn start(&mut self, name: &str, aid: &str, cwd: &Path, flags: &[&str], command: &[&str]) {
        let ran = self.try_start(name, aid, cwd, flags, command);
        self.assert_started(name, &ran);
    }

    /// Like [`Harness::start`], for starts that may fail; whatever did start
    /// is still cleaned up on drop.
    pub fn try_start(
        &mut self,
        name: &str,
        aid: &str,
        cwd: &Path,
        flags: &[&str],
        command: &[&str],
    ) -> Ran {
        let mut cmd = self.appshot();
        cmd.args(["run", "--aid", aid, "--name", name, "--detach"])
            .args(flags)
            .arg("--")
            .args(command)
            .current_dir(cwd);
        self.launch(name, cmd)
    }

    /// `appshot run --config CONFIG -d`; the config names the instance.
    pub fn start_config(&mut self, name: &str, config: &Path) {
        let mut cmd = self.appshot();
        cmd.args(["run", "--detach", "--config"]).arg(config);
        let ran = self.launch(name, cmd);
        self.assert_started(name, &ran);
    }

    fn launch(&mut self, name: &str, mut cmd: Command) -> Ran {
        self.started.push(name.to_string());
        let ran = run(&mut cmd, COMMAND_TIMEOUT);
        if let Some(row) = self.instance(name) {
            self.record_processes(&row);
        }
        ran
    }

    fn assert_started(&self, name: &str, ran: &Ran) {
        assert!(
            ran.success(),
            "{}: starting {name} failed: {ran}",
            self.test
        );
        assert_eq!(
            ran.stdout.trim(),
            name,
            "{}: run --detach output",
            self.test
        );
    }

    /// Compiles `tests/programs/SOURCE` (C, with pthreads) with gcc into
    /// this test's work dir; returns the executable's path.
    pub fn compile(&self, source: &str, output: &str) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("programs")
            .join(source);
        assert!(src.is_file(), "missing test program {}", src.display());
        let out = self.dir("bin").join(output);
        let ran = run(
            Command::new("gcc")
                .args(["-O2", "-pthread", "-o"])
                .arg(&out)
                .arg(&src),
            COMMAND_TIMEOUT,
        );
        assert!(ran.success(), "{}: gcc {}: {ran}", self.test, src.display());
        out
    }

    /// `appshot snapshot NAME -o IMAGE FLAGS`.
    pub fn snapshot(&self, name: &str, image: &Path, flags: &[&str]) -> Ran {
        let mut cmd = self.appshot();
        cmd.args(["snapshot", name, "-o"]).arg(image).args(flags);
        run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// `appshot restore IMAGE --detach FLAGS`, expected to bring back an
    /// instance called `name` (the image's name, or `--name` in FLAGS);
    /// like [`Harness::try_start`], whatever started is cleaned up on drop.
    pub fn try_restore(&mut self, name: &str, image: &Path, flags: &[&str]) -> Ran {
        let mut cmd = self.appshot();
        cmd.arg("restore").arg(image).arg("--detach").args(flags);
        self.launch(name, cmd)
    }

    /// [`Harness::try_restore`], asserting the instance `name` runs.
    pub fn restore(&mut self, name: &str, image: &Path, flags: &[&str]) {
        let ran = self.try_restore(name, image, flags);
        self.assert_started(name, &ran);
    }

    /// `appshot clone TEMPLATE --detach FLAGS`, expected to start the
    /// instances `names` (all of them, or none when it is refused); like
    /// [`Harness::try_start`], whatever did start is cleaned up on drop.
    pub fn try_clone(&mut self, names: &[String], template: &Path, flags: &[&str]) -> Ran {
        self.started.extend(names.iter().cloned());
        let mut cmd = self.appshot();
        cmd.arg("clone").arg(template).arg("--detach").args(flags);
        let ran = run(&mut cmd, COMMAND_TIMEOUT);
        for row in self.ps() {
            if names.iter().any(|n| row["name"] == n.as_str()) {
                self.record_processes(&row);
            }
        }
        ran
    }

    /// [`Harness::try_clone`], asserting it succeeds and prints `names`,
    /// one a line, in order.
    pub fn clone_template(&mut self, names: &[String], template: &Path, flags: &[&str]) {
        let ran = self.try_clone(names, template, flags);
        assert!(
            ran.success(),
            "{}: appshot clone {} {flags:?} failed: {ran}",
            self.test,
            template.display()
        );
        let printed: Vec<&str> = ran.stdout.lines().map(str::trim).collect();
        assert_eq!(
            printed, names,
            "{}: clone --detach output: {ran}",
            self.test
        );
    }

    /// Namespace init and supervisor of a `ps --json` row, so that drop
    /// kills them even if the runtime lost track of them.
    fn record_processes(&mut self, row: &Value) {
        let pid = |key: &str| row[key].as_u64().and_then(|p| Proc::of(p as u32));
        let init = pid("pid").and_then(|app| app.ppid()).and_then(Proc::of);
        self.processes
            .extend([init, pid("supervisor_pid")].into_iter().flatten());
    }

    /// `appshot inspect IMAGE --json`.
    pub fn inspect(&self, image: &Path) -> Value {
        let mut cmd = self.appshot();
        cmd.arg("inspect").arg(image).arg("--json");
        let ran = run(&mut cmd, COMMAND_TIMEOUT);
        assert!(
            ran.success(),
            "{}: appshot inspect {}: {ran}",
            self.test,
            image.display()
        );
        serde_json::from_str(&ran.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: appshot inspect --json: not JSON ({e}): {ran}",
                self.test
            )
        })
    }

    /// The rows of `ports --json` owned by instance `name`.
    pub fn translations(&self, name: &str) -> Vec<Value> {
        self.ports()
            .into_iter()
            .filter(|r| r["instance"] == name)
            .collect()
    }

    /// Runs `command` in the foreground under `aid`, like a client would.
    pub fn client(&self, aid: &str, command: &[&str]) -> Ran {
        let mut cmd = self.appshot();
        cmd.args(["run", "--aid", aid, "--"]).args(command);
        run(&mut cmd, COMMAND_TIMEOUT)
    }

    /// `curl` under `aid`; exit code 7 is curl's "connection refused".
    pub fn curl(&self, aid: &str, url: &str) -> Ran {
        self.client(aid, &["curl", "-sS", "--max-time", "10", url])
    }

    /// The names of this run directory's templates that hold a process.
    pub fn templates(&self) -> Vec<String> {
        let dir = self.run_dir().join("templates");
        let mut names: Vec<String> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("holder").exists())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        names.sort();
        names
    }

    /// The PID of template `name`'s holder, as its state file records it.
    pub fn holder_pid(&self, name: &str) -> u32 {
        let path = self.run_dir().join("templates").join(name).join("holder");
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{} without pid=:\n{text}", path.display()))
    }

    pub fn ps(&self) -> Vec<Value> {
        self.json(&["ps", "--json"])
    }

    pub fn ports(&self) -> Vec<Value> {
        self.json(&["ports", "--json"])
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let ran = run(self.appshot().args(args), COMMAND_TIMEOUT);
        assert!(ran.success(), "{}: appshot {args:?}: {ran}", self.test);
        match serde_json::from_str(&ran.stdout) {
            Ok(Value::Array(rows)) => rows,
            other => panic!(
                "{}: appshot {args:?}: not a JSON array: {other:?}",
                self.test
            ),
        }
    }

    /// The `ps --json` row of `name`, if it is listed.
    pub fn instance(&self, name: &str) -> Option<Value> {
        self.ps().into_iter().find(|r| r["name"] == name)
    }

    /// The control socket of instance `name`.
    pub fn control_socket(&self, name: &str) -> PathBuf {
        self.run_dir
            .path()
            .join("instances")
            .join(name)
            .join("control.sock")
    }

    /// The directory of a detached instance's logs.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.run_dir.path().join("logs").join(name)
    }

    /// Everything the instance's supervisor and application wrote so far.
    pub fn log(&self, name: &str) -> String {
        logs_in(&self.log_path(name))
    }

    /// Waits until the log of `name` contains `needle`; returns the log.
    pub fn wait_log(&self, name: &str, needle: &str) -> String {
        let mut log = String::new();
        let found = poll(READY, || {
            log = self.log(name);
            log.contains(needle)
        });
        assert!(
            found,
            "{}: log of {name} lacks {needle:?} after {READY:?}:\n{log}",
            self.test
        );
        log
    }

    /// `appshot stop`, asserting it succeeds and the instance is gone.
    pub fn stop(&mut self, name: &str) {
        let ran = run(
            self.appshot().args(["stop", "-t", "5", name]),
            COMMAND_TIMEOUT,
        );
        assert!(ran.success(), "{}: appshot stop {name}: {ran}", self.test);
        self.started.retain(|n| n != name);
        assert!(
            self.instance(name).is_none(),
            "{}: {name} still listed after stop",
            self.test
        );
    }

    fn dump_logs(&self) {
        let Ok(entries) = fs::read_dir(self.run_dir.path().join("logs")) else {
            return;
        };
        for e in entries.flatten() {
            eprintln!(
                "--- {}: {} ---\n{}",
                self.test,
                e.path().display(),
                logs_in(&e.path()).trim_end()
            );
        }
    }
}

/// A log directory's supervisor log, then the application's output (the
/// rotated part first) as `appshot logs` prints it, without the times.
pub fn logs_in(dir: &Path) -> String {
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    let mut out = read("supervisor.log");
    for f in ["app.log.1", "app.log"] {
        for line in read(f).lines() {
            out.push_str(line.split_once(' ').map_or(line, |(_, text)| text));
            out.push('\n');
        }
    }
    out
}

impl Drop for Harness {
    /// Nothing may outlive its test: stop what we started, then SIGKILL
    /// whatever survived, found both through `ps` and through the processes
    /// recorded at start, in case the runtime lost track of them. Killing a
    /// namespace init takes every process of its instance along. Never
    /// panics: this also runs while a failed test unwinds.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for name in std::mem::take(&mut self.started).iter().rev() {
            let mut cmd = self.appshot();
            cmd.args(["stop", "-t", "2", name])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // Fails harmlessly for instances that already ended.
            let _ = cmd.status();
        }
        // Template holders outlive their clones by design; each test's
        // go with it.
        let templates = self.templates();
        if !templates.is_empty() {
            let mut cmd = self.appshot();
            cmd.args(["template", "rm"])
                .args(&templates)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let _ = cmd.status();
        }
        let mut cmd = self.appshot();
        cmd.args(["ps", "--json"]).stdin(Stdio::null());
        let listed: Vec<Value> = cmd
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default();
        let mut survivors = self.processes.clone();
        survivors.extend(
            listed
                .iter()
                .filter_map(|row| row["supervisor_pid"].as_u64())
                .filter_map(|pid| Proc::of(pid as u32)),
        );
        survivors.retain(Proc::running);
        for p in &survivors {
            eprintln!(
                "{}: {} ({}) outlived appshot stop: SIGKILL",
                self.test,
                p.pid,
                cmdline(p.pid).trim_end()
            );
            p.kill();
        }
        poll(READY, || !survivors.iter().any(Proc::running));
    }
}

/// What a refused `appshot restore` or `appshot clone` (`refused`, for the
/// messages) must leave: none of `names` listed or owning a translation, and
/// no process beyond `processes` with `marker` (a path unique to the test) on
/// its command line. A refusal can come after processes were started, so
/// this also checks that they were taken down again.
pub fn assert_left_nothing<N: AsRef<str> + fmt::Debug>(
    h: &Harness,
    refused: &str,
    names: &[N],
    marker: &str,
    processes: &BTreeSet<u32>,
) {
    let ps = h.ps();
    for name in names.iter().map(AsRef::as_ref) {
        assert!(
            !ps.iter().any(|r| r["name"] == name),
            "refused {refused} left instance {name} listed: {ps:#?}"
        );
        assert_eq!(
            h.translations(name),
            Vec::<Value>::new(),
            "refused {refused} left translations of {name} in the registry"
        );
    }
    let extra: Vec<String> = pids_with_arg(marker)
        .difference(processes)
        .map(|p| format!("{p} ({})", cmdline(*p).trim_end()))
        .collect();
    assert!(
        extra.is_empty(),
        "refused {refused} as {names:?} left processes behind: {extra:?}"
    );
}

/// Starts an unmodified `redis-server` on port 6379 as `name` under `aid`,
/// persisting nothing (no RDB, no AOF), with `extra` flags; waits until it
/// accepts connections.
pub fn start_redis(h: &mut Harness, name: &str, aid: &str, extra: &[&str]) {
    let dir = h.dir(name);
    let mut command = vec![
        "redis-server",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    command.extend_from_slice(extra);
    h.start(name, aid, &dir, &[], &command);
    h.wait_log(name, "Ready to accept connections");
}

/// `tests/programs/forkshare.c` (a parent and its child sharing a pipe and
/// memory) started as instance `name` of `aid` in the test directory
/// `name`, once its child has reported `reports` times; its directory and
/// the log the child reports to.
pub fn start_forkshare(h: &mut Harness, name: &str, aid: &str, reports: u64) -> (PathBuf, PathBuf) {
    let bin = h.compile("forkshare.c", "forkshare");
    let dir = h.dir(name);
    let log = dir.join("log");
    h.start(
        name,
        aid,
        &dir,
        &[],
        &[bin.to_str().unwrap(), log.to_str().unwrap()],
    );
    assert!(
        poll(READY, || forkshare_count(&log) >= reports),
        "the child reports nothing: {:?}",
        fs::read_to_string(&log)
    );
    (dir, log)
}

/// The last count the child of `tests/programs/forkshare.c` logged to
/// `log` ("ok N"), 0 before any.
pub fn forkshare_count(log: &Path) -> u64 {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("ok "))
        .find_map(|n| n.parse().ok())
        .unwrap_or(0)
}

/// `redis-cli -p 6379 ARGS` under `aid`; its trimmed answer. redis-cli
/// exits 0 on connection errors too, printing them as text, so this also
/// makes sure a refused connection does not pass for an answer.
pub fn redis_cli(h: &Harness, aid: &str, args: &[&str]) -> String {
    let mut command = vec!["redis-cli", "-p", "6379"];
    command.extend_from_slice(args);
    let ran = h.client(aid, &command);
    assert!(ran.success(), "redis-cli {args:?} under {aid}: {ran}");
    assert!(
        !ran.stdout.contains("Could not connect") && !ran.stderr.contains("Could not connect"),
        "redis-cli {args:?} under {aid}: {ran}"
    );
    ran.stdout.trim().to_string()
}

/// The value of `key` in the `key:value` lines of a redis `INFO` answer.
pub fn info_field(info: &str, key: &str) -> String {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("INFO without {key}:\n{info}"))
        .to_string()
}

/// statekeeper compiled, and a copy of it to run from, so that a test can
/// change or take away the executable of an instance: (compiled, copy).
pub fn keeper_copy(h: &Harness) -> (PathBuf, PathBuf) {
    let compiled = h.compile("statekeeper.c", "statekeeper");
    let copy = h.dir("copy").join("statekeeper-copy");
    fs::copy(&compiled, &copy)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", compiled.display(), copy.display()));
    (compiled, copy)
}

/// Starts statekeeper (`tests/programs/statekeeper.c`, compiled to `bin`)
/// as `name` under `aid` on port 9000; returns its data file's path, unique
/// to the test, which every process of the instance (and of its clones and
/// restored copies) has on its command line.
pub fn start_keeper(h: &mut Harness, name: &str, aid: &str, bin: &Path) -> String {
    let dir = h.dir(name);
    let data = dir.join(format!("{name}.data"));
    let data = data.to_str().expect("utf-8 path").to_string();
    let bin = bin.to_str().expect("utf-8 path");
    h.start(name, aid, &dir, &[], &[bin, "9000", &data]);
    h.wait_log(name, "statekeeper listening on port 9000");
    data
}

/// One connection to statekeeper on 127.0.0.1:9000: sends argv[1] (possibly
/// nothing), half-closes so statekeeper answers at once, prints the answer.
const KEEPER_QUERY: &str = "import socket, sys\n\
s = socket.create_connection(('127.0.0.1', 9000), timeout=10)\n\
s.sendall(sys.argv[1].encode())\n\
s.shutdown(socket.SHUT_WR)\n\
print(s.makefile().read(), end='')\n";

/// One statekeeper connection under `aid`, sending `send` ("" or "pipe\n"),
/// whether or not it succeeds.
pub fn query_keeper(h: &Harness, aid: &str, send: &str) -> Ran {
    h.client(aid, &["python3", "-c", KEEPER_QUERY, send])
}

/// [`query_keeper`], asserted to succeed; the answer without its newline.
pub fn ask_keeper(h: &Harness, aid: &str, send: &str) -> String {
    let ran = query_keeper(h, aid, send);
    assert!(
        ran.success(),
        "statekeeper query {send:?} under AID {aid}: {ran}"
    );
    ran.stdout.trim_end().to_string()
}

/// What statekeeper answers: `secret=HEX counters=A,B,C offset=N next=XY pid=P`.
#[derive(Debug, Clone)]
pub struct Keeper {
    pub line: String,
    /// Random bytes on the heap: the same only in the same process, or a
    /// snapshot, restore or clone of it.
    pub secret: String,
    pub counters: [u64; 3],
    pub offset: u64,
    pub next: String,
    pub pid: u32,
}

/// Parses a statekeeper answer; every field must be there.
fn parse_keeper(line: &str) -> Keeper {
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("statekeeper answer without {key}: {line:?}"))
            .to_string()
    };
    let counters: Vec<u64> = field("counters")
        .split(',')
        .map(|c| c.parse().unwrap_or_else(|_| panic!("counters in {line:?}")))
        .collect();
    Keeper {
        line: line.to_string(),
        secret: field("secret"),
        counters: counters
            .try_into()
            .unwrap_or_else(|_| panic!("three counters in {line:?}")),
        offset: field("offset").parse().expect("offset"),
        next: field("next"),
        pid: field("pid").parse().expect("pid"),
    }
}

/// statekeeper's state under `aid`, from one connection.
pub fn keeper(h: &Harness, aid: &str) -> Keeper {
    parse_keeper(&ask_keeper(h, aid, ""))
}

/// A field of `/proc/PID/status` (`SigCgt`, `SigIgn`, `SigBlk` …).
pub fn status_field(pid: u32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{status}"))
        .trim()
        .to_string()
}

/// A process's signal actions and resource limits, as /proc shows them.
pub struct SignalState {
    pub caught: String,
    pub ignored: String,
    pub limits: String,
}

impl SignalState {
    pub fn of(pid: u32) -> SignalState {
        SignalState {
            caught: status_field(pid, "SigCgt"),
            ignored: status_field(pid, "SigIgn"),
            limits: fs::read_to_string(format!("/proc/{pid}/limits")).unwrap(),
        }
    }

    /// Asserts that process `pid` of instance `name` (a `sigkeeper`) has
    /// these actions and limits, and that its own SIGUSR1 handler runs.
    pub fn assert_kept(&self, h: &Harness, name: &str, pid: u32) {
        let now = SignalState::of(pid);
        assert_eq!(now.caught, self.caught, "{name}: handlers");
        assert_eq!(now.ignored, self.ignored, "{name}: ignored signals");
        assert_eq!(now.limits, self.limits, "{name}: limits");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .unwrap();
        h.wait_log(name, "usr1 1");
    }
}
