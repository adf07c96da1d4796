//! Snapshot and restore of a process tree: nginx, a master and 4 workers
//! (`worker_processes 4; daemon off;`, everything below a private
//! directory as in tests/tests/trees.rs), under appshot and, as the peer,
//! the same nginx run natively under CRIU.
//!
//! Each run:
//! 1. appshot: `appshot run --aid A -d -- nginx -c CONF`, waits for the 5
//!    processes and an answer, notes the tree's PSS, then `appshot snapshot
//!    NAME -o IMG` (the instance stops): the command's wall time, the dump
//!    time appshot reports, the image size. A supervised client of the AID
//!    retries its connect every 0.5 ms; `appshot restore IMG --detach`: wall
//!    time to its first HTTP answer; then the restored tree's PSS (the 5
//!    processes are back), and its anonymous part (`Pss_Anon`): right
//!    after a restore the file-backed pages (binary, libraries) are only
//!    those faulted in yet, so whole PSS drops;
//! 2. CRIU: the same nginx run natively (another port), `criu dump --tree
//!    MASTER` (the tree is killed by the dump): wall time, image size; a
//!    native client retrying its connect; `criu restore -d`: wall time to
//!    its first answer.
//!
//! CRIU flags: none for the session, nginx's master is started in a session
//! of its own (`procs::spawn_session_leader`). No
//! connection is open at the dump (the client has finished), so no
//! `--tcp-established`; nginx has no Unix socket to the outside (stdio is
//! /dev/null, logs are files), so no `--ext-unix-sk`. `criu check` on this
//! kernel passes without `--ext-unix-sk` being needed.
//!
//! The HTTP client is `memhold ask HOST PORT "GET /" WAIT_MS`: an HTTP/0.9
//! request, whose answer is the body nginx returns, the PID of the worker
//! that served it (`return 200 "$pid\n"`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::criu;
use super::snapshot::{
    ask, first_answer_that, kib, millis, smaps_rollup, take_snapshot, After, START, WAIT_MS,
};
use super::{argv, Ctx, Outcome};
use crate::appshot::{Appshot, Instance};
use crate::measure::{warmup_mark, Measurement, Unit};
use crate::probes::MEMHOLD;
use crate::procs::{self, Lines};
use crate::table::Row;

pub const TITLE: &str = "nginx tree";
const WORKERS: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct AppshotRun {
    snapshot_wall_ms: f64,
    dump_ms: f64,
    image_mib: f64,
    restore_answer_ms: f64,
    pss_before_mib: f64,
    pss_after_mib: f64,
    anon_before_mib: f64,
    anon_after_mib: f64,
}

struct CriuRun {
    dump_ms: f64,
    image_mib: f64,
    restore_answer_ms: f64,
}

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let appshot = ctx.appshot;
    let probe = MEMHOLD.build(ctx.work)?.display().to_string();
    let nginx = which("nginx")?;
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
        .prefix("nginx.")
        .tempdir_in(ctx.work)
        .context("creating nginx's directory")?;
    let port = ctx.ports.take()?;
    let native_port = ctx.ports.take()?;
    let appshot_conf = Conf::write(&dir.path().join("appshot"), port)?;
    let native_conf = Conf::write(&dir.path().join("native"), native_port)?;

    let warmup = ctx.plan.warmup;
    let total = warmup + ctx.plan.snapshot_runs;
    let (mut runs, mut peers) = (Vec::new(), Vec::new());
    for round in 0..total {
        procs::check_interrupted()?;
        let failed = || format!("{TITLE}: run {} of {total} failed", round + 1);
        let a = appshot_run(appshot, &probe, &nginx, &appshot_conf, round).with_context(failed)?;
        eprintln!(
            "  {TITLE}: run {}/{total}{}: appshot snapshot {:.0} ms (dump {:.0} ms, image {:.1} MiB), restore {:.0} ms to first answer; PSS {:.1} MiB before, {:.1} MiB after (anonymous {:.1} / {:.1} MiB)",
            round + 1,
            warmup_mark(round, warmup),
            a.snapshot_wall_ms,
            a.dump_ms,
            a.image_mib,
            a.restore_answer_ms,
            a.pss_before_mib,
            a.pss_after_mib,
            a.anon_before_mib,
            a.anon_after_mib
        );
        runs.push(a);
        if peer.is_ok() {
            let c = criu_run(&probe, &nginx, &native_conf, round)
                .with_context(failed)
                .context("criu (the peer)")?;
            eprintln!(
                "  {TITLE}: run {}/{total}{}: criu dump {:.0} ms (images {:.1} MiB), restore {:.0} ms to first answer",
                round + 1,
                warmup_mark(round, warmup),
                c.dump_ms,
                c.image_mib,
                c.restore_answer_ms
            );
            peers.push(c);
        }
    }

    let figures: [Figure; 3] = [
        (
            "nginx snapshot",
            "master + 4 workers, then stopped: wall time of `appshot snapshot` / `criu dump --tree`",
            Unit::Millis,
            |a| a.snapshot_wall_ms,
            |c| c.dump_ms,
        ),
        (
            "nginx snapshot",
            "master + 4 workers: image size",
            Unit::MiB,
            |a| a.image_mib,
            |c| c.image_mib,
        ),
        (
            "nginx restore",
            "master + 4 workers: wall time to first HTTP answer",
            Unit::Millis,
            |a| a.restore_answer_ms,
            |c| c.restore_answer_ms,
        ),
    ];
    let mut out = Outcome::default();
    for (benchmark, configuration, unit, get, peer_get) in figures {
        let m = Measurement::from_runs(
            benchmark,
            configuration,
            unit,
            runs.iter().map(get).collect(),
            warmup,
        )?;
        match &peer {
            Ok(_) => {
                let c = Measurement::from_runs(
                    benchmark,
                    &format!("{configuration} (criu)"),
                    unit,
                    peers.iter().map(peer_get).collect(),
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
    // The file-backed part of PSS (binary, libraries) is whatever is
    // faulted in yet, so the anonymous part is the one to compare.
    let memory: [(&str, BeforeAfter); 2] = [
        ("PSS", |a| (a.pss_before_mib, a.pss_after_mib)),
        ("anonymous PSS (Pss_Anon)", |a| {
            (a.anon_before_mib, a.anon_after_mib)
        }),
    ];
    for (what, get) in memory {
        let before = Measurement::from_runs(
            "nginx memory",
            &format!("{what} of master + 4 workers before the snapshot"),
            Unit::MiB,
            runs.iter().map(|a| get(a).0).collect(),
            warmup,
        )?;
        let after = Measurement::from_runs(
            "nginx memory",
            &format!("{what} of master + 4 workers after appshot restore"),
            Unit::MiB,
            runs.iter().map(|a| get(a).1).collect(),
            warmup,
        )?;
        out.rows.push(Row::compared(
            "nginx memory",
            &format!("{what} of master + 4 workers under appshot; peer column: before the snapshot, appshot: after restore"),
            "before",
            &before,
            &after,
        ));
        out.measurements.extend([before, after]);
    }
    let dump = Measurement::from_runs(
        "nginx snapshot",
        "master + 4 workers: dump time appshot reports",
        Unit::Millis,
        runs.iter().map(|a| a.dump_ms).collect(),
        warmup,
    )?;
    out.measurements.push(dump);
    Ok(out)
}

/// A table row: benchmark, configuration, unit, appshot's figure, CRIU's.
type Figure = (
    &'static str,
    &'static str,
    Unit,
    fn(&AppshotRun) -> f64,
    fn(&CriuRun) -> f64,
);

/// A memory figure of a run: (before the snapshot, after restore).
type BeforeAfter = fn(&AppshotRun) -> (f64, f64);

/// nginx's configuration and private directory.
struct Conf {
    dir: PathBuf,
    path: PathBuf,
    port: u16,
}

impl Conf {
    /// `worker_processes 4; daemon off;`, pid file, logs and temp paths
    /// below `dir`, as in tests/tests/trees.rs.
    fn write(dir: &Path, port: u16) -> anyhow::Result<Conf> {
        std::fs::create_dir_all(dir.join("www"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let d = dir.display();
        let config = format!(
            "worker_processes {WORKERS};
daemon off;
# Workers otherwise run as nobody, who cannot enter the 0700 temp dir.
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen {port};
        root {d}/www;
        location / {{ return 200 \"$pid\\n\"; }}
    }}
}}
"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        Ok(Conf {
            dir: dir.to_path_buf(),
            path,
            port,
        })
    }

    fn argv(&self, nginx: &str) -> Vec<String> {
        let d = self.dir.display();
        argv([
            nginx.to_string(),
            "-p".into(),
            format!("{d}/"),
            "-e".into(),
            format!("{d}/error.log"),
            "-c".into(),
            self.path.display().to_string(),
        ])
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

fn appshot_run(
    appshot: &Appshot,
    probe: &str,
    nginx: &str,
    conf: &Conf,
    round: usize,
) -> anyhow::Result<AppshotRun> {
    let aid = format!("ng{round}");
    let instance = appshot.server(&aid, conf.port, &conf.argv(nginx))?;
    let what = format!("nginx instance {}", instance.name());
    let master = master_of(&instance, &what)?;
    wait_tree(master, &what, conf)?;
    let pids = tree(master);
    served(appshot, probe, &aid, conf.port, &pids, &what)?;
    let mut f = AppshotRun::default();
    (f.pss_before_mib, f.anon_before_mib) = pss_mib(&pids)?;

    let image = conf.dir.join(format!("{aid}.img"));
    let (line, took) = take_snapshot(appshot, &instance, &image, &[], &what)?;
    if line.after != After::Stopped {
        bail!("`appshot snapshot` of {what} did not stop it");
    }
    f.snapshot_wall_ms = millis(took);
    (f.dump_ms, f.image_mib) = (line.dump_ms, line.image_mib);
    drop(instance);

    let name = appshot.name(&format!("{aid}-restored"));
    let mut client = Lines::spawn(
        &mut appshot.foreground(&aid, &http_get(probe, conf.port, WAIT_MS)),
        &format!("client of AID {aid} waiting for the restore of nginx"),
    )?;
    let (answer_ms, (restored, _)) = first_answer_that(
        &mut client,
        "the restore of nginx",
        |l| is_pid_answer(l, None),
        || appshot.restore(&image, &name),
    )?;
    f.restore_answer_ms = answer_ms;
    let what = format!("restored nginx instance {name}");
    let master = master_of(&restored, &what)?;
    wait_tree(master, &what, conf)?;
    // Host PIDs are new; the instance's own (namespace) PIDs are kept,
    // which tests/tests/trees.rs checks.
    let after = tree(master);
    served(appshot, probe, &aid, conf.port, &after, &what)?;
    (f.pss_after_mib, f.anon_after_mib) = pss_mib(&after)?;
    drop(restored);
    std::fs::remove_file(&image).with_context(|| format!("removing {}", image.display()))?;
    Ok(f)
}

fn criu_run(probe: &str, nginx: &str, conf: &Conf, round: usize) -> anyhow::Result<CriuRun> {
    let what = format!("native nginx for criu (run {})", round + 1);
    // stdio to /dev/null: nothing CRIU would have to find again at restore.
    let child =
        procs::spawn_session_leader(&conf.argv(nginx), &what, Stdio::null(), Stdio::null())?;
    let mut native = Native {
        child,
        tree: Vec::new(),
    };
    let master = native.child.id();
    wait_tree(master, &what, conf)?;
    native.tree = tree(master);
    let pids = native.tree.clone();
    ask_native(probe, conf.port, &pids, &what)?;

    let images = conf.dir.join(format!("criu-{round}"));
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let master_arg = master.to_string();
    let (dump_ms, _) = criu::run_criu(
        &images,
        &["dump", "--tree", &master_arg],
        &format!("criu dump --tree of {what}"),
    )?;
    let image_mib = criu::image_bytes(&images)? as f64 / (1u64 << 20) as f64;
    // Killed by the dump: the master is reaped here, the workers by init;
    // the restore needs all their PIDs free.
    native.child.wait()?;
    drop(native);
    procs::wait_gone(&pids)?;

    let pidfile = images.join("restored.pid");
    let pidfile_arg = pidfile.display().to_string();
    let mut client = Lines::spawn(
        &mut procs::command(&http_get(probe, conf.port, WAIT_MS)),
        "native client waiting for criu restore of nginx",
    )?;
    let (restore_answer_ms, ()) = first_answer_that(
        &mut client,
        "criu restore of nginx",
        |l| is_pid_answer(l, None),
        || {
            criu::run_criu(
                &images,
                &["restore", "-d", "--pidfile", &pidfile_arg],
                &format!("criu restore of {what}"),
            )
            .map(drop)
        },
    )?;
    let restored: u32 = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}", pidfile.display()))?;
    let _restored = procs::Orphans(tree(restored));
    if tree(restored) != pids {
        bail!(
            "criu restored {:?}, not the {pids:?} it dumped",
            tree(restored)
        );
    }
    ask_native(probe, conf.port, &pids, &format!("{what} restored by criu"))?;
    std::fs::remove_dir_all(&images).with_context(|| format!("removing {}", images.display()))?;
    Ok(CriuRun {
        dump_ms,
        image_mib,
        restore_answer_ms,
    })
}

/// The native nginx, its whole tree killed when dropped.
struct Native {
    child: Child,
    tree: Vec<u32>,
}

impl Drop for Native {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &pid in &self.tree {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The host PID of the nginx master of an instance: the instance's
/// process, or the first "nginx: master" below it.
fn master_of(instance: &Instance<'_>, what: &str) -> anyhow::Result<u32> {
    let app = instance.app_pid()?;
    procs::wait_for(START, POLL, || {
        Ok(std::iter::once(app)
            .chain(descendants(app))
            .find(|&p| cmdline(p).starts_with("nginx: master")))
    })?
    .ok_or_else(|| anyhow!("{what}: no nginx master below PID {app}"))
}

/// Waits until `master` has its 4 workers.
fn wait_tree(master: u32, what: &str, conf: &Conf) -> anyhow::Result<()> {
    procs::wait_for(START, POLL, || {
        let t = tree(master);
        let workers = t
            .iter()
            .filter(|&&p| cmdline(p).starts_with("nginx: worker"))
            .count();
        if !Path::new(&format!("/proc/{master}")).exists() {
            bail!(
                "{what}: master {master} exited{}",
                procs::tail("error.log", &conf.error_log())
            );
        }
        Ok((t.len() == WORKERS + 1 && workers == WORKERS).then_some(()))
    })?
    .ok_or_else(|| {
        anyhow!(
            "{what}: not 1 master and {WORKERS} workers after {}s: {:?}{}",
            START.as_secs(),
            tree(master),
            procs::tail("error.log", &conf.error_log())
        )
    })
}

/// `pid` and its descendants, sorted.
fn tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<u32> = std::iter::once(pid).chain(descendants(pid)).collect();
    all.sort_unstable();
    all
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The sums of the processes' PSS and of its anonymous part
/// (`Pss_Anon`), MiB.
fn pss_mib(pids: &[u32]) -> anyhow::Result<(f64, f64)> {
    let (mut pss, mut anon) = (0, 0);
    for &pid in pids {
        let rollup = smaps_rollup(pid)?;
        pss += kib(&rollup, "Pss")?;
        anon += kib(&rollup, "Pss_Anon")?;
    }
    Ok((pss as f64 / 1024.0, anon as f64 / 1024.0))
}

/// `memhold ask HOST PORT "GET /"`: an HTTP/0.9 request; the answer is
/// the body, a worker's PID.
fn http_get(probe: &str, port: u16, wait_ms: u64) -> Vec<String> {
    ask(probe, port, "GET /", wait_ms)
}

/// "answer N": N a PID, one of `pids` when given.
fn is_pid_answer(line: &str, pids: Option<&BTreeSet<u32>>) -> bool {
    line.strip_prefix("answer ")
        .and_then(|n| n.trim().parse::<u32>().ok())
        .is_some_and(|n| pids.is_none_or(|p| p.contains(&n)))
}

/// An answer from nginx of `aid`, through appshot (the PIDs it sees are
/// the instance's, not the host's, so only the form is checked).
fn served(
    appshot: &Appshot,
    probe: &str,
    aid: &str,
    port: u16,
    pids: &[u32],
    what: &str,
) -> anyhow::Result<()> {
    let out = procs::run(
        &mut appshot.foreground(aid, &http_get(probe, port, 10_000)),
        &format!("HTTP request to {what} ({} processes)", pids.len()),
        TIMEOUT,
    )?;
    let line = out.lines().find(|l| l.starts_with("answer")).unwrap_or("");
    if !is_pid_answer(line, None) {
        bail!("{what} answered {out:?}, not a worker's PID");
    }
    Ok(())
}

/// An answer from a native nginx: a PID of its workers.
fn ask_native(probe: &str, port: u16, pids: &[u32], what: &str) -> anyhow::Result<()> {
    let out = procs::run(
        &mut procs::command(&http_get(probe, port, 10_000)),
        &format!("HTTP request to {what}"),
        TIMEOUT,
    )?;
    let set: BTreeSet<u32> = pids.iter().copied().collect();
    let line = out.lines().find(|l| l.starts_with("answer")).unwrap_or("");
    if !is_pid_answer(line, Some(&set)) {
        bail!("{what} answered {out:?}, not one of its workers' PIDs {pids:?}");
    }
    Ok(())
}

fn which(program: &str) -> anyhow::Result<String> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
        .ok_or_else(|| anyhow!("`{program}` is not on PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_worker_pids() {
        let pids: BTreeSet<u32> = [10, 11].into();
        assert!(is_pid_answer("answer 10", Some(&pids)));
        assert!(!is_pid_answer("answer 12", Some(&pids)));
        assert!(is_pid_answer("answer 12", None));
        assert!(!is_pid_answer("answer <html>", None));
        assert!(!is_pid_answer("waiting", None));
    }
}
