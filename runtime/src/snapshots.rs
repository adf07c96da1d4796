//! `appshot snapshot` and `appshot inspect`: freezing an instance into an
//! image, and showing what an image holds. (`appshot restore` is a
//! supervisor started with an image; see `supervisor::run`.)

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use appshot_snapshot::dump::{dump, DumpRequest};
use appshot_snapshot::image::{open_file, FdKind, Image, InstanceInfo, VmaKind, PAGE};
use appshot_snapshot::proc::parse;
use appshot_snapshot::ptrace::Frozen;
use appshot_vpm::{is_alive, Protocol, Registry};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::ptrace::Options;
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::error::RuntimeError;
use crate::tree;

/// Opens a template for cloning. Its pages section (the part whose check
/// grows with the template) is verified in full once; a marker in the run
/// directory then records the file's identity, and later clones of the
/// same, unchanged file skip that scan. Any write to the file changes its
/// ctime, which no user can set back, so a changed template is verified
/// again. Header, manifest and layout are checked every time.
pub fn open_template(path: &Path, run_dir: &Path) -> Result<Image, RuntimeError> {
    let dir = run_dir.join("verified");
    // The identity comes from the opened file, so the marker speaks for the
    // very file whose pages it lets go unread.
    let file = open_file(path)?;
    let meta = file
        .metadata()
        .map_err(|e| RuntimeError::sys(format!("image {}", path.display()), e))?;
    let marker = dir.join(format!("{}-{}", meta.dev(), meta.ino()));
    let identity = format!(
        "{} {}.{} {}.{}\n",
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    );
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(identity.as_str()) {
        return Ok(Image::from_file(path, file, false)?);
    }
    let image = Image::from_file(path, file, true)?;
    // A marker that cannot be written only costs the next clone a scan.
    let _ = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&marker, identity));
    Ok(image)
}

/// Dumps below this size finish before a progress bar would be read.
const PROGRESS_FROM: u64 = 64 << 20;

pub fn snapshot(
    run_dir: &Path,
    name: &str,
    output: &Path,
    leave_running: bool,
    template: bool,
) -> Result<String, RuntimeError> {
    let registry = Registry::open(run_dir)?;
    let state = registry.transaction(|s| s.clone())?;
    let rec = state
        .instances
        .get(name)
        .ok_or_else(|| RuntimeError::NoInstance(name.to_string()))?;
    let app = rec.pid;
    let procs = tree::descendants(app);
    if procs.len() > 1 {
        return Err(RuntimeError::NotSnapshottable {
            name: name.to_string(),
            reason: format!(
                "it has {} processes ({procs:?}); only single-process instances (any number of threads) can be snapshotted yet",
                procs.len()
            ),
        });
    }
    let stat = std::fs::read_to_string(format!("/proc/{app}/stat"))
        .map_err(|e| RuntimeError::sys(format!("reading /proc/{app}/stat"), e))?;
    let init = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse::<i32>().ok())
        .ok_or_else(|| {
            RuntimeError::sys(
                format!("parsing /proc/{app}/stat"),
                std::io::ErrorKind::InvalidData,
            )
        })?;
    let status = std::fs::read_to_string(format!("/proc/{app}/status"))
        .map_err(|e| RuntimeError::sys(format!("reading /proc/{app}/status"), e))?;
    let ns_pid = parse::status_field(&status, "NSpid")
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(app);

    let virtualize = |addr: SocketAddr| {
        let mut a = addr;
        if let Some(v) = state.virtual_port_of(Protocol::Tcp, addr.ip(), addr.port()) {
            a.set_port(v);
        }
        a
    };
    let bar = std::cell::OnceCell::new();
    let progress = |done: u64, total: u64| {
        if total < PROGRESS_FROM || !std::io::stderr().is_terminal() {
            return;
        }
        let b = bar.get_or_init(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            b.set_message(format!("saving {name}"));
            b
        });
        b.set_position(done);
    };
    let req = DumpRequest {
        instance: InstanceInfo {
            name: rec.name.clone(),
            aid: rec.aid.clone(),
            command: rec.command.clone(),
            multiplexed: rec.multiplexed.clone(),
            template,
        },
        ns_pid,
        virtualize: &virtualize,
        progress: &progress,
    };

    let started = Instant::now();
    // Declared before `frozen`, so dropped after it on every path: the
    // signals stay blocked until the instance is released or killed.
    let blocked = BlockTermination::block();
    let frozen = Frozen::seize(app, Options::empty())?;
    let stats = dump(&frozen, &req, output)?;
    if let Some(b) = bar.get() {
        b.finish_and_clear();
    }
    let frozen_for;
    let after = if leave_running {
        frozen.release();
        drop(blocked);
        frozen_for = started.elapsed();
        "left running"
    } else {
        // Killed while still frozen: the instance never runs past the
        // snapshot. Killing the namespace init takes every process with it.
        frozen_for = started.elapsed();
        frozen.kill(|| {
            let _ = kill(Pid::from_raw(init), Signal::SIGKILL);
        });
        drop(blocked);
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_alive(run_dir, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        "stopped"
    };
    Ok(format!(
        "snapshot of {name} written to {}: {} of memory, image {}, {:.0} ms (frozen {:.0} ms); instance {after}",
        output.display(),
        mib(stats.pages_bytes),
        mib(stats.image_bytes),
        stats.seconds * 1e3,
        frozen_for.as_secs_f64() * 1e3
    ))
}

/// Blocks the signals that would end `appshot snapshot` (SIGINT, SIGTERM,
/// SIGHUP, SIGQUIT) while it is the tracer of a frozen instance: dying then
/// would detach threads in the middle of an injected syscall. Dropping it
/// restores the previous mask, and a signal that arrived meanwhile acts as
/// usual then. SIGKILL cannot be blocked; its window is the few
/// microseconds of a text swap.
struct BlockTermination {
    previous: Option<SigSet>,
}

impl BlockTermination {
    fn block() -> BlockTermination {
        let mut set = SigSet::empty();
        for s in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            set.add(s);
        }
        let mut previous = SigSet::empty();
        let previous = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut previous))
            .ok()
            .map(|()| previous);
        BlockTermination { previous }
    }
}

impl Drop for BlockTermination {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(previous), None);
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[derive(Serialize)]
struct Summary {
    path: String,
    size_bytes: u64,
    pages_bytes: u64,
    instance: String,
    aid: String,
    command: Vec<String>,
    created_unix: u64,
    pid: u32,
    exe: String,
    cwd: String,
    threads: Vec<ThreadSummary>,
    mappings: Vec<MappingSummary>,
    fds: Vec<FdSummary>,
    listening: Vec<String>,
}

#[derive(Serialize)]
struct ThreadSummary {
    tid: u32,
    name: String,
}

#[derive(Serialize)]
struct MappingSummary {
    start: String,
    end: String,
    prot: String,
    kind: String,
    saved_bytes: u64,
}

#[derive(Serialize)]
struct FdSummary {
    fd: i32,
    kind: String,
}

pub fn inspect(path: &Path, json: bool) -> Result<String, RuntimeError> {
    let image = Image::open(path)?;
    let m = &image.manifest;
    let p = &m.process;
    let summary = Summary {
        path: path.display().to_string(),
        size_bytes: image.size,
        pages_bytes: image.pages_len,
        instance: m.instance.name.clone(),
        aid: m.instance.aid.clone(),
        command: m.instance.command.clone(),
        created_unix: m.created_unix,
        pid: p.ns_pid,
        exe: p.exe.path.clone(),
        cwd: p.cwd.clone(),
        threads: p
            .threads
            .iter()
            .map(|t| ThreadSummary {
                tid: t.ns_tid,
                name: t.comm.clone(),
            })
            .collect(),
        mappings: p
            .vmas
            .iter()
            .map(|v| MappingSummary {
                start: format!("{:x}", v.start),
                end: format!("{:x}", v.end),
                prot: prot(v.prot, v.shared),
                kind: match &v.kind {
                    VmaKind::Anon => "anonymous".into(),
                    VmaKind::Stack => "[stack]".into(),
                    VmaKind::File { file, .. } => file.path.clone(),
                    VmaKind::Vdso(n) => n.clone(),
                    VmaKind::Vsyscall => "[vsyscall]".into(),
                },
                saved_bytes: v.pages.iter().map(|r| r.pages * PAGE).sum(),
            })
            .collect(),
        fds: p
            .fds
            .iter()
            .map(|f| FdSummary {
                fd: f.fd,
                kind: match &f.kind {
                    FdKind::Stdio => "stdio (inherited from the restoring supervisor)".into(),
                    FdKind::Path { file, pos, .. } => format!("file {} at offset {pos}", file.path),
                    FdKind::Pipe {
                        inode,
                        write_end,
                        data,
                        ..
                    } => format!(
                        "pipe {inode} {} end, {} bytes unread",
                        if *write_end { "write" } else { "read" },
                        data.len()
                    ),
                    FdKind::TcpSocket {
                        addr, listening, ..
                    } => format!("tcp {} {addr}", if *listening { "listen" } else { "bound" }),
                    FdKind::Epoll { targets, .. } => format!("epoll, {} fds", targets.len()),
                    FdKind::EventFd { count, .. } => format!("eventfd = {count}"),
                    FdKind::TimerFd(t) => format!(
                        "timerfd clock {}, {} ns left, period {} ns, {} unread",
                        t.clockid, t.time.value_ns, t.time.interval_ns, t.ticks
                    ),
                    FdKind::SignalFd { mask, .. } => format!("signalfd mask {mask:#x}"),
                    FdKind::Inotify { watches, .. } => {
                        format!("inotify, {} watches", watches.len())
                    }
                },
            })
            .collect(),
        listening: p.listening().map(String::from).collect(),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&summary).expect("serialisable") + "\n");
    }
    let mut out = format!(
        "image      {} ({}, {} of pages)\ninstance   {} (AID {})\ncommand    {}\nprocess    pid {} {}\ncwd        {}\nlistening  {}\n",
        summary.path,
        mib(summary.size_bytes),
        mib(summary.pages_bytes),
        summary.instance,
        summary.aid,
        summary.command.join(" "),
        summary.pid,
        summary.exe,
        summary.cwd,
        if summary.listening.is_empty() { "-".into() } else { summary.listening.join(", ") },
    );
    out.push_str(&format!("threads    {}\n", summary.threads.len()));
    for t in &summary.threads {
        out.push_str(&format!("  {:>7}  {}\n", t.tid, t.name));
    }
    out.push_str(&format!("mappings   {}\n", summary.mappings.len()));
    for v in &summary.mappings {
        out.push_str(&format!(
            "  {}-{} {} {:>10}  {}\n",
            v.start,
            v.end,
            v.prot,
            mib(v.saved_bytes),
            v.kind
        ));
    }
    out.push_str(&format!("fds        {}\n", summary.fds.len()));
    for f in &summary.fds {
        out.push_str(&format!("  {:>5}  {}\n", f.fd, f.kind));
    }
    Ok(out)
}

fn prot(p: u32, shared: bool) -> String {
    let bit = |b: i32, c: char| if p & b as u32 != 0 { c } else { '-' };
    format!(
        "{}{}{}{}",
        bit(libc::PROT_READ, 'r'),
        bit(libc::PROT_WRITE, 'w'),
        bit(libc::PROT_EXEC, 'x'),
        if shared { 's' } else { 'p' }
    )
}
