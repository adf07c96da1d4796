//! CRIU, the peer of the snapshot benchmark: the same memhold workload run
//! natively (CRIU does not multiplex ports), dumped with `criu dump
//! --leave-running` and `criu dump`, restored with `criu restore -d` and
//! then lazily (`criu lazy-pages` serving `criu restore -d --lazy-pages`),
//! and checked like appshot's restores. Used only where `criu` is installed and
//! `criu check` passes; otherwise the rows say why there is no peer figure.
//!
//! The criu binary is `$CRIU` (bench/run.sh sets it to the CRIU 4.x it
//! found or built), else `criu` on PATH. Debian 12's criu 3.17.1 fails
//! `criu check` on Linux 6.18 (vDSO layout); CRIU 4.2, built by
//! `../shared/peers/build-criu.sh`, passes it and runs this module.
//!
//! The process is started in a session of its own (see
//! `procs::spawn_session_leader`), so no `--shell-job`. No connection is
//! open at the dump (the probe is blocked in accept), so no
//! `--tcp-established`; the listening socket is dumped as such.

use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::snapshot::{ask, check_answer, first_answer, millis, serve, START, WAIT_MS};
use crate::net;
use crate::procs::{self, Lines};

const TIMEOUT: Duration = Duration::from_secs(300);

/// One run of CRIU on one size.
pub struct CriuRun {
    /// Wall time of `criu dump` (the process is killed after).
    pub dump_ms: f64,
    /// The image files, without CRIU's logs.
    pub image_mib: f64,
    /// `criu dump --leave-running`: the "Frozen time" of its
    /// `--display-stats` (from the freeze to the thaw).
    pub frozen_ms: f64,
    /// The wall time of that `criu dump --leave-running`.
    pub leave_running_wall_ms: f64,
    /// From the start of `criu restore -d` to a client's first answer.
    pub restore_answer_ms: f64,
    /// The same for `criu restore -d --lazy-pages`, its `criu lazy-pages`
    /// daemon started just before.
    pub lazy_answer_ms: f64,
}

/// The criu to run: `$CRIU`, else `criu` on PATH.
pub fn binary() -> String {
    std::env::var("CRIU")
        .ok()
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "criu".into())
}

/// `Ok(version)` when criu is installed and `criu check` passes; otherwise
/// why there is no peer, for the rows.
pub fn usable() -> Result<String, String> {
    let criu = binary();
    let version = match Command::new(&criu)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "{criu} not installed (bench/run.sh builds CRIU 4.2 from ../shared/peers/)"
            ))
        }
        Err(e) => return Err(format!("{criu} --version: {e}")),
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .unwrap_or("(unknown version)")
            .trim()
            .to_string(),
    };
    if !version.starts_with("4.") {
        return Err(format!(
            "{criu} is criu {version}, not 4.x (bench/run.sh builds CRIU 4.2 from ../shared/peers/)"
        ));
    }
    match Command::new(&criu)
        .arg("check")
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Err(format!("criu {version}: criu check: {e}")),
        Ok(out) if !out.status.success() => Err(format!(
            "criu {version} is installed but `criu check` fails: {}",
            check_errors(&String::from_utf8_lossy(&out.stderr))
        )),
        Ok(_) => Ok(version),
    }
}

/// The first two distinct messages of `criu check`'s error lines
/// (`Error (file:line): message`), without the bare exit statuses of the
/// helpers it ran.
fn check_errors(stderr: &str) -> String {
    let mut messages: Vec<&str> = Vec::new();
    for line in stderr.lines() {
        let message = line.split_once("): ").map_or(line, |(_, m)| m).trim();
        if message.is_empty() || message.starts_with("exited, status") {
            continue;
        }
        if !messages.contains(&message) {
            messages.push(message);
        }
    }
    if messages.is_empty() {
        return "no error message".into();
    }
    messages.truncate(2);
    messages.join("; ")
}

/// A native process killed (SIGKILL) when dropped, unless reaped already.
struct Native {
    child: Child,
    reaped: bool,
}

impl Drop for Native {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn one_run(
    probe: &str,
    dir: &Path,
    mib: u64,
    port: u16,
    expected: &str,
    round: usize,
) -> anyhow::Result<CriuRun> {
    let what = format!("native memhold ({mib} MiB) for criu");
    // No output: files CRIU would have to find unchanged at restore.
    let child = procs::spawn_session_leader(
        &serve(probe, port, mib),
        &what,
        Stdio::null(),
        Stdio::null(),
    )?;
    let mut native = Native {
        child,
        reaped: false,
    };
    let pid = native.child.id();
    net::wait_listening(port, START, || match native.child.try_wait()? {
        Some(status) => bail!("{what} exited ({})", procs::describe(status)),
        None => Ok(()),
    })?;
    verify(probe, port, expected, &what)?;

    let images = dir.join(format!("criu-{mib}-{round}"));
    let frozen = dir.join(format!("criu-{mib}-{round}-lr"));
    for d in [&images, &frozen] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let pid_arg = pid.to_string();
    let (leave_running_wall_ms, stats) = run_criu(
        &frozen,
        &["dump", "--leave-running", "--display-stats", "-t", &pid_arg],
        &format!("criu dump --leave-running of {what}"),
    )?;
    let frozen_ms = frozen_time_ms(&stats)?;
    std::fs::remove_dir_all(&frozen).with_context(|| format!("removing {}", frozen.display()))?;
    verify(
        probe,
        port,
        expected,
        &format!("{what} after criu dump --leave-running"),
    )?;

    let (dump_ms, _) = run_criu(
        &images,
        &["dump", "-t", &pid_arg],
        &format!("criu dump of {what}"),
    )?;
    // Killed by the dump; reaped so that its PID is free for the restore.
    native.child.wait()?;
    native.reaped = true;
    let image_mib = image_bytes(&images)? as f64 / (1u64 << 20) as f64;

    let pidfile = images.join("restored.pid");
    let pidfile_arg = pidfile.display().to_string();
    let mut client = Lines::spawn(
        &mut procs::command(&ask(probe, port, "ping", WAIT_MS)),
        &format!("native client waiting for criu restore ({mib} MiB)"),
    )?;
    let (restore_answer_ms, ()) = first_answer(&mut client, mib, "criu restore", || {
        run_criu(
            &images,
            &["restore", "-d", "--pidfile", &pidfile_arg],
            &format!("criu restore of {what}"),
        )
        .map(drop)
    })?;
    let restored = procs::Orphans(vec![restored_pid(&pidfile)?]);
    verify(probe, port, expected, &format!("{what} restored by criu"))?;
    drop(restored);
    let lazy_answer_ms = lazy_restore(probe, &images, mib, port, expected, &what)?;
    std::fs::remove_dir_all(&images).with_context(|| format!("removing {}", images.display()))?;
    Ok(CriuRun {
        dump_ms,
        image_mib,
        frozen_ms,
        leave_running_wall_ms,
        restore_answer_ms,
        lazy_answer_ms,
    })
}

/// `criu restore -d --lazy-pages` of the images in `images`, served by a
/// `criu lazy-pages` daemon started first (it waits for the restore on a
/// socket in the images directory, serves the faults and prefetches, and
/// exits once every page is in): the milliseconds from the restore's start
/// to a client's first answer. The whole memory's checksum is then checked.
fn lazy_restore(
    probe: &str,
    images: &Path,
    mib: u64,
    port: u16,
    expected: &str,
    what: &str,
) -> anyhow::Result<f64> {
    let mut daemon = Command::new(binary())
        .arg("lazy-pages")
        .arg("-D")
        .arg(images)
        .args(["-o", "lazy-pages.log", "-v2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting criu lazy-pages")?;
    let daemon_pid = daemon.id();
    let _daemon = procs::Orphans(vec![daemon_pid]);
    // Its socket appears once it listens.
    let socket = images.join("lazy-pages.socket");
    let deadline = Instant::now() + START;
    while !socket.exists() {
        if let Some(status) = daemon.try_wait()? {
            bail!("criu lazy-pages exited ({})", procs::describe(status));
        }
        if Instant::now() > deadline {
            bail!("criu lazy-pages made no {} in {START:?}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let pidfile = images.join("lazy.pid");
    let pidfile_arg = pidfile.display().to_string();
    let mut client = Lines::spawn(
        &mut procs::command(&ask(probe, port, "ping", WAIT_MS)),
        &format!("native client waiting for criu lazy restore ({mib} MiB)"),
    )?;
    let (answer_ms, ()) = first_answer(&mut client, mib, "criu lazy restore", || {
        run_criu(
            images,
            &["restore", "-d", "--lazy-pages", "--pidfile", &pidfile_arg],
            &format!("criu restore --lazy-pages of {what}"),
        )
        .map(drop)
    })?;
    let _restored = procs::Orphans(vec![restored_pid(&pidfile)?]);
    verify(
        probe,
        port,
        expected,
        &format!("{what} restored lazily by criu"),
    )?;
    Ok(answer_ms)
}

/// The "Frozen time: N us" line of `criu dump --display-stats`, in ms.
pub fn frozen_time_ms(stats: &str) -> anyhow::Result<f64> {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("Frozen time:"))
        .and_then(|v| v.trim().strip_suffix("us"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|us| us / 1000.0)
        .ok_or_else(|| anyhow::anyhow!("no `Frozen time: N us` in criu's stats: {stats:?}"))
}

/// `criu ARGS` with its images and its log in `dir`; returns its wall
/// time in ms and its output. On failure the error has the tail of CRIU's
/// log.
pub fn run_criu(dir: &Path, args: &[&str], what: &str) -> anyhow::Result<(f64, String)> {
    let log = format!("{}.log", args[0]);
    let started = Instant::now();
    let ran = procs::run(
        Command::new(binary())
            .arg("-D")
            .arg(dir)
            .args(["-o", &log, "-v2"])
            .args(args),
        what,
        TIMEOUT,
    );
    let took = millis(started.elapsed());
    let out = ran.map_err(|e| {
        let path = dir.join(&log);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        e.context(procs::tail(&path.display().to_string(), &text))
    })?;
    Ok((took, out))
}

fn verify(probe: &str, port: u16, expected: &str, what: &str) -> anyhow::Result<()> {
    let out = procs::run(
        &mut procs::command(&ask(probe, port, "sum", 10_000)),
        &format!("checksum query to {what}"),
        TIMEOUT,
    )?;
    check_answer(&out, expected, what)
}

/// The PID `criu restore --pidfile` wrote.
fn restored_pid(pidfile: &Path) -> anyhow::Result<u32> {
    std::fs::read_to_string(pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}", pidfile.display()))
}

/// Bytes of the image files in `dir` (CRIU's `*.img`), logs and pidfile
/// left out.
pub fn image_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "img") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_errors_keep_the_messages_not_the_exit_statuses() {
        // `criu check` of criu 3.17.1 on Linux 6.18.
        let stderr = "Error (criu/util.c:642): exited, status=1\n\
            Error (criu/util.c:642): exited, status=1\n\
            Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n\
            Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable\n\
            Error (criu/kerndat.c:1615): kerndat_vdso_fill_symtable failed when initializing kerndat.\n";
        assert_eq!(
            check_errors(stderr),
            "vdso: Unexpected rt vDSO area bounds; vdso: Failed to fill self vdso symtable"
        );
        assert_eq!(check_errors(""), "no error message");
    }

    #[test]
    fn frozen_time_comes_from_the_stats() {
        let stats = "Displaying dump stats:\nFreezing time: 231 us\nFrozen time: 5758 us\nMemory dump time: 585 us\n";
        assert_eq!(frozen_time_ms(stats).unwrap(), 5.758);
        assert!(frozen_time_ms("Freezing time: 231 us\n").is_err());
    }

    #[test]
    fn only_image_files_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("core-1.img"), [0u8; 10]).unwrap();
        std::fs::write(dir.path().join("criu.log"), [0u8; 1000]).unwrap();
        assert_eq!(image_bytes(dir.path()).unwrap(), 110);
    }
}
