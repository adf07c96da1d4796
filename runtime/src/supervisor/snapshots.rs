//! `appshot snapshot` and `appshot inspect`: freezing an instance into an
//! image (the CLI asks, the instance's supervisor dumps), and showing what
//! an image holds. (`appshot restore` is a supervisor started with an
//! image; see `supervisor::run`.)

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appshot_snapshot::dump::{dump, DumpRequest};
use appshot_snapshot::image::format::temporary_path;
use appshot_snapshot::image::{
    open_file, Durability, FdKind, Image, ImageWriter, InstanceInfo, Manifest, VmaKind, PAGE,
};
use appshot_snapshot::kinds::tcp::Repairs;
use appshot_snapshot::precopy::{precopy, Hooks, Tracking};
use appshot_snapshot::ptrace::Frozen;
use appshot_snapshot::SnapshotError;
use appshot_sys::pidfd;
use appshot_vpm::{is_alive, Protocol, Registry};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::ptrace::Options;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::error::RuntimeError;
use crate::net::netlock::{self, Lock};
use crate::supervisor::control::{self, Peer, Progress, Request};
use crate::supervisor::pending::Pending;
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
/// How long `appshot snapshot` waits for the next line from the supervisor:
/// freezing, asking the process and stopping it send none.
const SNAPSHOT_IDLE: Duration = Duration::from_secs(120);

/// `appshot snapshot`: asks the instance's supervisor to dump it, drawing
/// the progress it reports. The supervisor is the tracer; if this process
/// dies midway, the supervisor releases the instance unchanged.
pub fn snapshot(
    run_dir: &Path,
    name: &str,
    output: &Path,
    options: SnapshotOptions,
    json: bool,
) -> Result<String, RuntimeError> {
    let (leave_running, template) = (options.leave_running, options.template);
    // The supervisor has a cwd of its own.
    let parent = options
        .parent
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .map_err(|e| RuntimeError::sys("parent image", e))?;
    if !is_alive(run_dir, name) {
        return Err(RuntimeError::NoInstance(name.to_string()));
    }
    // The supervisor has a cwd of its own.
    let output = std::path::absolute(output)
        .map_err(|e| RuntimeError::sys(format!("image {}", output.display()), e))?;
    let dir = run_dir.join("instances").join(name);
    let bar = std::cell::OnceCell::new();
    let progress = |p: Progress| {
        if p.total < PROGRESS_FROM || !std::io::stderr().is_terminal() {
            return;
        }
        let b = bar.get_or_init(|| {
            let b = ProgressBar::new(p.total);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            b.set_message(format!("saving {name}"));
            b
        });
        b.set_position(p.done);
    };
    let req = Request::Snapshot {
        output: output.clone(),
        leave_running,
        pre_copy: options.pre_copy,
        template: options.template,
        external_unix_close: options.external_unix_close,
        parent,
        track: options.track,
        sync: options.durability == Durability::Disk,
    };
    let answered = control::request_interruptible(&dir, &req, SNAPSHOT_IDLE, progress);
    if let Some(b) = bar.get() {
        b.finish_and_clear();
    }
    let interrupted = |leave_running| RuntimeError::SnapshotInterrupted {
        name: name.to_string(),
        leave_running,
    };
    // Withdrawn before the image was in place, the supervisor released the
    // instance as it was and removed the temporary.
    let reply = match answered? {
        control::Answered::Withdrawn => return Err(interrupted(leave_running)),
        control::Answered::Reply {
            reply,
            interrupted: true,
        } if !reply.ok => return Err(interrupted(leave_running)),
        control::Answered::Reply {
            reply,
            interrupted: true,
        } => {
            eprintln!(
                "appshot: interrupted after the image of {name} was in place: the snapshot is complete"
            );
            reply
        }
        control::Answered::Reply { reply, .. } => reply,
    };
    if !reply.ok {
        return Err(RuntimeError::SnapshotFailed {
            name: name.to_string(),
            message: reply.message,
        });
    }
    if !leave_running {
        // The supervisor answers once the instance is dead; its registry
        // entries go when the supervisor itself exits, within milliseconds
        // (a probe of its lock costs microseconds).
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_alive(run_dir, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(match (reply.snapshot, json) {
        (Some(taken), true) => serde_json::to_string_pretty(&taken).expect("serialisable"),
        (Some(taken), false) => taken.summary(),
        // An older supervisor (its instance started before an upgrade)
        // sends the summary only.
        (None, true) => serde_json::json!({
            "instance": name,
            "image": output,
            "left_running": leave_running,
            "template": template,
            "message": reply.message,
        })
        .to_string(),
        (None, false) => reply.message,
    })
}

/// How `appshot snapshot` was asked to dump.
#[derive(Clone, Debug, Default)]
pub struct SnapshotOptions {
    /// Let the instance run on.
    pub leave_running: bool,
    /// Copy memory while the instance runs (always with `leave_running`).
    pub pre_copy: bool,
    /// A template for `appshot clone`.
    pub template: bool,
    /// `--external-unix close`.
    pub external_unix_close: bool,
    /// An incremental snapshot: only the pages written since this image
    /// was taken are saved, the rest referred to in it.
    pub parent: Option<PathBuf>,
    /// Keep tracking writes after a `--leave-running` snapshot, for a
    /// later one on this one (an incremental one left running always
    /// does).
    pub track: bool,
    /// Whether the image is on disk before it is in place (and before a
    /// stopping snapshot stops the instance), or in the page cache.
    pub durability: Durability,
}

/// The image's durability `--sync` asks for.
pub fn durability(sync: bool) -> Durability {
    if sync {
        Durability::Disk
    } else {
        Durability::PageCache
    }
}

/// The write tracking a supervisor keeps on its running instance after a
/// snapshot, for the next incremental one: every page written since the
/// image was taken is known.
pub struct Armed {
    tracking: Tracking,
    /// The id of the image the tracking was settled for.
    id: u128,
    image: PathBuf,
    /// The image file as written: while it is unchanged, its pages need
    /// not be read again to be trusted.
    identity: Option<FileIdentity>,
}

/// What changes whenever a file is written: any write moves its ctime,
/// which no user can set back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The parent image of an incremental snapshot of instance `name`,
/// checked against the tracking `armed` on the instance: it must hold the
/// state the tracking was settled at, and it and its chain must be whole.
/// Its pages are read to check them only if the file is not the one this
/// supervisor wrote, unchanged.
fn open_parent(name: &str, parent: &Path, armed: Option<&Armed>) -> Result<Image, RuntimeError> {
    let Some(armed) = armed else {
        return Err(RuntimeError::NotSnapshottable {
            name: name.to_string(),
            reason: format!(
                "no write tracking is kept on it for parent image {}: take a snapshot with --leave-running --track first",
                parent.display()
            ),
        });
    };
    let refused = |source| RuntimeError::ParentRefused {
        name: name.to_string(),
        parent: parent.to_path_buf(),
        source: Box::new(source),
    };
    let file = open_file(parent).map_err(refused)?;
    let meta = file.metadata().map_err(|e| {
        refused(SnapshotError::Io {
            path: parent.to_path_buf(),
            error: e,
        })
    })?;
    let unchanged = armed.identity == Some(FileIdentity::of(&meta));
    let image = Image::from_file(parent, file, !unchanged).map_err(refused)?;
    if image.manifest.id != armed.id {
        return Err(RuntimeError::NotSnapshottable {
            name: name.to_string(),
            reason: format!(
                "parent image {} is not the state its write tracking follows (that of its last snapshot, {}): take a full snapshot",
                parent.display(),
                armed.image.display()
            ),
        });
    }
    Ok(image)
}

/// What a supervisor knows of its instance, for a snapshot of it.
pub struct Subject<'a> {
    pub run_dir: &'a Path,
    pub name: &'a str,
    pub aid: &'a str,
    pub command: &'a [String],
    pub multiplexed: &'a [u16],
    /// The application process.
    pub app: u32,
    /// The namespace init, whose descendants are the instance's processes.
    pub init_pid: u32,
    /// The namespace init: killing it stops the instance.
    pub init: &'a OwnedFd,
}

/// Dumps the instance into `output` and releases or stops it; returns the
/// summary `appshot snapshot` prints. Runs in the supervisor, on the
/// calling thread alone (every ptrace request must come from the thread
/// that seized). `status` says `frozen` while the instance is stopped by it.
/// Until the image is in place, a `requester` that went away abandons the
/// dump: the instance is released exactly as it was and the temporary
/// removed; after that, a stopping snapshot completes without it.
///
/// `armed` is the write tracking the last snapshot kept on the instance:
/// an incremental snapshot (`parent`) takes it over, any other ends it.
/// The tracking stays armed afterwards, for this image, only after a
/// snapshot left running with `track` or `parent`; a failed or abandoned
/// snapshot ends it (the instance is left untracked).
pub fn take(
    subject: &Subject,
    output: &Path,
    options: SnapshotOptions,
    requester: &Peer,
    status: &super::status::Status,
    armed: &mut Option<Armed>,
) -> Result<Taken, RuntimeError> {
    let SnapshotOptions {
        leave_running,
        pre_copy,
        template,
        external_unix_close,
        parent,
        track,
        durability,
    } = options;
    // Refused before anything is touched; the tracking stays as it was.
    let parent = match &parent {
        Some(path) => {
            let same = std::fs::canonicalize(path)
                .ok()
                .is_some_and(|p| std::fs::canonicalize(output).ok() == Some(p));
            if same {
                return Err(RuntimeError::NotSnapshottable {
                    name: subject.name.to_string(),
                    reason: format!("{} would replace its own parent image", output.display()),
                });
            }
            Some(open_parent(subject.name, path, armed.as_ref())?)
        }
        None => None,
    };
    // Any other snapshot ends the tracking here, before a pre-copy
    // registers the instance's memory anew.
    let base = armed.take().filter(|_| parent.is_some());
    let keep_tracking = leave_running && (track || parent.is_some());
    let name = subject.name;
    let app = subject.app;
    // Every process of the instance but its namespace init, parents first;
    // an exited one not yet reaped has nothing to copy (the freeze decides
    // about it).
    let procs: Vec<u32> = tree::descendants(subject.init_pid)
        .into_iter()
        .skip(1)
        .filter(|&pid| !is_zombie(pid))
        .collect();
    if procs.is_empty() {
        return Err(RuntimeError::NotSnapshottable {
            name: name.to_string(),
            reason: "it has no process left".into(),
        });
    }
    let state = Registry::open(subject.run_dir)?.read()?;
    let virtualize_as = |protocol: Protocol, addr: SocketAddr| {
        let mut a = addr;
        if let Some(v) = state.virtual_port_of(protocol, addr.ip(), addr.port()) {
            a.set_port(v);
        }
        a
    };
    let virtualize = |addr| virtualize_as(Protocol::Tcp, addr);
    let virtualize_udp = |addr| virtualize_as(Protocol::Udp, addr);
    let repairs = Repairs::default();
    let progress = |done: u64, total: u64| requester.progress(done, total);
    let cancelled = || requester.gone();
    let writer = format!("appshot {}", crate::VERSION);
    let req = DumpRequest {
        writer: &writer,
        instance: InstanceInfo {
            name: name.to_string(),
            aid: subject.aid.to_string(),
            command: subject.command.to_vec(),
            multiplexed: subject.multiplexed.to_vec(),
            template,
            left_running: leave_running,
        },
        virtualize: &virtualize,
        virtualize_udp: &virtualize_udp,
        repairs: &repairs,
        progress: &progress,
        cancelled: &cancelled,
        external_unix_close,
        parent: parent.as_ref().map(|p| p.as_parent_of(output)),
    };
    // A requester gone before anything was touched: nothing to undo.
    if requester.gone() {
        return Err(SnapshotError::Cancelled { pid: app }.into());
    }
    let pending = Pending::begin(subject.run_dir, &temporary_path(output)?)?;
    let mut writer = ImageWriter::create(output, durability)?;

    let started = Instant::now();
    // Memory is copied while the instance runs on; its write tracking ends
    // (and the pages lose their protection) when `tracking` is dropped,
    // after the instance runs again.
    let mut tracking = None;
    let hooks = Hooks {
        progress: &progress,
        cancelled: &cancelled,
    };
    if let (Some(parent), Some(base)) = (&parent, base) {
        // Incremental: what was written since the parent is copied while
        // the instance runs, and again what is written meanwhile; the
        // rest is referred to in the parent.
        let mut t = base.tracking;
        t.base_on(parent);
        let copied = if leave_running || pre_copy {
            appshot_snapshot::kinds::tree::check_states(&procs)
                .and_then(|()| t.track_new(&procs))
                .and_then(|()| t.converge(&mut writer, &hooks, u64::MAX))
        } else {
            Ok(())
        };
        if let Err(e) = copied {
            writer.abandon();
            return Err(e.into());
        }
        tracking = Some(t);
    } else if leave_running || pre_copy {
        // Refusals first, before any process is touched.
        if let Err(e) = appshot_snapshot::kinds::tree::check_states(&procs) {
            writer.abandon();
            return Err(e.into());
        }
        match precopy(&procs, &mut writer, &hooks) {
            Ok(t) => tracking = Some(t),
            Err(e) => {
                writer.abandon();
                return Err(e.into());
            }
        }
    }
    let precopied_bytes = tracking.as_ref().map_or(0, |t| t.copied_bytes);
    let options_parent = parent.as_ref().map(|p| p.path.clone());
    let freezing = Instant::now();
    // All frozen before any is read: a process running on could change
    // what another shares with it.
    let frozen = match freeze_tree(subject.init_pid) {
        Ok(f) => f,
        Err(e) => {
            writer.abandon();
            return Err(e);
        }
    };
    status.set_frozen(true);
    debug!(
        ms = freezing.elapsed().as_secs_f64() * 1e3,
        "snapshot: frozen"
    );
    // Before any connection is read: no packet of theirs gets in or out
    // until the instance runs on, or its restore rebuilds them.
    let lock = match Lock::take(
        subject.run_dir,
        name,
        subject.init_pid,
        &netlock::connections(subject.init_pid),
    ) {
        Ok(lock) => lock,
        Err(e) => {
            drop(frozen);
            status.set_frozen(false);
            writer.abandon();
            return Err(RuntimeError::NotSnapshottable {
                name: name.to_string(),
                reason: format!(
                    "its connections cannot be locked: {}",
                    crate::error::chain(&e)
                ),
            });
        }
    };
    debug!(
        ms = freezing.elapsed().as_secs_f64() * 1e3,
        "snapshot: connections locked"
    );
    let manifest = match dump(&frozen, &req, &mut writer, tracking.as_mut()) {
        Ok(manifest) => manifest,
        Err(e) => {
            // The connections go on; dropping `frozen` releases every
            // thread as it was, then the lock goes.
            repairs.resume();
            drop(frozen);
            drop(lock);
            status.set_frozen(false);
            writer.abandon();
            return Err(e.into());
        }
    };
    let pages_bytes = manifest.pages_bytes();
    let frozen_for;
    let image_bytes;
    let after = if leave_running {
        // Everything is copied: the instance runs on before the image is
        // finished (manifest, fsync with --sync, rename).
        repairs.resume();
        for f in frozen {
            f.release();
        }
        frozen_for = freezing.elapsed();
        status.set_frozen(false);
        drop(lock);
        if !keep_tracking {
            drop(tracking.take());
        }
        image_bytes = finish(writer, &manifest, requester, app)?;
        if let Some(tracking) = tracking {
            *armed = Some(Armed {
                tracking,
                id: manifest.id,
                image: output.to_path_buf(),
                identity: std::fs::metadata(output).ok().map(|m| FileIdentity::of(&m)),
            });
        }
        "left running"
    } else {
        // A stopping snapshot is complete only once its image is in place
        // (on disk too with --sync): until then the instance stays frozen,
        // to be released as it was if writing fails or the requester goes
        // away.
        match finish(writer, &manifest, requester, app) {
            Ok(bytes) => image_bytes = bytes,
            Err(e) => {
                repairs.resume();
                drop(frozen);
                drop(lock);
                status.set_frozen(false);
                return Err(e);
            }
        }
        drop(pending);
        // Killed while still frozen: the instance never runs past the
        // snapshot. Killing the namespace init takes every process with it.
        frozen_for = freezing.elapsed();
        let mut kill_init = Some(|| {
            let _ = pidfd::send_signal(subject.init, libc::SIGKILL);
        });
        // Children first: a parent is reported dead only after them.
        for f in frozen.into_iter().rev() {
            f.kill(|| {
                if let Some(k) = kill_init.take() {
                    k()
                }
            });
        }
        drop(tracking);
        // The last references to the connections, still in repair mode:
        // closed without a packet. Their peers wait, locked, for the
        // restore (a template's copies can never own them).
        drop(repairs);
        if let Some(lock) = lock.filter(|_| !template) {
            lock.hold_for(output);
        }
        "stopped"
    };
    info!(name, image = %output.display(), after, "snapshot taken");
    Ok(Taken {
        instance: name.to_string(),
        aid: subject.aid.to_string(),
        image: output.to_path_buf(),
        pages_bytes,
        size_bytes: image_bytes,
        time_ms: started.elapsed().as_millis() as u64,
        frozen_ms: frozen_for.as_millis() as u64,
        precopied_bytes,
        left_running: leave_running,
        template,
        parent: options_parent,
        tracked: armed.is_some(),
    })
}

/// Writes the manifest and moves the image into place, unless the
/// requester went away first (then the temporary is removed).
/// Whether process `pid` exited and was not reaped yet.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(") ")?;
            rest.chars().next()
        })
        .is_some_and(|state| matches!(state, 'Z' | 'X'))
}

/// How often [`freeze_tree`] starts over when it stopped a process whose
/// exited child its parent had not reaped yet.
const FREEZE_ATTEMPTS: u32 = 50;
/// How often one attempt lists the tree again for processes forked before
/// their parent was stopped.
const FREEZE_ROUNDS: u32 = 100;

/// Stops every process of the instance below its init, parents first, as
/// it is now rather than as it was listed: the tree is listed again after
/// each round of seizing until a round finds no process it has not
/// stopped (one forked before its parent stopped is caught by the next
/// round; one that exited before it was seized is left out). A process
/// that exited and was not reaped (a zombie, which a restore could not
/// rebuild) is usually about to be: every process is released and the
/// attempt starts over; one that stays is refused, as is a process
/// stopped by a signal.
fn freeze_tree(init_pid: u32) -> Result<Vec<Frozen>, RuntimeError> {
    let mut last_zombie = None;
    for attempt in 0..FREEZE_ATTEMPTS {
        let mut frozen: Vec<Frozen> = Vec::new();
        let mut listed = Vec::new();
        let mut stable = false;
        for _ in 0..FREEZE_ROUNDS {
            listed = tree::descendants(init_pid).into_iter().skip(1).collect();
            let new: Vec<u32> = listed
                .iter()
                .copied()
                .filter(|&pid| !frozen.iter().any(|f| f.pid == pid) && !is_zombie(pid))
                .collect();
            if new.is_empty() {
                stable = true;
                break;
            }
            appshot_snapshot::kinds::tree::check_states(&new)?;
            for pid in new {
                match Frozen::seize(pid, Options::empty()) {
                    Ok(f) => frozen.push(f),
                    Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => {
                        debug!(pid, "exited before it was stopped: not saved");
                    }
                    // Exited meanwhile: the check after the last round
                    // starts over.
                    Err(_) if is_zombie(pid) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if !stable {
            return Err(RuntimeError::NotSnapshottable {
                name: format!("init {init_pid}"),
                reason: format!(
                    "its processes kept forking through {FREEZE_ROUNDS} rounds of stopping them"
                ),
            });
        }
        if let Some(&zombie) = listed.iter().find(|&&pid| is_zombie(pid)) {
            debug!(
                zombie,
                attempt, "an exited process not reaped yet: starting over"
            );
            last_zombie = Some(zombie);
            drop(frozen);
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        if frozen.is_empty() {
            return Err(SnapshotError::NoProcess.into());
        }
        // Parents first, as listed.
        frozen.sort_by_key(|f| listed.iter().position(|&p| p == f.pid));
        return Ok(frozen);
    }
    let zombie = last_zombie.expect("only a zombie starts an attempt over");
    Err(SnapshotError::Unsupported {
        pid: zombie,
        what: format!(
            "process {zombie} is a zombie (exited, not reaped by its parent) through {FREEZE_ATTEMPTS} attempts to stop the instance"
        ),
    }
    .into())
}

fn finish(
    writer: ImageWriter,
    manifest: &Manifest,
    requester: &Peer,
    app: u32,
) -> Result<u64, RuntimeError> {
    if requester.gone() {
        writer.abandon();
        return Err(SnapshotError::Cancelled { pid: app }.into());
    }
    Ok(writer.finish(manifest)?)
}

/// What a snapshot did: `appshot snapshot --json`, in the vocabulary of
/// `inspect --json` (memory saved is the image's `pages_bytes`, its file
/// size `size_bytes`; durations in milliseconds end `_ms`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Taken {
    pub instance: String,
    pub aid: String,
    pub image: PathBuf,
    /// Memory saved.
    pub pages_bytes: u64,
    /// The image file.
    pub size_bytes: u64,
    /// The whole dump.
    pub time_ms: u64,
    /// How long the instance was stopped by it.
    pub frozen_ms: u64,
    /// Memory copied while the instance ran (pre-copy), pages written
    /// meanwhile counted each time they were copied.
    #[serde(default)]
    pub precopied_bytes: u64,
    /// Whether the instance runs on (`--leave-running`) or was stopped.
    pub left_running: bool,
    pub template: bool,
    /// The parent of an incremental snapshot.
    #[serde(default)]
    pub parent: Option<PathBuf>,
    /// Whether writes are tracked on for an incremental snapshot on this
    /// one.
    #[serde(default)]
    pub tracked: bool,
}

impl Taken {
    /// The line `appshot snapshot` prints.
    pub fn summary(&self) -> String {
        format!(
            "snapshot of {} written to {}{}: {} of memory, image {}, {} ms (frozen {} ms); instance {}",
            self.instance,
            self.image.display(),
            self.parent
                .as_ref()
                .map(|p| format!(" (incremental on {})", p.display()))
                .unwrap_or_default(),
            mib(self.pages_bytes),
            mib(self.size_bytes),
            self.time_ms,
            self.frozen_ms,
            if self.left_running { "left running" } else { "stopped" }
        )
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// `appshot merge`: the chain of `image` as one whole image at `output`.
pub fn merge(image: &Path, output: &Path, durability: Durability) -> Result<String, RuntimeError> {
    let started = Instant::now();
    let chain = Image::open(image)?;
    let size = chain.merge(output, durability)?;
    Ok(format!(
        "{} and its {} parent image(s) merged into {}: image {}, {} ms",
        image.display(),
        chain.ancestors.len(),
        output.display(),
        mib(size),
        started.elapsed().as_millis()
    ))
}

#[derive(Serialize)]
struct Summary {
    path: String,
    size_bytes: u64,
    pages_bytes: u64,
    /// The state the image holds (hex).
    id: String,
    /// Of `pages_bytes`, those in this image's own file; the rest is in
    /// its parents.
    own_pages_bytes: u64,
    /// An incremental image's chain of parents, nearest first.
    parents: Vec<ParentSummary>,
    instance: String,
    aid: String,
    command: Vec<String>,
    created_unix: u64,
    /// What wrote the image: `appshot VERSION (commit C)`.
    writer: String,
    /// Taken with `--template`: `appshot clone` accepts it.
    template: bool,
    pid: u32,
    exe: String,
    cwd: String,
    threads: Vec<ThreadSummary>,
    mappings: Vec<MappingSummary>,
    fds: Vec<FdSummary>,
    listening: Vec<String>,
    /// Every process of the tree; the fields above are of the first.
    processes: Vec<ProcessSummary>,
}

#[derive(Serialize)]
struct ParentSummary {
    path: String,
    id: String,
    size_bytes: u64,
    created_unix: u64,
}

#[derive(Serialize)]
struct ProcessSummary {
    pid: u32,
    ppid: u32,
    pgid: u32,
    sid: u32,
    exe: String,
    threads: usize,
    fds: usize,
    inherited_fds: usize,
    shared_fds: usize,
    saved_bytes: u64,
    /// Pages still shared copy-on-write with the parent: not saved.
    cow_bytes: u64,
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

/// What an image holds. The text summarises; `mappings` lists every
/// mapping too. The JSON is always complete.
pub fn inspect(path: &Path, json: bool, mappings: bool) -> Result<String, RuntimeError> {
    let image = Image::open(path)?;
    let m = &image.manifest;
    let p = m.main();
    let summary = Summary {
        processes: m
            .processes
            .iter()
            .map(|q| ProcessSummary {
                pid: q.ns_pid,
                ppid: q.ns_ppid,
                pgid: q.ns_pgid,
                sid: q.ns_sid,
                exe: q.exe.path.clone(),
                threads: q.threads.len(),
                fds: q.fds.len(),
                inherited_fds: q.inherited.len(),
                shared_fds: q.fetched.len(),
                saved_bytes: q.pages_bytes,
                cow_bytes: q.vmas.iter().flat_map(|v| &v.cow).map(|r| r.1 * PAGE).sum(),
            })
            .collect(),
        path: path.display().to_string(),
        size_bytes: image.size,
        pages_bytes: m.pages_bytes(),
        id: format!("{:032x}", m.id),
        own_pages_bytes: m.pages_bytes()
            - m.processes
                .iter()
                .flat_map(|p| &p.vmas)
                .flat_map(|v| &v.pages)
                .filter(|r| r.layer > 0)
                .map(|r| r.pages * PAGE)
                .sum::<u64>(),
        parents: image
            .ancestors
            .iter()
            .map(|a| ParentSummary {
                path: a.path.display().to_string(),
                id: format!("{:032x}", a.manifest.id),
                size_bytes: a.size,
                created_unix: a.manifest.created_unix,
            })
            .collect(),
        instance: m.instance.name.clone(),
        aid: m.instance.aid.clone(),
        command: m.instance.command.clone(),
        created_unix: m.created_unix,
        writer: m.writer.clone(),
        template: m.instance.template,
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
                    VmaKind::SharedAnon { inode } => format!("shared anonymous {inode}"),
                    VmaKind::Memfd { inode, offset } => {
                        format!("memfd {} at offset {offset}", memfd_name(m, *inode))
                    }
                    VmaKind::Vdso(n) => n.clone(),
                    VmaKind::Vsyscall => "[vsyscall]".into(),
                    VmaKind::SysvShm { id } => format!("System V shm segment {id}"),
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
                    FdKind::Udp(u) => match &u.peer {
                        Some(peer) => format!("udp {} -> {peer}", u.addr),
                        None => format!("udp {}", u.addr),
                    },
                    FdKind::TcpConn(c) => {
                        format!(
                        "tcp {} {} -> {} (real {} -> {}), {} bytes to send ({} unsent), {} unread",
                        match c.state {
                            1 => "established",
                            5 => "half-closed (shut for writing)",
                            8 => "half-closed (peer shut)",
                            _ => "closing",
                        },
                        c.local_virtual,
                        c.peer_virtual,
                        c.local,
                        c.peer,
                        c.send.len(),
                        c.unsent,
                        c.recv.len()
                    )
                    }
                    FdKind::Epoll { targets, .. } => format!("epoll, {} fds", targets.len()),
                    FdKind::EventFd { count, .. } => format!("eventfd = {count}"),
                    FdKind::Dup { of } => format!("same open file as fd {of}"),
                    FdKind::Unix(u) => appshot_snapshot::kinds::unix::describe(u),
                    FdKind::Fifo { file, data, .. } => {
                        format!("FIFO {}, {} bytes unread", file.path, data.len())
                    }
                    FdKind::Memfd { inode, pos, .. } => {
                        format!("memfd {} at offset {pos}", memfd_name(m, *inode))
                    }
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
        listening: m
            .processes
            .iter()
            .flat_map(|q| q.listening())
            .map(String::from)
            .collect(),
    };
    if json {
        return Ok(serde_json::to_string_pretty(&summary).expect("serialisable") + "\n");
    }
    let mut out = format!(
        "image      {} ({}, {} of pages)\ntaken      {}{}\nwritten by {}\ninstance   {} (AID {})\ncommand    {}\nprocess    pid {} {}\ncwd        {}\nlistening  {}\n",
        summary.path,
        mib(summary.size_bytes),
        mib(summary.pages_bytes),
        crate::supervisor::logs::utc(summary.created_unix),
        if summary.template { ", a template for `appshot clone`" } else { "" },
        summary.writer,
        summary.instance,
        summary.aid,
        summary.command.join(" "),
        summary.pid,
        summary.exe,
        summary.cwd,
        if summary.listening.is_empty() { "-".into() } else { summary.listening.join(", ") },
    );
    if !summary.parents.is_empty() {
        out.push_str(&format!(
            "memory     {} in this image, the rest in its parents\n",
            mib(summary.own_pages_bytes)
        ));
    }
    for (i, a) in summary.parents.iter().enumerate() {
        out.push_str(&format!(
            "{} {} ({}, taken {})\n",
            if i == 0 { "parent    " } else { "  then    " },
            a.path,
            mib(a.size_bytes),
            crate::supervisor::logs::utc(a.created_unix)
        ));
    }
    out.push_str(&format!("processes  {}\n", summary.processes.len()));
    for q in &summary.processes {
        out.push_str(&format!(
            "  {:>7}  ppid {} pgid {} sid {}  {}  {} threads, {} fds (+{} inherited, +{} shared), {} saved, {} shared with parent\n",
            q.pid,
            q.ppid,
            q.pgid,
            q.sid,
            q.exe,
            q.threads,
            q.fds,
            q.inherited_fds,
            q.shared_fds,
            mib(q.saved_bytes),
            mib(q.cow_bytes)
        ));
    }
    out.push_str(&format!("threads    {}\n", summary.threads.len()));
    for t in &summary.threads {
        out.push_str(&format!("  {:>7}  {}\n", t.tid, t.name));
    }
    out.push_str(&format!(
        "mappings   {}{}\n",
        summary.mappings.len(),
        if mappings {
            ""
        } else {
            " (listed with --mappings)"
        }
    ));
    for v in summary.mappings.iter().filter(|_| mappings) {
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

fn memfd_name(m: &appshot_snapshot::image::Manifest, inode: u64) -> &str {
    m.memfds
        .iter()
        .find(|o| o.inode == inode)
        .map_or("?", |o| o.name.as_str())
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
