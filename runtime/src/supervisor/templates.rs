//! Resident templates: for each template image that clones were made of,
//! one holder process (see `appshot_snapshot::holder`) that clones are
//! forked from. Its state lives in `<run dir>/templates/<name>/`: a lock
//! (flock) that serialises building it and forking from it (a holder has
//! one tracer at a time, and its scratch page is shared by every fork in
//! progress), and a `holder` file naming the process (PID and start time,
//! so a reused PID is never taken for it), its scratch mapping, the image
//! it holds (path and file identity: a rewritten image gets a new holder)
//! and how many clones were started from it.

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appshot_snapshot::holder::{self, Holder};
use appshot_snapshot::image::Image;
use appshot_sys::pidfd;
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use crate::error::{FileOp, RuntimeError};

const HOLDER_FILE: &str = "holder";

/// A template's holder, locked: forks from it are the caller's alone until
/// it is dropped.
pub struct Lease {
    dir: PathBuf,
    state: State,
    _lock: Flock<File>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    pid: u32,
    start: u64,
    scratch: u64,
    image: PathBuf,
    identity: String,
    clones: u64,
    /// See [`Holder::carries_state`]; absent (false) in the file of a
    /// holder started by an appshot from before.
    carries_state: bool,
}

impl State {
    fn parse(text: &str) -> Option<State> {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        };
        Some(State {
            pid: field("pid")?.parse().ok()?,
            start: field("start")?.parse().ok()?,
            scratch: u64::from_str_radix(field("scratch")?.trim_start_matches("0x"), 16).ok()?,
            image: PathBuf::from(field("image")?),
            identity: field("identity")?.to_string(),
            clones: field("clones")?.parse().ok()?,
            carries_state: field("carries_state") == Some("1"),
        })
    }

    fn text(&self) -> String {
        format!(
            "pid={}\nstart={}\nscratch={:#x}\nimage={}\nidentity={}\nclones={}\ncarries_state={}\n",
            self.pid,
            self.start,
            self.scratch,
            self.image.display(),
            self.identity,
            self.clones,
            u8::from(self.carries_state)
        )
    }

    /// The holder runs: its PID is the process that was started then.
    fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start)
    }
}

impl Lease {
    pub fn holder(&self) -> Holder {
        Holder {
            pid: self.state.pid,
            scratch: self.state.scratch,
            carries_state: self.state.carries_state,
        }
    }

    /// Counts a clone forked from the holder (`appshot templates` shows
    /// the count; a count that could not be written is only logged).
    pub fn clone_started(&mut self) {
        self.state.clones += 1;
        if let Err(e) = write_state(&self.dir, &self.state) {
            warn!("counting a clone: {e}");
        }
    }
}

pub(crate) fn templates_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("templates")
}

/// A template's name: its image's file name, with any character other
/// than letters, digits, `.`, `_` and `-` made `_`.
pub fn name_of(image: &Path) -> String {
    image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "template".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What identifies the image file's contents: any write changes its ctime,
/// which no user can set back.
pub(crate) fn identity(path: &Path) -> Result<String, RuntimeError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| RuntimeError::sys(format!("image {}", path.display()), e))?;
    Ok(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

/// The start time of process `pid` (clock ticks since boot), which tells a
/// process from a later one with its PID; `None` once it has ended (a
/// zombie whose parent, such as a subreaper, has not reaped it yet).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    let mut fields = rest.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    // Field 22 of stat; `fields` is at field 4 now.
    fields.nth(18)?.parse().ok()
}

/// Takes `dir/lock` exclusively, waiting for it.
pub(super) fn lock(dir: &Path) -> Result<Flock<File>, RuntimeError> {
    let path = dir.join("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RuntimeError::file(FileOp::Open, &path, e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| RuntimeError::file(FileOp::Lock, &path, e))
}

fn read_state(dir: &Path) -> Option<State> {
    State::parse(&std::fs::read_to_string(dir.join(HOLDER_FILE)).ok()?)
}

fn write_state(dir: &Path, state: &State) -> Result<(), RuntimeError> {
    let tmp = dir.join(format!("{HOLDER_FILE}.tmp"));
    let path = dir.join(HOLDER_FILE);
    std::fs::write(&tmp, state.text())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| RuntimeError::file(FileOp::Write, &path, e))
}

/// The holder of the template `image` (at `path`, canonical), locked;
/// started first if none runs for this very image file: the first clone
/// pays the restore of its memory.
pub fn lease(run_dir: &Path, path: &Path, image: &Image) -> Result<Lease, RuntimeError> {
    let name = name_of(path);
    let dir = templates_dir(run_dir).join(&name);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| RuntimeError::file(FileOp::Create, &dir, e))?;
    let held = lock(&dir)?;
    let identity = identity(path)?;
    if let Some(state) = read_state(&dir) {
        if state.image != path && state.alive() {
            return Err(RuntimeError::TemplateName {
                name,
                image: state.image,
            });
        }
        if state.identity == identity && state.alive() {
            return Ok(Lease {
                dir,
                state,
                _lock: held,
            });
        }
        // A holder of what the file held before it was rewritten.
        kill(&state)?;
    }
    let started = Instant::now();
    let stub = appshot_sys::spawn::spawn_orphan()
        .map_err(|e| RuntimeError::sys("starting a template holder", e))?;
    let start = start_time(stub).ok_or_else(|| {
        RuntimeError::sys(
            format!("reading the start time of template holder {stub}"),
            std::io::ErrorKind::NotFound,
        )
    })?;
    let built = holder::build_holder(stub, image).inspect_err(|_| {
        // Killed already unless it could not even be seized.
        if let Ok(fd) = pidfd::open_process(stub) {
            let _ = pidfd::send_signal(&fd, libc::SIGKILL);
        }
    })?;
    let state = State {
        pid: built.pid,
        start,
        scratch: built.scratch,
        image: path.to_path_buf(),
        identity,
        clones: 0,
        carries_state: built.carries_state,
    };
    write_state(&dir, &state)?;
    info!(template = %name, pid = stub, ms = started.elapsed().as_secs_f64() * 1e3, "template holder started");
    Ok(Lease {
        dir,
        state,
        _lock: held,
    })
}

/// Ends a holder, if it still runs, and waits until it is gone.
fn kill(state: &State) -> Result<(), RuntimeError> {
    let Ok(fd) = pidfd::open_process(state.pid) else {
        return Ok(());
    };
    // The pidfd names the process found now; its start time says it is
    // the holder, not a later process with its PID.
    if !state.alive() {
        return Ok(());
    }
    pidfd::send_signal(&fd, libc::SIGKILL)
        .map_err(|e| RuntimeError::sys(format!("killing template holder {}", state.pid), e))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// `appshot template rm NAME`: ends the holder and the instance shells
/// ready for its clones (its clones run on: their memory is their own,
/// shared copy-on-write) and forgets the template.
pub fn remove(run_dir: &Path, name: &str) -> Result<(), RuntimeError> {
    let dir = templates_dir(run_dir).join(name);
    if name.contains('/') || !dir.is_dir() {
        return Err(RuntimeError::NoTemplate(name.to_string()));
    }
    super::pool::remove(&dir);
    let _held = lock(&dir)?;
    if let Some(state) = read_state(&dir) {
        kill(&state)?;
    }
    std::fs::remove_dir_all(&dir).map_err(|e| RuntimeError::file(FileOp::Remove, &dir, e))
}

/// RSS and PSS of a process, in KiB.
fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// A template with a running holder, as `appshot templates` lists it.
pub struct Listed {
    pub name: String,
    pub image: PathBuf,
    pub pid: u32,
    /// RSS and PSS of the holder, KiB.
    pub rss_kib: u64,
    pub pss_kib: u64,
    /// Clones started from it.
    pub clones: u64,
    /// Instance shells ready for its next clones, and how many it keeps.
    pub shells: usize,
    pub pool_size: u32,
}

/// Every template with a running holder, by name.
pub fn listed(run_dir: &Path) -> Vec<Listed> {
    let mut names: Vec<String> = match std::fs::read_dir(templates_dir(run_dir)) {
        Ok(dir) => dir
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            let state = read_state(&templates_dir(run_dir).join(&name))?;
            if !state.alive() {
                return None;
            }
            let (rss_kib, pss_kib) = memory_of(state.pid).unwrap_or((0, 0));
            let shells = super::pool::ready(run_dir, &state.image);
            let pool_size = super::pool::size(run_dir, &state.image);
            Some(Listed {
                shells,
                pool_size,
                name,
                image: state.image,
                pid: state.pid,
                rss_kib,
                pss_kib,
                clones: state.clones,
            })
        })
        .collect()
}

/// The CLONE_NEW* flags of the namespaces (mount, IPC, UTS, network,
/// cgroup) in which process `a` differs from process `b`.
pub fn namespaces_apart(a: u32, b: u32) -> u64 {
    let kinds = [
        ("mnt", libc::CLONE_NEWNS),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("cgroup", libc::CLONE_NEWCGROUP),
    ];
    let link = |pid: u32, ns: &str| std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
    kinds
        .iter()
        .filter(|(ns, _)| link(a, ns) != link(b, ns))
        .fold(0, |flags, (_, flag)| flags | *flag as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_state_reads_back_what_was_written() {
        let state = State {
            pid: 4242,
            start: 123456,
            scratch: 0x7000_0000_0000,
            image: PathBuf::from("/var/lib/t/redis.img"),
            identity: "1:2:3:4.5:6.7".into(),
            clones: 9,
            carries_state: true,
        };
        assert_eq!(State::parse(&state.text()), Some(state.clone()));
        assert_eq!(State::parse("pid=1\n"), None);
        // A holder's file from before holders carried the image's signal
        // actions and limits: its clones must set them all.
        let old: String = state
            .text()
            .lines()
            .filter(|l| !l.starts_with("carries_state="))
            .map(|l| format!("{l}\n"))
            .collect();
        let read = State::parse(&old).expect("an older holder's file");
        assert!(!read.carries_state);
        assert_eq!(read.clones, 9);
    }

    #[test]
    fn names_come_from_the_image_file() {
        assert_eq!(name_of(Path::new("/a/redis tmpl.img")), "redis_tmpl.img");
        assert_eq!(name_of(Path::new("/a/web-1.img")), "web-1.img");
    }

    #[test]
    fn our_own_start_time_is_read() {
        assert!(start_time(std::process::id()).is_some());
        assert_eq!(namespaces_apart(std::process::id(), std::process::id()), 0);
    }
}
