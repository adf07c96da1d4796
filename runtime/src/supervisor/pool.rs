//! Instance shells: supervisors started ahead of the clones of a template,
//! each with its namespace init already running in fresh PID, mount, IPC
//! and UTS namespaces with a `/proc` of its own, waiting for a clone to
//! claim it. Measured by hand (see `bench/RESULTS.md`): the exec of the
//! supervisor and of its namespace init, and the making of their
//! namespaces, were most of a clone's start (7–26 ms of init alone on a
//! 2-CPU machine); a shell has done all of that before anyone asks.
//!
//! `appshot clone` claims a shell by connecting to its socket in
//! `<run dir>/templates/<name>/shells/<pid>-<start>.sock` and sending the
//! clone's `Launch`; the shell says `claimed`, removes its socket (a
//! shell is claimed once), and from then on is the clone's supervisor:
//! the instance's lock, registry record, cgroup, identity (hostname,
//! identity file) and logs are made for the clone as for any, then the
//! clone is forked from the template's holder into the shell's namespaces.
//! It answers `running` (or nothing, having failed) on the connection, as
//! a detached supervisor does on its stdout. The CLI then starts shells
//! until the pool has its size again; a shell whose init died removes its
//! socket and ends, and one whose supervisor died leaves a socket nobody
//! listens on, which the next claim removes.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use appshot_snapshot::holder;
use appshot_snapshot::image::Image;
use appshot_sys::pidfd;
use appshot_vpm::Registry;
use nix::errno::Errno;
use nix::fcntl::Flock;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::templates;
use super::{spawn_awaiting_init, AwaitingInit, Launch, Mode};
use crate::error::RuntimeError;

/// Shells kept ready per template unless `appshot clone --pool N` says
/// otherwise: one for the next clone and one for the one after, while the
/// first is replaced.
pub const DEFAULT_SIZE: u32 = 2;

const SIZE_FILE: &str = "pool-size";
const SOCKET: &str = "sock";
/// A shell started by a CLI that has not bound its socket yet.
const STARTING: &str = "starting";

/// How long a claiming CLI waits for the shell's word.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// A claimed shell, as its supervisor continues with it: the namespace
/// init awaiting the clone, and the template image opened.
pub struct Shell {
    pub init: AwaitingInit,
    image: Option<Image>,
    /// The seccomp filter the clone gets, built ahead.
    pub filter: Option<Vec<appshot_sys::seccomp::SockFilter>>,
    /// The registry of the run directory the shell was started for.
    registry: Option<(PathBuf, Registry)>,
    /// The image file's identity when it was opened: a rewritten image is
    /// opened again at the claim.
    identity: String,
}

impl Shell {
    /// The registry opened ahead, if it is `run_dir`'s.
    pub fn take_registry(&mut self, run_dir: &Path) -> Option<Registry> {
        let (dir, registry) = self.registry.take()?;
        (dir == run_dir).then_some(registry)
    }

    /// The registry opened ahead, if it is `run_dir`'s, left in place.
    pub fn registry(&self, run_dir: &Path) -> Option<&Registry> {
        self.registry
            .as_ref()
            .filter(|(dir, _)| dir == run_dir)
            .map(|(_, registry)| registry)
    }

    /// The opened image, if the file at `path` is still the one that was
    /// opened.
    pub fn take_image(&mut self, path: &Path) -> Option<Image> {
        let current = templates::identity(path).ok()?;
        let image = self.image.take()?;
        (current == self.identity && image.path == path).then_some(image)
    }

    /// Completes a launch its starter made without opening the template
    /// (see [`Unopened`]) from the image this shell holds: the template's
    /// command, multiplexed ports and listening sockets (whose real ports
    /// the supervisor counts as it takes the clone's name). Refused, so
    /// that the starter opens the template itself and says what is wrong,
    /// when the image file was rewritten since this shell opened it or the
    /// files it maps changed.
    fn complete(&self, launch: &mut Launch, template: &Path) -> Result<(), String> {
        let image = self
            .image
            .as_ref()
            .filter(|i| i.path == template)
            .ok_or("no image held")?;
        match templates::identity(template) {
            Ok(current) if current == self.identity => {}
            _ => {
                return Err(format!(
                    "{} changed since the shell opened it",
                    template.display()
                ))
            }
        }
        appshot_snapshot::restore::check_files(image).map_err(|e| e.to_string())?;
        let info = &image.manifest.instance;
        launch.command = info.command.clone();
        launch.ports = info.multiplexed.clone();
        launch.free_ports = image
            .manifest
            .processes
            .iter()
            .map(|p| p.listening().count())
            .sum();
        Ok(())
    }
}

/// A claim whose launch its starter made without opening the template (a
/// single detached clone: the CLI's start is on the clone's path, and the
/// shell holds the image already), with no command or ports: the shell
/// completes it ([`Shell::complete`]) and makes its log directory. Sent
/// wrapped, so that a shell of an earlier appshot, which would take it for
/// a whole launch, refuses it instead.
#[derive(Serialize, Deserialize)]
struct Unopened {
    unopened: Launch,
}

/// What a claim hands the shell's supervisor.
pub struct Claimed {
    pub launch: Launch,
    pub shell: Shell,
    /// Where `running` is said, as a detached supervisor's stdout.
    pub answer: OwnedFd,
    /// The launch was completed by the shell ([`Unopened`]): the clone's
    /// log directory is the shell's to make.
    pub unopened: bool,
}

pub fn shells_dir(run_dir: &Path, template: &Path) -> PathBuf {
    templates::templates_dir(run_dir)
        .join(templates::name_of(template))
        .join("shells")
}

/// `<pid>-<start time>` of a process: names it apart from any later one
/// with its PID.
fn tag_of(pid: u32) -> Option<String> {
    Some(format!("{pid}-{}", templates::start_time(pid)?))
}

/// The process a shell file names, if it still runs.
fn live_pid(file: &Path) -> Option<u32> {
    let stem = file.file_stem()?.to_str()?;
    let (pid, start) = stem.split_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    (templates::start_time(pid)? == start.parse::<u64>().ok()?).then_some(pid)
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some(SOCKET | STARTING)
            )
        })
        .collect();
    files.sort();
    files
}

/// `appshot __shell TEMPLATE`: makes a shell for clones of `template` and
/// waits until one claims it. `None` when there is nothing to wait for:
/// the template's clones cannot be forked (they are restored, with no
/// init to start ahead), or the shell's init ended.
pub fn wait_for_claim(run_dir: &Path, template: &Path) -> Result<Option<Claimed>, RuntimeError> {
    let dir = shells_dir(run_dir, template);
    let me = tag_of(std::process::id()).unwrap_or_else(|| std::process::id().to_string());
    let starting = dir.join(format!("{me}.{STARTING}"));
    let result = prepare_and_wait(run_dir, &dir, &me, template);
    let _ = std::fs::remove_file(&starting);
    result
}

fn prepare_and_wait(
    run_dir: &Path,
    dir: &Path,
    me: &str,
    template: &Path,
) -> Result<Option<Claimed>, RuntimeError> {
    let identity = templates::identity(template)?;
    // Verified here (once per unchanged file, as `appshot clone` does): a
    // claim that leaves the template unopened relies on it.
    let image = super::snapshots::open_template(template, run_dir)?;
    appshot_snapshot::restore::check_files(&image)?;
    if !image.manifest.instance.template {
        info!(template = %template.display(), "no shells for an image that is not a template");
        return Ok(None);
    }
    if let Some(why) = holder::unforkable(&image) {
        info!(template = %template.display(), "no shells for clones that are not forked: {why}");
        return Ok(None);
    }
    let top = image
        .manifest
        .top_level()
        .next()
        .map(|p| p.ns_pid)
        .ok_or_else(|| RuntimeError::Start {
            name: templates::name_of(template),
            reason: "the template has no process".into(),
        })?;
    let nofile = super::raise_nofile_limit();
    // Its command line shows no command: it is no instance yet, and must
    // not be taken for one of the template's processes.
    let init = spawn_awaiting_init(top, &[], nofile, None)?;
    let mut word = [0u8; 16];
    match nix::unistd::read(init.channel.as_raw_fd(), &mut word) {
        Ok(n) if &word[..n] == b"shell" => {}
        _ => {
            return Err(RuntimeError::Start {
                name: templates::name_of(template),
                reason: "the shell's namespace init ended before its namespaces were made".into(),
            })
        }
    }
    let path = dir.join(format!("{me}.{SOCKET}"));
    let listener = UnixListener::bind(&path)
        .map_err(|e| RuntimeError::sys(format!("binding {}", path.display()), e))?;
    let _ = std::fs::remove_file(dir.join(format!("{me}.{STARTING}")));
    info!(socket = %path.display(), init = init.pid, "shell ready");
    // Work every claim would do first, done while nobody waits: the
    // filter built (for the default routing), the cgroup mount found, the
    // registry opened.
    let filter = Some(crate::seccomp::filter::build(
        crate::net::connroutes::Routing::default(),
    )?);
    let _ = crate::net::cgroup::root();
    // Its connections open ahead: they also keep the registry's log from
    // being deleted and made again (with fsyncs) around every claim.
    let opened = Registry::open(run_dir)?;
    opened.prepare()?;
    let registry = Some((run_dir.to_path_buf(), opened));
    let mut shell = Some(Shell {
        init,
        image: Some(image),
        filter,
        registry,
        identity,
    });
    let claimed = loop {
        let live = shell.as_ref().expect("shell until claimed");
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(live.init.pidfd.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => break Err(RuntimeError::sys("waiting for a claim", e)),
        }
        if fds[1].any().unwrap_or(false) {
            warn!(
                init = live.init.pid,
                "the shell's namespace init ended: the shell goes"
            );
            break Ok(None);
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        match take_claim(stream, template, live) {
            Ok((launch, unopened, answer)) => {
                break Ok(Some(Claimed {
                    launch,
                    shell: shell.take().expect("claimed once"),
                    answer,
                    unopened,
                }))
            }
            Err(e) => warn!("a claim refused: {e}"),
        }
    };
    // Claimed or gone: never handed out again.
    let _ = std::fs::remove_file(&path);
    claimed
}

/// Reads a claim: the clone's `Launch` from a root (or our own user's)
/// process, for this very template, completed by `shell` if its starter
/// left it [`Unopened`]. Says `claimed` to it.
fn take_claim(
    mut stream: UnixStream,
    template: &Path,
    shell: &Shell,
) -> Result<(Launch, bool, OwnedFd), RuntimeError> {
    let creds = getsockopt(&stream, PeerCredentials)
        .map_err(|e| RuntimeError::sys("reading the claimant's credentials", e))?;
    let euid = nix::unistd::geteuid().as_raw();
    if creds.uid() != 0 && creds.uid() != euid {
        return Err(RuntimeError::Start {
            name: templates::name_of(template),
            reason: format!("a claim by uid {}", creds.uid()),
        });
    }
    let io = |e| RuntimeError::sys("reading a claim", e);
    stream.set_read_timeout(Some(CLAIM_TIMEOUT)).map_err(io)?;
    let mut json = Vec::new();
    stream.read_to_end(&mut json).map_err(io)?;
    let decoded = match serde_json::from_slice::<Unopened>(&json) {
        Ok(claim) => Ok((claim.unopened, true)),
        Err(_) => serde_json::from_slice::<Launch>(&json).map(|launch| (launch, false)),
    };
    let (mut launch, unopened) =
        decoded.map_err(|e| RuntimeError::sys("decoding a claim", std::io::Error::other(e)))?;
    match &launch.mode {
        Mode::Clone { template: t } if t == template => {}
        _ => {
            return Err(RuntimeError::Start {
                name: launch.name,
                reason: format!("not a clone of {}", template.display()),
            })
        }
    }
    if unopened {
        shell
            .complete(&mut launch, template)
            .map_err(|reason| RuntimeError::Start {
                name: launch.name.clone(),
                reason,
            })?;
    }
    stream.set_read_timeout(None).map_err(io)?;
    stream
        .write_all(b"claimed\n")
        .map_err(|e| RuntimeError::sys("answering a claim", e))?;
    Ok((launch, unopened, stream.into()))
}

/// After its claim a shell is its clone's supervisor, and shows as one in
/// `ps`: `appshot __supervise`, as a supervisor started for the clone
/// (`__shell IMAGE` would have it taken for a shell still waiting). The
/// command line is rewritten where the kernel reads it from, as
/// `setproctitle` does; `PR_SET_MM_ARG_START` would need CAP_SYS_RESOURCE.
pub fn show_as_supervisor() -> std::io::Result<()> {
    let exe = std::env::args_os().next().unwrap_or_default();
    set_command_line(&[exe.as_os_str(), std::ffi::OsStr::new("__supervise")])
}

/// Replaces this process's arguments (`/proc/self/cmdline`) by `args`,
/// within the room the original ones had, the rest NUL.
fn set_command_line(args: &[&std::ffi::OsStr]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the name's closing parenthesis start with the third
    // (state); arg_start and arg_end are the 48th and 49th.
    let field = |n: usize| -> Option<u64> {
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(n - 3)?
            .parse()
            .ok()
    };
    let (Some(start), Some(end)) = (field(48), field(49)) else {
        return Err(std::io::Error::other("no argument area in /proc/self/stat"));
    };
    let mut text = Vec::new();
    for a in args {
        text.extend_from_slice(a.as_bytes());
        text.push(0);
    }
    let room = end.saturating_sub(start) as usize;
    if text.len() > room {
        return Err(std::io::Error::other(format!(
            "{} bytes of arguments where {room} fit",
            text.len()
        )));
    }
    text.resize(room, 0);
    let mem = File::options().write(true).open("/proc/self/mem")?;
    mem.write_all_at(&text, start)
}

/// A shell claimed by the CLI for `launch`: its supervisor's PID and the
/// connection its answer comes on.
pub struct Claim {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub answer: UnixStream,
}

/// Claims a ready shell of `launch`'s template for it, if one is there;
/// `unopened`: a launch made without opening the template, for the shell
/// to complete (see [`Unopened`]). Shells that are gone are removed on the
/// way.
pub fn claim(launch: &Launch, unopened: bool) -> Option<Claim> {
    let Mode::Clone { template } = &launch.mode else {
        return None;
    };
    let json = if unopened {
        serde_json::to_vec(&Unopened {
            unopened: launch.clone(),
        })
    } else {
        serde_json::to_vec(launch)
    }
    .ok()?;
    let dir = shells_dir(&launch.run_dir, template);
    for file in entries(&dir) {
        if file.extension().and_then(|e| e.to_str()) != Some(SOCKET) {
            continue;
        }
        let Some(pid) = live_pid(&file) else {
            let _ = std::fs::remove_file(&file);
            continue;
        };
        let Ok(pidfd) = pidfd::open_process(pid) else {
            continue;
        };
        let Ok(mut stream) = UnixStream::connect(&file) else {
            // Its supervisor is stopped or gone: nobody will accept.
            let _ = std::fs::remove_file(&file);
            continue;
        };
        let sent = stream
            .write_all(&json)
            .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
            .and_then(|()| stream.set_read_timeout(Some(CLAIM_TIMEOUT)));
        if sent.is_err() {
            continue;
        }
        // Another CLI may have connected first: then this connection
        // ends unanswered, and the next shell is tried.
        let mut word = [0u8; 8];
        if stream.read_exact(&mut word).is_ok() && &word == b"claimed\n" {
            let _ = stream.set_read_timeout(None);
            return Some(Claim {
                pid,
                pidfd,
                answer: stream,
            });
        }
    }
    None
}

/// The pool size of a template (`appshot clone --pool N` sets it).
pub fn size(run_dir: &Path, template: &Path) -> u32 {
    let dir = shells_dir(run_dir, template);
    std::fs::read_to_string(dir.join(SIZE_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_SIZE)
}

fn lock(dir: &Path) -> Result<Flock<File>, RuntimeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RuntimeError::sys(format!("creating {}", dir.display()), e))?;
    templates::lock(dir)
}

/// Shells of the template that are ready or starting, each once (a shell
/// that bound its socket before its starter marked it starting has both),
/// their files' stale ones removed.
fn live(dir: &Path) -> Vec<u32> {
    let pids: std::collections::BTreeSet<u32> = entries(dir)
        .into_iter()
        .filter_map(|f| match live_pid(&f) {
            Some(pid) => Some(pid),
            None => {
                let _ = std::fs::remove_file(&f);
                None
            }
        })
        .collect();
    pids.into_iter().collect()
}

/// How many shells of the template are ready to be claimed.
pub fn ready(run_dir: &Path, template: &Path) -> usize {
    entries(&shells_dir(run_dir, template))
        .iter()
        .filter(|f| f.extension().and_then(|e| e.to_str()) == Some(SOCKET))
        .filter(|f| live_pid(f).is_some())
        .count()
}

/// Starts shells of `template` until it has `size` (also recorded as the
/// template's pool size, if given) ready or starting. They run detached,
/// each in a session of its own; their logs go to `shells.log` beside
/// them until claimed.
pub fn replenish(
    run_dir: &Path,
    template: &Path,
    size: Option<u32>,
    verbose: u8,
) -> Result<(), RuntimeError> {
    let dir = shells_dir(run_dir, template);
    let _held = lock(&dir)?;
    if let Some(n) = size {
        let path = dir.join(SIZE_FILE);
        std::fs::write(&path, format!("{n}\n"))
            .map_err(|e| RuntimeError::sys(format!("writing {}", path.display()), e))?;
    }
    let wanted = size.unwrap_or_else(|| self::size(run_dir, template)) as usize;
    let have = live(&dir);
    // More than wanted (the size was lowered): the surplus goes.
    for &pid in have.iter().skip(wanted) {
        kill(pid);
    }
    let exe =
        std::env::current_exe().map_err(|e| RuntimeError::sys("locating the appshot binary", e))?;
    let log_path = dir.join("shells.log");
    for _ in have.len()..wanted {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| RuntimeError::sys(format!("opening {}", log_path.display()), e))?;
        let mut cmd = Command::new(&exe);
        if verbose > 0 {
            cmd.arg(format!("-{}", "v".repeat(verbose as usize)));
        }
        let child = cmd
            .arg("--run-dir")
            .arg(run_dir)
            .arg("__shell")
            .arg(template)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| RuntimeError::sys("starting an instance shell", e))?;
        if let Some(tag) = tag_of(child.id()) {
            let _ = std::fs::write(dir.join(format!("{tag}.{STARTING}")), b"");
        }
    }
    Ok(())
}

fn kill(pid: u32) {
    if let Ok(fd) = pidfd::open_process(pid) {
        let _ = pidfd::send_signal(&fd, libc::SIGKILL);
    }
}

/// Ends every shell of the template named `name` (their inits go with
/// them); clones claimed from them run on.
pub fn remove(template_dir: &Path) {
    let dir = template_dir.join("shells");
    let _held = lock(&dir);
    for pid in live(&dir) {
        kill(pid);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    #[test]
    fn the_command_line_is_rewritten_where_ps_reads_it() {
        // The test binary's own line, whatever arguments it was given, has
        // room for these.
        let before = std::fs::read("/proc/self/cmdline").unwrap();
        set_command_line(&[std::ffi::OsStr::new("/a"), std::ffi::OsStr::new("x")]).unwrap();
        let after = std::fs::read("/proc/self/cmdline").unwrap();
        let want = b"/a\0x\0";
        assert!(after.starts_with(want), "{after:?}");
        assert!(after[want.len()..].iter().all(|&b| b == 0), "{after:?}");
        // What no longer fits is refused, the line left as it was.
        let long = std::ffi::OsString::from("y".repeat(before.len() + 1));
        assert!(set_command_line(&[long.as_os_str()]).is_err());
        assert_eq!(std::fs::read("/proc/self/cmdline").unwrap(), after);
        set_command_line(&[std::ffi::OsStr::from_bytes(&before[..before.len() - 1])]).unwrap();
    }

    #[test]
    fn an_unopened_claim_is_told_apart_from_a_whole_launch() {
        let launch = crate::supervisor::tests::launch(Mode::Clone {
            template: "/t/a.img".into(),
        });
        let unopened = serde_json::to_vec(&Unopened {
            unopened: launch.clone(),
        })
        .unwrap();
        // A shell that knows only whole launches refuses it.
        assert!(serde_json::from_slice::<Launch>(&unopened).is_err());
        let back: Unopened = serde_json::from_slice(&unopened).unwrap();
        assert_eq!(back.unopened.name, launch.name);
        // And a whole launch, from an earlier CLI, is not taken for one.
        let whole = serde_json::to_vec(&launch).unwrap();
        assert!(serde_json::from_slice::<Unopened>(&whole).is_err());
    }

    #[test]
    fn a_shell_is_counted_once_and_dead_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let me = tag_of(std::process::id()).unwrap();
        for name in [
            format!("{me}.{SOCKET}"),
            format!("{me}.{STARTING}"),
            // PID 1 with a start time it does not have: a shell long gone.
            format!("1-1.{SOCKET}"),
            "lock".to_string(),
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(live(dir.path()), [std::process::id()]);
        assert!(!dir.path().join(format!("1-1.{SOCKET}")).exists());
        assert!(dir.path().join("lock").exists());
    }
}
