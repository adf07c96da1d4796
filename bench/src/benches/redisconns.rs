//! Snapshot and restore of redis-server holding 100 established client
//! connections, under appshot and, as the peer, the same redis run natively
//! under CRIU 4.x with `--tcp-established`.
//!
//! The clients are one Python process (`HOLDER`) holding 100 connections:
//! it sends `INCR cN` on each (every answer must be 1), prints `ready`, and
//! waits for a file; then sends `INCR cN` on each again (every answer must
//! be 2: the same connections, the same redis) and prints `ok`. Under
//! appshot the holder runs in an instance of the same AID (connecting to
//! the virtual port); for CRIU it runs natively.
//!
//! Each run:
//! 1. appshot: `appshot run --aid A -d -- redis-server …`, the holder, then
//!    `appshot snapshot NAME -o IMG` (the instance stops; its 100
//!    connections are saved in repair mode, the network lock holds them):
//!    the command's wall time. Then `appshot restore IMG --detach`, the file
//!    is created as soon as it returns: wall time from the restore's start
//!    until the holder has had its 100 answers;
//! 2. CRIU: the same with redis run natively, `criu dump --tcp-established
//!    -t PID` (redis is killed by the dump) and `criu restore
//!    --tcp-established -d`; redis is started in a session of its own
//!    (`procs::spawn_session_leader`), so no `--shell-job`; it has no Unix
//!    socket to the outside, so no `--ext-unix-sk`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use super::criu;
use super::snapshot::{millis, take_snapshot, After};
use super::{argv, Ctx, Outcome};
use crate::appshot::Appshot;
use crate::measure::{warmup_mark, Measurement, Unit};
use crate::net;
use crate::procs::{self, Lines};
use crate::table::Row;

pub const TITLE: &str = "redis with 100 connections";
const CLIENTS: usize = 100;
const TIMEOUT: Duration = Duration::from_secs(60);

/// `HOLDER HOST PORT N GO`: see the module's documentation.
const HOLDER: &str = r#"
import os, socket, sys, time
host, port, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
deadline = time.time() + 60
while True:
    try:
        conns = [socket.create_connection((host, port), timeout=60) for _ in range(n)]
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.01)
def round(want):
    for i, s in enumerate(conns):
        k = b"c%d" % i
        s.sendall(b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(k), k))
    for i, s in enumerate(conns):
        line = b""
        while not line.endswith(b"\r\n"):
            more = s.recv(64)
            if not more:
                sys.exit("connection %d: EOF" % i)
            line += more
        if line != b":%d\r\n" % want:
            sys.exit("connection %d answered %r, not %d" % (i, line, want))
round(1)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
round(2)
print("ok", flush=True)
"#;

struct Run {
    snapshot_ms: f64,
    restore_ms: f64,
    /// The restore command's own wall time (in the progress lines only).
    restore_cmd_ms: f64,
}

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let appshot = ctx.appshot;
    let peer = criu::usable();
    match &peer {
        Ok(version) => eprintln!("  {TITLE}: peer: {} (criu {version})", criu::binary()),
        Err(why) => {
            eprintln!("  {TITLE}: WARNING: no CRIU figures: {why}");
            if super::in_ci() {
                bail!("CI=true and no CRIU peer: {why}");
            }
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("redisconns.")
        .tempdir_in(ctx.work)
        .context("creating redis's directory")?;
    let holder = dir.path().join("holder.py");
    std::fs::write(&holder, HOLDER).context("writing the holder")?;
    let port = ctx.ports.take()?;
    let native_port = ctx.ports.take()?;

    let warmup = ctx.plan.warmup;
    let total = warmup + ctx.plan.snapshot_runs;
    let (mut runs, mut peers) = (Vec::new(), Vec::new());
    for round in 0..total {
        procs::check_interrupted()?;
        let failed = || format!("{TITLE}: run {} of {total} failed", round + 1);
        let a = appshot_run(appshot, dir.path(), &holder, port, round).with_context(failed)?;
        eprintln!(
            "  {TITLE}: run {}/{total}{}: appshot snapshot {:.0} ms, restore {:.0} ms to {CLIENTS} answers (command {:.0} ms)",
            round + 1,
            warmup_mark(round, warmup),
            a.snapshot_ms,
            a.restore_ms,
            a.restore_cmd_ms
        );
        runs.push(a);
        if peer.is_ok() {
            let c = criu_run(dir.path(), &holder, native_port, round)
                .with_context(failed)
                .context("criu (the peer)")?;
            eprintln!(
                "  {TITLE}: run {}/{total}{}: criu dump {:.0} ms, restore {:.0} ms to {CLIENTS} answers (command {:.0} ms)",
                round + 1,
                warmup_mark(round, warmup),
                c.snapshot_ms,
                c.restore_ms,
                c.restore_cmd_ms
            );
            peers.push(c);
        }
    }

    type Get = fn(&Run) -> f64;
    let figures: [(&str, &str, Get); 2] = [
        (
            "redis snapshot",
            "100 connected clients, then stopped: wall time of `appshot snapshot` / `criu dump --tcp-established`",
            |r| r.snapshot_ms,
        ),
        (
            "redis restore",
            "100 connected clients: wall time until all 100 answer on their connections",
            |r| r.restore_ms,
        ),
    ];
    let mut out = Outcome::default();
    for (benchmark, configuration, get) in figures {
        let m = Measurement::from_runs(
            benchmark,
            configuration,
            Unit::Millis,
            runs.iter().map(get).collect(),
            warmup,
        )?;
        match &peer {
            Ok(_) => {
                let c = Measurement::from_runs(
                    benchmark,
                    &format!("{configuration} (criu)"),
                    Unit::Millis,
                    peers.iter().map(get).collect(),
                    warmup,
                )?;
                out.rows
                    .push(Row::compared(benchmark, configuration, "criu", &c, &m));
                out.measurements.push(c);
            }
            Err(why) => out.rows.push(Row::alone(benchmark, configuration, &m, why)),
        }
        out.measurements.push(m);
    }
    Ok(out)
}

fn server(port: u16, dir: &Path) -> Vec<String> {
    argv([
        "redis-server",
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.display().to_string(),
    ])
}

fn holder_argv(holder: &Path, port: u16, go: &Path) -> Vec<String> {
    argv([
        "python3".to_string(),
        holder.display().to_string(),
        "127.0.0.1".to_string(),
        port.to_string(),
        CLIENTS.to_string(),
        go.display().to_string(),
    ])
}

fn expect(lines: &mut Lines, want: &str) -> anyhow::Result<Instant> {
    let (at, line) = lines.next_line(TIMEOUT)?;
    if line != want {
        bail!("the holder printed {line:?}, not {want:?}");
    }
    Ok(at)
}

fn appshot_run(
    appshot: &Appshot,
    dir: &Path,
    holder: &Path,
    port: u16,
    round: usize,
) -> anyhow::Result<Run> {
    let aid = format!("rc{round}");
    let data = dir.join(&aid);
    std::fs::create_dir_all(&data)?;
    let instance = appshot.server(&aid, port, &server(port, &data))?;
    let go = dir.join(format!("{aid}.go"));
    let mut clients = Lines::spawn(
        &mut appshot.foreground(&aid, &holder_argv(holder, port, &go)),
        &format!("holder of {CLIENTS} connections under AID {aid}"),
    )?;
    expect(&mut clients, "ready")?;

    let image = dir.join(format!("{aid}.img"));
    let what = format!("redis instance {}", instance.name());
    let (line, took) = take_snapshot(appshot, &instance, &image, &[], &what)?;
    if line.after != After::Stopped {
        bail!("`appshot snapshot` of {what} did not stop it");
    }
    drop(instance);

    let name = appshot.name(&format!("{aid}-restored"));
    let started = Instant::now();
    let (restored, restore_cmd) = appshot.restore(&image, &name)?;
    std::fs::write(&go, "")?;
    let answered = expect(&mut clients, "ok")?;
    clients.wait_success(TIMEOUT)?;
    drop(restored);
    std::fs::remove_file(&image)?;
    Ok(Run {
        snapshot_ms: millis(took),
        restore_ms: millis(answered.saturating_duration_since(started)),
        restore_cmd_ms: millis(restore_cmd),
    })
}

/// The native redis, killed when dropped unless reaped.
struct Native(Option<Child>);

impl Drop for Native {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn criu_run(dir: &Path, holder: &Path, port: u16, round: usize) -> anyhow::Result<Run> {
    let what = format!("native redis for criu (run {})", round + 1);
    let data = dir.join(format!("native-{round}"));
    std::fs::create_dir_all(&data)?;
    let child =
        procs::spawn_session_leader(&server(port, &data), &what, Stdio::null(), Stdio::null())?;
    let mut native = Native(Some(child));
    let pid = native.0.as_ref().expect("spawned").id();
    net::wait_listening(port, TIMEOUT, || Ok(()))?;
    let go = dir.join(format!("native-{round}.go"));
    let mut clients = Lines::spawn(
        &mut procs::command(&holder_argv(holder, port, &go)),
        &format!("native holder of {CLIENTS} connections"),
    )?;
    expect(&mut clients, "ready")?;

    let images = dir.join(format!("criu-{round}"));
    std::fs::create_dir_all(&images)?;
    let pid_arg = pid.to_string();
    let (snapshot_ms, _) = criu::run_criu(
        &images,
        &["dump", "--tcp-established", "-t", &pid_arg],
        &format!("criu dump --tcp-established of {what}"),
    )?;
    // Killed by the dump; reaped so that its PID is free for the restore.
    let mut child = native.0.take().expect("spawned");
    child.wait()?;

    let pidfile = images.join("restored.pid");
    let pidfile_arg = pidfile.display().to_string();
    let started = Instant::now();
    let (restore_cmd_ms, _) = criu::run_criu(
        &images,
        &[
            "restore",
            "--tcp-established",
            "-d",
            "--pidfile",
            &pidfile_arg,
        ],
        &format!("criu restore --tcp-established of {what}"),
    )?;
    std::fs::write(&go, "")?;
    let restored: u32 = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()
        .map_err(|e| anyhow!("{}: {e}", pidfile.display()))?;
    let _restored = procs::Orphans(vec![restored]);
    let answered = expect(&mut clients, "ok")?;
    clients.wait_success(TIMEOUT)?;
    std::fs::remove_dir_all(&images)?;
    Ok(Run {
        snapshot_ms,
        restore_ms: millis(answered.saturating_duration_since(started)),
        restore_cmd_ms,
    })
}
