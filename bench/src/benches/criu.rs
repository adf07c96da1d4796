//! CRIU, the peer of the snapshot benchmark: the same memhold workload run
//! natively (CRIU does not multiplex ports), dumped with `criu dump
//! --leave-running` and `criu dump`, restored with `criu restore -d`, and
//! checked like appshot's restores. Used only where `criu` is installed and
//! `criu check` passes; otherwise the rows say why there is no peer figure.
//!
//! Not run on the machine the bench was written on: its criu (Debian 12's
//! 3.17.1) fails `criu check` on Linux 6.18 (vDSO layout), so this path has
//! only been exercised as far as that check.

use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
    /// Wall time of `criu dump --leave-running`: CRIU keeps the process
    /// frozen for nearly all of it.
    pub frozen_ms: f64,
    /// From the start of `criu restore -d` to a client's first answer.
    pub restore_answer_ms: f64,
}

/// `Ok(version)` when criu is installed and `criu check` passes; otherwise
/// why there is no peer, for the rows.
pub fn usable() -> Result<String, String> {
    let version = match Command::new("criu")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Err(e) if e.kind() == ErrorKind::NotFound => return Err("criu not installed".into()),
        Err(e) => return Err(format!("criu --version: {e}")),
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version: "))
            .unwrap_or("(unknown version)")
            .trim()
            .to_string(),
    };
    match Command::new("criu")
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

/// A process `criu restore -d` left behind (not our child): killed when
/// dropped, and waited for until it is gone.
struct Restored(u32);

impl Drop for Restored {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0 as i32);
        let _ = kill(pid, Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{}", self.0)).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
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
    let mut cmd = procs::command(&serve(probe, port, mib));
    let child = procs::spawn(&mut cmd, &what, Stdio::null(), Stdio::null())?;
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

    // The process is not in a session of its own: --shell-job.
    let images = dir.join(format!("criu-{mib}-{round}"));
    let frozen = dir.join(format!("criu-{mib}-{round}-lr"));
    for d in [&images, &frozen] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let pid_arg = pid.to_string();
    let frozen_ms = run_criu(
        &frozen,
        &["dump", "--shell-job", "--leave-running", "-t", &pid_arg],
        &format!("criu dump --leave-running of {what}"),
    )?;
    std::fs::remove_dir_all(&frozen).with_context(|| format!("removing {}", frozen.display()))?;
    verify(
        probe,
        port,
        expected,
        &format!("{what} after criu dump --leave-running"),
    )?;

    let dump_ms = run_criu(
        &images,
        &["dump", "--shell-job", "-t", &pid_arg],
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
            &["restore", "--shell-job", "-d", "--pidfile", &pidfile_arg],
            &format!("criu restore of {what}"),
        )
        .map(drop)
    })?;
    let restored_pid: u32 = std::fs::read_to_string(&pidfile)
        .with_context(|| format!("reading {}", pidfile.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{}", pidfile.display()))?;
    let _restored = Restored(restored_pid);
    verify(probe, port, expected, &format!("{what} restored by criu"))?;
    std::fs::remove_dir_all(&images).with_context(|| format!("removing {}", images.display()))?;
    Ok(CriuRun {
        dump_ms,
        image_mib,
        frozen_ms,
        restore_answer_ms,
    })
}

/// `criu ARGS` with its images and its log in `dir`; returns its wall
/// time in ms. On failure the error has the tail of CRIU's log.
fn run_criu(dir: &Path, args: &[&str], what: &str) -> anyhow::Result<f64> {
    let log = format!("{}.log", args[0]);
    let started = Instant::now();
    let ran = procs::run(
        Command::new("criu")
            .arg("-D")
            .arg(dir)
            .args(["-o", &log, "-v2"])
            .args(args),
        what,
        TIMEOUT,
    );
    let took = millis(started.elapsed());
    ran.map_err(|e| {
        let path = dir.join(&log);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        e.context(procs::tail(&path.display().to_string(), &text))
    })?;
    Ok(took)
}

fn verify(probe: &str, port: u16, expected: &str, what: &str) -> anyhow::Result<()> {
    let out = procs::run(
        &mut procs::command(&ask(probe, port, "sum", 10_000)),
        &format!("checksum query to {what}"),
        TIMEOUT,
    )?;
    check_answer(&out, expected, what)
}

/// Bytes of the image files in `dir` (CRIU's `*.img`), logs and pidfile
/// left out.
fn image_bytes(dir: &Path) -> anyhow::Result<u64> {
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
    fn only_image_files_count() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), [0u8; 100]).unwrap();
        std::fs::write(dir.path().join("core-1.img"), [0u8; 10]).unwrap();
        std::fs::write(dir.path().join("criu.log"), [0u8; 1000]).unwrap();
        assert_eq!(image_bytes(dir.path()).unwrap(), 110);
    }
}
