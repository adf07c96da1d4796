//! One supervisor per instance, like a container shim: it starts the
//! namespace init, owns the seccomp listener and the instance's registry
//! entries, serves the control socket, and cleans up when the instance ends.

pub(crate) mod control;
pub mod init;
pub mod logs;
pub mod pending;
pub mod pool;
pub mod restart;
mod restoring;
pub mod snapshots;
pub mod status;
pub mod templates;
pub mod user;

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use appshot_snapshot::holder;
use appshot_snapshot::image::Image;
use appshot_snapshot::lazy::{LazySettings, LazyStatus};
use appshot_snapshot::restore;
use appshot_sys::{fd, pidfd, spawn};
use appshot_vpm::{CachedRegistry, InstanceLock, InstanceRecord, PortRange, Registry};
use nix::errno::Errno;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use self::control::{Peer, Reply, Request};
use crate::error::{FileOp, RuntimeError};
use crate::multiplex::{Multiplexer, PortSet, Settings};
use crate::net::cgroup::{self, InstanceCgroup};
use crate::net::connroutes::Routing;
use crate::net::remote::Cluster;
use crate::net::udproutes::{route_in_kernel, KernelRouted};
use crate::seccomp::{filter, notify};
use crate::tree;

/// Everything a supervisor needs, resolved from flags and config by the CLI
/// (serialised to a detached supervisor).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Launch {
    pub name: String,
    pub aid: String,
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Empty: every port below `ephemeral_start`.
    pub ports: Vec<u16>,
    pub ephemeral_start: u16,
    pub range: PortRange,
    pub allocation_timeout_ms: u64,
    pub run_dir: PathBuf,
    /// What the supervisor starts: `command`, or an image.
    pub mode: Mode,
    /// Source rules and cross-host negotiation.
    #[serde(default)]
    pub cluster: crate::net::remote::ClusterSettings,
    /// A clone's own hostname and identity file (or a restore's own
    /// hostname, `restore --hostname`).
    #[serde(default)]
    pub identity: Option<CloneIdentity>,
    /// Who a launched application runs as (restores take theirs from the
    /// image).
    #[serde(default)]
    pub user: Option<crate::supervisor::user::RunAs>,
    /// A detached instance's logs and exit record go when it ends
    /// (`run --rm`).
    #[serde(default)]
    pub remove_on_exit: bool,
    /// `run --detach --pidfile`: where the starter wrote this supervisor's
    /// PID; removed when the instance ends.
    #[serde(default)]
    pub pidfile: Option<PathBuf>,
    /// The size at which a detached instance's `app.log` is rotated.
    #[serde(default = "default_log_max")]
    pub log_max_bytes: u64,
    /// When the supervisor starts the application again after it exits.
    #[serde(default)]
    pub restart: crate::supervisor::restart::Policy,
    /// `run --config FILE` (absolute), kept in the registry for `appshot
    /// generate systemd`.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Who was asked to decide connect and the name calls (the supervisor
    /// settles who does when it starts: [`Routing::Kernel`] needs the
    /// programs attached and no cluster key).
    #[serde(default)]
    pub routing: Routing,
    /// Real ports the instance's listening sockets need free in `range`,
    /// checked by the supervisor when it takes the instance's name (a
    /// single clone: its starter sends the claim of an instance shell
    /// without reading the registry first); 0 when its starter checked.
    #[serde(default)]
    pub free_ports: usize,
}

/// Refuses `count` clones of a template with `sockets` listening sockets
/// when fewer real ports than they need are free in `range`.
pub fn check_free_ports(
    state: &appshot_vpm::RegistryState,
    range: PortRange,
    sockets: usize,
    count: usize,
) -> Result<(), String> {
    let used = state
        .translations
        .iter()
        .filter(|t| (range.start..=range.end).contains(&t.real_port))
        .count();
    let free = (usize::from(range.end) - usize::from(range.start) + 1).saturating_sub(used);
    let needed = sockets * count;
    if needed > free {
        return Err(format!(
            "{count} clones of a template with {sockets} listening sockets need {needed} real ports; port range {range} has {free} free"
        ));
    }
    Ok(())
}

/// How an instance comes to be, with what each way needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Mode {
    /// Start `command` as a new application.
    Run,
    /// Restore a snapshot, continuing where it stopped.
    Restore {
        image: PathBuf,
        /// Give the image's TCP connections back reset instead of
        /// rebuilding them (`appshot restore --tcp-close`).
        tcp_close: bool,
        /// Release the instance before its memory is in (`appshot restore
        /// --lazy`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lazy: Option<LazySettings>,
    },
    /// Start a clone of a template (already verified by the `appshot
    /// clone` that asked for it): forked from the template's holder, which
    /// is started first if none runs.
    Clone { template: PathBuf },
}

/// What a clone is given that its template's memory cannot tell it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CloneIdentity {
    /// Its hostname, in a UTS namespace of its own.
    pub hostname: String,
    pub file: Option<IdentityFile>,
    /// Its environment file: `values` as `KEY='VALUE'` lines (what
    /// `--env` gives), bind-mounted over `path`.
    #[serde(default)]
    pub env_file: Option<IdentityFile>,
}

/// The clone's identity file: `aid=`, `name=`, `hostname=` and the
/// rendered values, one `KEY=VALUE` a line, bind-mounted over `path` in
/// its mount namespace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityFile {
    pub path: PathBuf,
    pub values: Vec<(String, String)>,
}

fn default_log_max() -> u64 {
    crate::supervisor::logs::DEFAULT_MAX_BYTES
}

/// The variable a detached supervisor receives its `Launch` in; removed
/// before the application starts.
pub const LAUNCH_ENV: &str = "APPSHOT_LAUNCH";
/// The variable the namespace init receives the config's `env` in (never
/// on its command line, which every user can read); init removes it before
/// the application starts.
pub const APP_ENV: &str = "APPSHOT_APP_ENV";
/// Signals the supervisor forwards to the instance.
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];
const SI_KERNEL: i32 = 0x80;

/// How long a launched (not restored) detached instance must run before
/// `run --detach` reports it running; one that exits sooner failed to start. Without such a period the
/// answer for a command that exits at once would depend on who got there
/// first.
const START_PERIOD: Duration = Duration::from_millis(300);

/// Runs the instance to its end (restarting the application as its policy
/// says) and returns how it ended. `ready` (a
/// detached supervisor's) is told `running` once the instance has run for
/// [`START_PERIOD`], and taken; if it ended before, `ready` is left to the
/// caller, which tells it how once the logs are complete.
pub fn run(launch: Launch, ready: &mut Option<std::fs::File>) -> Result<Ended, RuntimeError> {
    run_in(launch, None, ready)
}

/// [`run`] for a clone claimed from an instance shell: its namespace init
/// runs already.
pub fn run_in(
    mut launch: Launch,
    mut shell: Option<pool::Shell>,
    ready: &mut Option<std::fs::File>,
) -> Result<Ended, RuntimeError> {
    let mut phases = Phases::new();
    let nofile = raise_nofile_limit();
    let registry = match shell
        .as_mut()
        .and_then(|s| s.take_registry(&launch.run_dir))
    {
        Some(registry) => registry,
        None => Registry::open(&launch.run_dir)?,
    };
    phases.mark("registry opened");
    let phase = match launch.mode {
        Mode::Run => status::Phase::Running,
        Mode::Restore { .. } | Mode::Clone { .. } => status::Phase::Restoring,
    };
    // A claimed shell's clone is recorded (for its init, running already)
    // in the transaction that takes its name: one registry write less
    // before it answers.
    let recorded_init = match (&shell, &launch.mode) {
        (Some(s), Mode::Clone { .. }) => Some(s.init.pid),
        _ => None,
    };
    // Also removes whatever a dead earlier instance of this name left in
    // the registry and the kernel's source rules. The state is published
    // before the registry lists the instance: `ps` never meets a listed
    // instance without its state.
    let short = |why| RuntimeError::Start {
        name: launch.name.clone(),
        reason: why,
    };
    let (lock, status, pending) = match recorded_init {
        Some(init_pid) => {
            let (lock, pending) = InstanceLock::acquire_pending(&registry, &launch.name)?;
            let status = status::Status::new(lock.instance_dir(), phase);
            (lock, status, Some((pending, record_of(&launch, init_pid))))
        }
        None => {
            if launch.free_ports > 0 {
                check_free_ports(&registry.read()?, launch.range, launch.free_ports, 1)
                    .map_err(short)?;
            }
            let lock = InstanceLock::acquire(&registry, &launch.name)?;
            let status = status::Status::new(lock.instance_dir(), phase);
            (lock, status, None)
        }
    };
    let status = Arc::new(status);
    phases.mark("instance lock taken");

    // Blocked before any thread exists so every thread inherits the mask
    // and the signal thread alone receives them.
    let mut forwarded = SigSet::empty();
    for s in FORWARDED {
        forwarded.add(*s);
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded), None)
        .map_err(|e| RuntimeError::sys("blocking signals", e))?;

    let multiplexed = if launch.ports.is_empty() {
        PortSet::Below(launch.ephemeral_start)
    } else {
        PortSet::Listed(launch.ports.iter().copied().collect())
    };
    // A bad key file stops the start.
    let cluster = Cluster::new(&launch.cluster, &launch.run_dir, &launch.name, &launch.aid)
        .map_err(|e| RuntimeError::Cluster {
            name: launch.name.clone(),
            source: e.into(),
        })?;
    let cgroup = instance_cgroup(&registry, &launch);
    let cgroup_dir = cgroup.as_ref().map(InstanceCgroup::dir);
    // Dropped after the instance's processes are gone.
    let mut _kernel_routed = None;
    let recording = match pending {
        Some((pending, record)) => Some(Recording::start(
            pending,
            record,
            registry.clone(),
            launch.clone(),
            cgroup_dir.map(Path::to_path_buf),
        )),
        None => {
            let (routing, kernel_routed) = settle_routing(&registry, &launch, cgroup_dir);
            launch.routing = routing;
            _kernel_routed = kernel_routed;
            None
        }
    };
    let mut settled_late = None;
    let settings = |init_pid| Settings {
        instance: launch.name.clone(),
        aid: launch.aid.clone(),
        multiplexed: multiplexed.clone(),
        range: launch.range,
        allocation_timeout: Duration::from_millis(launch.allocation_timeout_ms),
        init_pid,
        cluster: Arc::clone(&cluster),
        route_udp: cgroup.is_some(),
    };
    let new_mux = |init_pid| -> Result<Arc<Multiplexer>, RuntimeError> {
        // The supervisor's own handle for writing: its connection is open
        // already (a shell's was opened ahead) when the restore registers
        // the sockets it binds.
        Ok(Arc::new(Multiplexer::new(
            settings(init_pid),
            registry.clone(),
            CachedRegistry::new(Registry::open(&launch.run_dir)?),
        )))
    };
    let mut lazy_status = None;
    // A shell's init, which joins the cgroup once the clone runs and its
    // starter was answered (see below).
    let mut init_joins_late = None;
    let (init_pid, init, listeners, mux, app_pid) = match &launch.mode {
        Mode::Run => {
            let (init_pid, init, listener) = launch_application(&launch, cgroup_dir, nofile)?;
            let app_pid = tree::descendants(init_pid)
                .get(1)
                .copied()
                .unwrap_or(init_pid);
            (init_pid, init, vec![listener], new_mux(init_pid)?, app_pid)
        }
        Mode::Restore { image: path, .. } | Mode::Clone { template: path } => {
            phases.mark("set up");
            let is_clone = matches!(launch.mode, Mode::Clone { .. });
            let tcp_close = matches!(
                launch.mode,
                Mode::Restore {
                    tcp_close: true,
                    ..
                }
            );
            let lazy = match &launch.mode {
                Mode::Restore { lazy, .. } => *lazy,
                _ => None,
            };
            // A template's pages were checked by `appshot clone` (once per
            // unchanged file), a lazy restore's are by its page server, an
            // eager restore's while its processes are rebuilt.
            let image = match shell.as_mut().and_then(|s| s.take_image(path)) {
                Some(image) => image,
                None => Image::open_pages_unchecked(path)?,
            };
            restore::check_files(&image)?;
            phases.mark("image opened");
            // A clone that cannot be forked from a holder is restored with
            // its memory copied: right, only not shared.
            let forked = is_clone
                && match holder::unforkable(&image) {
                    None => true,
                    Some(why) => {
                        warn!(name = %launch.name, "the template's memory is copied, not shared: {why}");
                        false
                    }
                };
            let mut files = Vec::new();
            let owner = files_owner(launch.user.as_ref(), main_credentials(&image));
            if let Some(file) = launch.identity.as_ref().and_then(|i| i.file.as_ref()) {
                let source = lock.instance_dir().join("identity");
                write_private(&source, &identity_text(&launch, file), owner)?;
                files.push((source, file.path.clone()));
            }
            if let Some(file) = launch.identity.as_ref().and_then(|i| i.env_file.as_ref()) {
                let source = lock.instance_dir().join("env");
                let text = appshot_configurator::env_file_text(&file.values);
                write_private(&source, &text, owner)?;
                files.push((source, file.path.clone()));
            }
            // A forked clone has no stub: init waits for it instead.
            let stubs = if forked {
                0
            } else {
                image.manifest.top_level().count()
            };
            let mut plan =
                restoring::Plan::new(is_clone, tcp_close, &image.manifest.instance, stubs);
            plan.recorded_init = recorded_init;
            let claimed_shell = forked && shell.is_some();
            let mut host = RealRestore {
                launch: &launch,
                image: &image,
                files: &files,
                cgroup: cgroup_dir,
                nofile,
                new_mux: &new_mux,
                mux: None,
                lazy,
                lazy_status: None,
                forked,
                ready: None,
                cluster: &cluster,
                phases: &mut phases,
                filter: shell.as_mut().and_then(|s| s.filter.take()),
                shell: shell.take().map(|s| s.init),
                recording,
                settled: None,
            };
            // Listed from the restore's start on, `restoring` until the
            // restored processes are released.
            let r = restoring::restore(
                &mut host,
                &plan,
                &registry,
                &launch,
                restoring::STUB_DEADLINE,
            )?;
            status.released();
            if claimed_shell {
                init_joins_late = Some(r.init_pid);
            }
            let mux = host.mux.take().expect("the multiplexer of a started init");
            lazy_status = host.lazy_status.take();
            settled_late = host.settled.take();
            (r.init_pid, r.init, r.listeners, mux, r.main)
        }
    };

    if let Some(settled) = settled_late {
        launch.routing = settled.routing;
        _kernel_routed = settled.kernel_routed;
    }
    register(&registry, &launch, app_pid)?;
    info!(name = %launch.name, aid = %launch.aid, pid = app_pid, "instance started");
    serve_notifications(listeners, &mux)?;

    // Signals reach init through its pidfd: once `wait_exit` below has
    // reaped it, its PID may belong to another process.
    let init = Arc::new(init);
    let control = Arc::new(Control {
        launch: launch.clone(),
        current: Mutex::new(Current {
            app_pid,
            init_pid,
            init: Arc::clone(&init),
        }),
        status: Arc::clone(&status),
        snapshot: Mutex::new(None),
        lazy: lazy_status,
    });
    spawn_signal_forwarder(forwarded, Arc::clone(&control))?;
    let serving = Arc::clone(&control);
    control::serve(lock.instance_dir(), &launch.run_dir, move |req, peer| {
        serving.handle(req, peer)
    })?;

    // A restored or cloned instance ran before, and its starter returns at
    // once (time measured from the restore must not include a wait).
    let period = match launch.mode {
        Mode::Run => START_PERIOD,
        Mode::Restore { .. } | Mode::Clone { .. } => Duration::ZERO,
    };
    phases.mark("registered and serving");
    debug!(name = %launch.name, "start-up: {phases}");
    if ready.is_some() && !exits_within(&init, period) {
        if let Some(mut r) = ready.take() {
            // The starter may be gone (killed); the instance runs on.
            let _ = writeln!(r, "running");
        }
    }
    // A shell's init joins the cgroup only now (the cgroup did not exist
    // when the shell started it; the clone was forked into it): a
    // migration waits for an RCU grace period when none ran lately (13–18
    // ms measured here), which would hold up every fork meanwhile and the
    // starter's answer.
    if let (Some(pid), Some(dir)) = (init_joins_late, cgroup_dir) {
        if let Err(e) = cgroup::place(dir, pid) {
            warn!(name = %launch.name, "moving the namespace init into {}: {e}", dir.display());
        }
    }
    let mut restarts = 0;
    let mut init_pid = init_pid;
    let exit = loop {
        let code = wait_exit(init_pid);
        // One that ended during its start period failed to start: `run -d`
        // says so rather than leave it restarting.
        let restart = || {
            launch
                .restart
                .delay(code, restarts)
                .filter(|_| ready.is_none() && !status.stopping())
        };
        status.ended_with(code, restart().is_some());
        // A snapshot that stopped the instance answers its requester before
        // the supervisor goes.
        drop(control.snapshot.lock());
        info!(name = %launch.name, status = code, "instance exited");
        // Asked again: a stopping snapshot ends with a stop.
        let Some(delay) = restart() else {
            break code;
        };
        info!(name = %launch.name, restarts, policy = %launch.restart, "restarting the application in {delay:?}");
        if !control.wait_unless_stopped(delay) {
            break code;
        }
        // The same instance: name, AID, registry record and control socket
        // stay; only the application and its namespace are new, and its
        // binds are translated anew.
        let (pid, fd, listener) = match launch_application(&launch, cgroup_dir, nofile) {
            Ok(started) => started,
            Err(e) => {
                warn!(name = %launch.name, "restart failed: {e}");
                break code;
            }
        };
        restarts += 1;
        init_pid = pid;
        let app_pid = tree::descendants(pid).get(1).copied().unwrap_or(pid);
        *control.current.lock().expect("current lock") = Current {
            app_pid,
            init_pid: pid,
            init: Arc::new(fd),
        };
        register(&registry, &launch, app_pid)?;
        status.restarted();
        info!(name = %launch.name, pid = app_pid, restarts, "application restarted");
        serve_notifications(vec![listener], &new_mux(pid)?)?;
    };
    cluster.shutdown();
    registry.transaction(|s| s.remove_instance(&launch.name))?;
    drop(lock);
    Ok(Ended {
        status: exit,
        restarts,
    })
}

/// How an instance ended.
pub struct Ended {
    /// As a shell reports it: 128+N when killed by signal N.
    pub status: i32,
    /// How often `run --restart` started the application again.
    pub restarts: u32,
}

/// Records (or updates, after a restart) the instance in the registry.
fn register(registry: &Registry, launch: &Launch, app_pid: u32) -> Result<(), RuntimeError> {
    registry.transaction(|s| {
        s.instances
            .insert(launch.name.clone(), record_of(launch, app_pid));
    })?;
    Ok(())
}

/// The instance's registry record, its application (or, while it is
/// restored, its namespace init) `app_pid`.
fn record_of(launch: &Launch, app_pid: u32) -> InstanceRecord {
    InstanceRecord {
        name: launch.name.clone(),
        aid: launch.aid.clone(),
        supervisor_pid: std::process::id(),
        pid: app_pid,
        command: launch.command.clone(),
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        multiplexed: launch.ports.clone(),
        config: launch.config.clone(),
        user: launch.user.as_ref().map(|u| format!("{}:{}", u.uid, u.gid)),
        port_range: Some(launch.range.to_string()),
    }
}

/// Serves each listener on a thread of its own: a restored tree has one
/// listener per process (each got a filter of its own).
fn serve_notifications(
    listeners: Vec<OwnedFd>,
    mux: &Arc<Multiplexer>,
) -> Result<(), RuntimeError> {
    for listener in listeners {
        notify::spawn(listener, Arc::clone(mux), "notify")?;
    }
    Ok(())
}

/// Raises the supervisor's soft limit of open files to the hard limit: it
/// holds descriptors for every thread of the instance that is in a notified
/// call. Returns the limits as they were, for the namespace init (and so
/// the application) to start with; `None` if they could not be read.
pub(crate) fn raise_nofile_limit() -> Option<(u64, u64)> {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!("reading RLIMIT_NOFILE: {e}");
            return None;
        }
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            warn!(soft, hard, "raising RLIMIT_NOFILE to its hard limit: {e}");
        }
    }
    Some((soft, hard))
}

/// Starts the namespace init, which launches the command under the filter
/// and sends back the filter's listener. Returns init's PID, a pidfd of it
/// and the listener.
/// The instance's cgroup, through which the kernel routes its datagrams
/// by AID; without one (no cgroup2 under /sys/fs/cgroup, or it cannot be
/// written) the instance runs with its UDP ports left alone, and says so.
fn instance_cgroup(registry: &Registry, launch: &Launch) -> Option<InstanceCgroup> {
    let Some(root) = cgroup::root() else {
        warn!(name = %launch.name, "no cgroup2 below /sys/fs/cgroup: UDP ports are not multiplexed");
        return None;
    };
    let tag = crate::net::sourcerules::registry_tag(registry.dir());
    match InstanceCgroup::create(root, &tag, &launch.aid, &launch.name) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!(name = %launch.name, "creating the instance's cgroup under {}: {e}: UDP ports are not multiplexed", root.display());
            None
        }
    }
}

/// Who decides the instance's connect and name calls, from what was asked
/// and what this host allows: the kernel needs the programs attached to a
/// cgroup the instance is in, and cannot negotiate with other hosts.
fn settle_routing(
    registry: &Registry,
    launch: &Launch,
    cgroup: Option<&Path>,
) -> (Routing, Option<KernelRouted>) {
    if launch.routing == Routing::Notified {
        return (Routing::Notified, None);
    }
    if launch.cluster.cluster_key_file.is_some() {
        info!(name = %launch.name, "a cluster key is configured: connect negotiates with other hosts, so the supervisor routes it");
        return (Routing::Notified, None);
    }
    // `instance_cgroup` warned already: the default routing adds nothing.
    let Some(dir) = cgroup else {
        info!(name = %launch.name, "no instance cgroup: the supervisor routes connects");
        return (Routing::Notified, None);
    };
    match route_in_kernel(registry, dir) {
        Ok(routed) => (Routing::Kernel, Some(routed)),
        Err(e) => {
            warn!(name = %launch.name, "the kernel cannot route connects, the supervisor does: {}", crate::error::chain(&e));
            (Routing::Notified, None)
        }
    }
}

fn launch_application(
    launch: &Launch,
    cgroup: Option<&Path>,
    nofile: Option<(u64, u64)>,
) -> Result<(u32, OwnedFd, OwnedFd), RuntimeError> {
    let (ours, theirs) = init_channel()?;
    let (init_pid, init) = start_init(launch, Some(&theirs), &[], &[], cgroup, nofile)?;
    drop(theirs);
    let started = |ours: &OwnedFd| {
        let mut word = [0u8; 16];
        matches!(nix::unistd::read(ours.as_raw_fd(), &mut word), Ok(n) if &word[..n] == b"started")
    };
    match fd::recv_fd(&ours) {
        Ok(Some(l)) if started(&ours) => Ok((init_pid, init, l)),
        Ok(_) => {
            let status = wait_exit(init_pid);
            if status == 126 || status == 127 {
                return Err(RuntimeError::Exec {
                    name: launch.name.clone(),
                    program: launch.command[0].clone(),
                    status,
                });
            }
            Err(RuntimeError::Start {
                name: launch.name.clone(),
                reason: format!(
                    "`{}` could not be started (init exited with {status})",
                    launch.command[0]
                ),
            })
        }
        Err(e) => Err(RuntimeError::sys("receiving the seccomp listener", e)),
    }
}

/// The per-clone identity file: what differs between clones of one
/// template, readable by the application at the path its rules name.
fn identity_text(launch: &Launch, file: &IdentityFile) -> String {
    let hostname = launch.identity.as_ref().map(|i| i.hostname.as_str());
    let mut text = format!("aid={}\nname={}\n", launch.aid, launch.name);
    for (key, value) in hostname
        .map(|h| ("hostname", h))
        .into_iter()
        .chain(file.values.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        text.push_str(&format!("{key}={value}\n"));
    }
    text
}

/// The credentials of the image's first top-level process's main thread:
/// who the restored application runs as.
fn main_credentials(image: &Image) -> Option<&appshot_snapshot::image::Credentials> {
    let p = image.manifest.top_level().next()?;
    p.threads
        .iter()
        .find(|t| t.ns_tid == p.ns_pid)
        .map(|t| &t.creds)
}

/// Who owns a clone's own files (identity and environment): the user its
/// application runs as, as if the application had made them itself: the
/// run-as user when one was given, else the file-system uid and gid the
/// restored application has (root for one that runs as root). They hold
/// the clone's values, which need not be any other user's to read.
fn files_owner(
    user: Option<&user::RunAs>,
    creds: Option<&appshot_snapshot::image::Credentials>,
) -> (u32, u32) {
    match (user, creds) {
        (Some(u), _) => (u.uid, u.gid),
        (None, Some(c)) => (c.uids[3], c.gids[3]),
        (None, None) => (0, 0),
    }
}

/// Writes `text` to a new file at `path`, mode 0600, owned by `owner`
/// from its creation on (a file of an earlier instance of the name is
/// replaced, never reused with its mode and owner).
fn write_private(path: &Path, text: &str, (uid, gid): (u32, u32)) -> Result<(), RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |op, e| RuntimeError::file(op, path, e);
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(failed(FileOp::Remove, e));
        }
        _ => {}
    }
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(FileOp::Create, e))?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(|e| failed(FileOp::Chown, e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| failed(FileOp::Write, e))
}

/// The restore's steps on this host: the namespace init forks the stubs,
/// `appshot_snapshot::restore` rebuilds the image in them with the
/// multiplexer binding their sockets.
struct RealRestore<'a, M> {
    launch: &'a Launch,
    image: &'a Image,
    /// The clone's own files: (source, where it sees it).
    files: &'a [(PathBuf, PathBuf)],
    cgroup: Option<&'a Path>,
    nofile: Option<(u64, u64)>,
    new_mux: &'a M,
    /// Made once init's PID is known.
    mux: Option<Arc<Multiplexer>>,
    /// `restore --lazy`: how, and once rebuilt, its page server's status.
    lazy: Option<LazySettings>,
    lazy_status: Option<LazyStatus>,
    /// A clone forked from its template's holder; once init started, where
    /// it speaks, its PID, and whether it made its namespaces already.
    forked: bool,
    ready: Option<(OwnedFd, u32, bool)>,
    cluster: &'a Arc<Cluster>,
    phases: &'a mut Phases,
    /// A claimed instance shell's init, awaiting the clone.
    shell: Option<AwaitingInit>,
    /// The seccomp filter, if built ahead (by an instance shell).
    filter: Option<Vec<appshot_sys::seccomp::SockFilter>>,
    /// A claimed shell's record of its clone, written while it is forked.
    recording: Option<Recording>,
    /// Its routing, settled on the recording's thread.
    settled: Option<Settled>,
}

impl<M> restoring::RestoreHost for RealRestore<'_, M>
where
    M: Fn(u32) -> Result<Arc<Multiplexer>, RuntimeError>,
{
    type Init = OwnedFd;
    type Listener = OwnedFd;

    fn start_init(&mut self) -> Result<(u32, OwnedFd), RuntimeError> {
        let top_level: Vec<u32> = self.image.manifest.top_level().map(|p| p.ns_pid).collect();
        let (init_pid, init) = if self.forked {
            // An instance shell's init, started ahead, or one of our own.
            let (awaiting, made) = match self.shell.take() {
                Some(init) => (init, true),
                None => (
                    spawn_awaiting_init(
                        top_level[0],
                        &self.launch.command,
                        self.nofile,
                        self.cgroup,
                    )?,
                    false,
                ),
            };
            let identity = init::Identity {
                hostname: self.launch.identity.as_ref().map(|i| i.hostname.clone()),
                files: self.files.to_vec(),
            };
            let json = serde_json::to_vec(&identity).map_err(|e| {
                RuntimeError::sys("encoding the clone's identity", std::io::Error::other(e))
            })?;
            nix::unistd::write(&awaiting.channel, &json)
                .map_err(|e| RuntimeError::sys("sending the clone's identity to its init", e))?;
            self.ready = Some((awaiting.channel, awaiting.pid, made));
            (awaiting.pid, awaiting.pidfd)
        } else {
            start_init(
                self.launch,
                None,
                &top_level,
                self.files,
                self.cgroup,
                self.nofile,
            )?
        };
        self.phases.mark("init started");
        self.mux = Some((self.new_mux)(init_pid)?);
        Ok((init_pid, init))
    }

    fn stubs(&mut self, init_pid: u32) -> Vec<u32> {
        tree::descendants(init_pid).into_iter().skip(1).collect()
    }

    fn rebuild(
        &mut self,
        stubs: &[u32],
        plan: &restoring::Plan,
    ) -> Result<(Vec<OwnedFd>, u32), RuntimeError> {
        let forked = match self.ready.take() {
            Some((ready, init_pid, made)) => Some(self.fork(ready, init_pid, made)?),
            None => {
                self.phases.mark("stubs forked");
                None
            }
        };
        // Before the restore registers the listeners' translations under
        // the instance's name, and builds the filter for its routing.
        match self.recording.take().map(Recording::finish) {
            Some(Err(e)) => {
                if let Some((clone, _)) = forked {
                    let pid = clone.pid;
                    clone.kill(|| {
                        let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    });
                }
                return Err(e);
            }
            Some(Ok(settled)) => self.settled = Some(settled),
            None => {}
        }
        self.phases.mark("recorded");
        let routing = self
            .settled
            .as_ref()
            .map_or(self.launch.routing, |s| s.routing);
        // A shell's filter was built ahead for the default routing.
        let program = match self.filter.take() {
            Some(program) if routing == Routing::default() => program,
            _ => filter::build(routing)?,
        };
        self.phases.mark("filter built");
        let mux = self.mux.as_ref().expect("init started first");
        let listen = |spec: &restore::ListenSpec, fd| mux.listen_restored(spec, fd);
        let bind_udp = |addr, fd| mux.bind_restored_udp(addr, fd);
        let hooks = restore::RestoreHooks {
            filter: &program,
            listen: &listen,
            bind_udp: &bind_udp,
            connections: plan.connections,
            lazy: self.lazy,
            check_pages: !plan.clone && self.lazy.is_none(),
        };
        let restored = match forked {
            Some((clone, holder)) => restore::restore_forked(clone, holder, self.image, &hooks)?,
            None => restore::restore(stubs, self.image, &hooks)?,
        };
        self.lazy_status = restored.lazy;
        self.phases.mark("restored");
        Ok((restored.listeners, restored.hosts[0]))
    }

    fn kill(&mut self, init: &OwnedFd, init_pid: u32) {
        let _ = pidfd::send_signal(init, libc::SIGKILL);
        wait_exit(init_pid);
        self.cluster.shutdown();
    }

    fn release_netlock(&mut self) {
        crate::net::netlock::release_image(&self.launch.run_dir, &self.image.path);
    }
}

impl<M> RealRestore<'_, M> {
    /// Forks the image's process from its template's holder into the
    /// namespaces of init (`init_pid`) once they exist (`made`: an
    /// instance shell's init made them long ago), moves it into the
    /// instance's cgroup as it forks it, and waits until init has applied
    /// the clone's
    /// identity, which it does meanwhile: the clone runs no instruction
    /// before its restore is done. Returns it frozen, and its holder, for
    /// the rest of its restore.
    fn fork(
        &mut self,
        ready: OwnedFd,
        init_pid: u32,
        made: bool,
    ) -> Result<(appshot_snapshot::ptrace::Frozen, holder::Holder), RuntimeError> {
        if !made {
            self.await_init(&ready, b"shell")?;
        }
        self.phases.mark("namespaces made");
        let mut lease = templates::lease(&self.launch.run_dir, &self.image.path, self.image)?;
        let holder = lease.holder();
        self.phases.mark("template holder locked");
        let namespaces = templates::namespaces_apart(init_pid, holder.pid);
        let clone = holder::fork_clone(holder, init_pid, namespaces, self.cgroup, self.image)?;
        lease.clone_started();
        drop(lease);
        self.phases.mark("forked");
        if let Err(e) = self.await_init(&ready, b"ready") {
            let pid = clone.pid;
            clone.kill(|| {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            });
            return Err(e);
        }
        self.phases.mark("identity applied");
        Ok((clone, holder))
    }

    /// Waits for `word` from the awaiting init (`shell` once its namespaces
    /// exist, then `ready` once it applied the clone's identity).
    fn await_init(&self, channel: &OwnedFd, word: &[u8]) -> Result<(), RuntimeError> {
        let mut got = [0u8; 16];
        loop {
            match nix::unistd::read(channel.as_raw_fd(), &mut got) {
                Ok(n) if &got[..n] == word => return Ok(()),
                Ok(n) if &got[..n] == b"shell" => {}
                Err(Errno::EINTR) => {}
                _ => {
                    return Err(RuntimeError::Start {
                        name: self.launch.name.clone(),
                        reason: format!(
                            "the namespace init ended before it said `{}`",
                            String::from_utf8_lossy(word)
                        ),
                    })
                }
            }
        }
    }
}

/// A claimed shell's registry transactions before its clone runs, made on
/// a thread of their own while the clone is forked from its holder: the
/// one that takes the clone's name and records it (after a dead
/// predecessor's entries went; the real ports it needs counted), then the
/// one that settles its routing (the kernel's programs told to route the
/// clone's cgroup). The fork needs the name taken (the clone's cgroup and
/// files are the name's), not the record nor the routing, and each was
/// about 1 ms of a clone's start, one after the other. Joined before the
/// restore registers translations under the name and builds the clone's
/// filter, or when dropped.
struct Recording(Option<std::thread::JoinHandle<Result<Settled, RuntimeError>>>);

/// The routing settled for a clone by its recording.
struct Settled {
    routing: Routing,
    kernel_routed: Option<KernelRouted>,
}

impl Recording {
    fn start(
        pending: appshot_vpm::PendingRecord,
        record: InstanceRecord,
        registry: Registry,
        launch: Launch,
        cgroup: Option<PathBuf>,
    ) -> Recording {
        Recording(Some(std::thread::spawn(move || {
            let name = launch.name.clone();
            pending.record(|s, _| {
                check_free_ports(s, launch.range, launch.free_ports, 1)
                    .map_err(|reason| RuntimeError::Start { name, reason })?;
                s.instances.insert(launch.name.clone(), record);
                Ok::<_, RuntimeError>(())
            })??;
            let (routing, kernel_routed) = settle_routing(&registry, &launch, cgroup.as_deref());
            Ok(Settled {
                routing,
                kernel_routed,
            })
        })))
    }

    fn finish(mut self) -> Result<Settled, RuntimeError> {
        let thread = self.0.take().expect("joined once");
        thread.join().unwrap_or_else(|_| {
            Err(RuntimeError::sys(
                "recording the instance",
                std::io::Error::other("the recording thread panicked"),
            ))
        })
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// Where a supervisor's start-up time goes (logged at debug): each
/// step's milliseconds since the one before.
struct Phases {
    last: Instant,
    steps: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new() -> Phases {
        Phases {
            last: Instant::now(),
            steps: Vec::new(),
        }
    }

    fn mark(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps
            .push((step, (now - self.last).as_secs_f64() * 1e3));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (step, ms)) in self.steps.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{step} {ms:.2} ms")?;
        }
        Ok(())
    }
}

/// Starts the namespace init; returns its PID and a pidfd of it. It
/// starts with the open-files limit `nofile` (the one the supervisor had
/// before raising its own), which the application inherits.
fn start_init(
    launch: &Launch,
    channel: Option<&OwnedFd>,
    restore_pids: &[u32],
    files: &[(PathBuf, PathBuf)],
    cgroup: Option<&Path>,
    nofile: Option<(u64, u64)>,
) -> Result<(u32, OwnedFd), RuntimeError> {
    let exe =
        std::env::current_exe().map_err(|e| RuntimeError::sys("locating the appshot binary", e))?;
    let mut argv = vec![cstr(exe.as_os_str().as_bytes())?, cstr(b"__init")?];
    // Always named: APPSHOT_ROUTING in the environment init inherits must
    // not choose a filter the supervisor did not settle on.
    argv.push(cstr(b"--routing")?);
    argv.push(cstr(match launch.routing {
        Routing::Notified => b"notified",
        Routing::Kernel => b"kernel",
    })?);
    if let Some(channel) = channel {
        argv.push(cstr(b"--channel-fd")?);
        argv.push(cstr(channel.as_raw_fd().to_string().as_bytes())?);
    }
    if !restore_pids.is_empty() {
        let list: Vec<String> = restore_pids.iter().map(u32::to_string).collect();
        argv.push(cstr(b"--restore-pid")?);
        argv.push(cstr(list.join(",").as_bytes())?);
    }
    if let Some(identity) = &launch.identity {
        argv.push(cstr(b"--hostname")?);
        argv.push(cstr(identity.hostname.as_bytes())?);
    }
    for (source, target) in files {
        argv.push(cstr(b"--file-source")?);
        argv.push(cstr(source.as_os_str().as_bytes())?);
        argv.push(cstr(b"--file-target")?);
        argv.push(cstr(target.as_os_str().as_bytes())?);
    }
    if let Some(user) = &launch.user {
        argv.push(cstr(b"--user")?);
        argv.push(cstr(user.to_arg().as_bytes())?);
    }
    if let Some(cwd) = &launch.cwd {
        argv.push(cstr(b"--cwd")?);
        argv.push(cstr(cwd.as_os_str().as_bytes())?);
    }
    argv.push(cstr(b"--")?);
    for a in &launch.command {
        argv.push(cstr(a.as_bytes())?);
    }
    // The config's variables travel in init's environment, readable by the
    // instance's owner only (unlike argv), and apart from init's own
    // variables so that they apply to the application alone.
    // Like `docker run --user`, HOME is the user's unless the config
    // sets it.
    let home = launch
        .user
        .as_ref()
        .and_then(|u| u.home.as_ref())
        .filter(|_| !launch.env.iter().any(|(k, _)| k == "HOME"))
        .map(|h| ("HOME".to_string(), h.to_string_lossy().into_owned()));
    let app_env = if launch.env.is_empty() && home.is_none() {
        None
    } else {
        let pairs = launch
            .env
            .iter()
            .chain(home.iter())
            .map(|(k, v)| {
                if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                    return Err(RuntimeError::Start {
                        name: launch.name.clone(),
                        reason: format!("environment variable {k:?}: invalid name or value"),
                    });
                }
                Ok((k.as_str(), v.as_str()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let json = serde_json::to_string(&pairs)
            .map_err(|e| RuntimeError::sys("encoding the environment", std::io::Error::other(e)))?;
        Some((std::ffi::OsString::from(APP_ENV), json.into()))
    };
    let env = init_env(app_env)?;
    // Every process and socket of the instance is made in its cgroup: init
    // starts there.
    let cgroup = open_cgroup(cgroup)?;
    let setup = spawn::InitSetup {
        keep_fd: channel.map(|c| c.as_raw_fd()),
        nofile,
        cgroup: cgroup.as_ref().map(|f| f.as_raw_fd()),
    };
    spawn::spawn_namespace_init(&argv, &env, setup)
        .map_err(|e| RuntimeError::sys("starting the namespace init", e))
}

/// A namespace init started for a clone before its identity is known: it
/// made its namespaces and waits on `channel` for the clone's
/// [`init::Identity`], then for the clone with PID `pid` in it.
pub struct AwaitingInit {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub channel: OwnedFd,
}

/// Starts a namespace init that awaits the clone with PID `clone_pid`
/// (see [`AwaitingInit`]), with the open-files limit `nofile`, in the
/// cgroup `cgroup` if it is known yet. `command`, the clone's, is shown on
/// its command line, as a launching init's.
pub fn spawn_awaiting_init(
    clone_pid: u32,
    command: &[String],
    nofile: Option<(u64, u64)>,
    cgroup: Option<&Path>,
) -> Result<AwaitingInit, RuntimeError> {
    let (ours, theirs) = init_channel()?;
    let exe =
        std::env::current_exe().map_err(|e| RuntimeError::sys("locating the appshot binary", e))?;
    let mut argv = vec![
        cstr(exe.as_os_str().as_bytes())?,
        cstr(b"__init")?,
        cstr(b"--channel-fd")?,
        cstr(theirs.as_raw_fd().to_string().as_bytes())?,
        cstr(b"--await-pid")?,
        cstr(clone_pid.to_string().as_bytes())?,
    ];
    if !command.is_empty() {
        argv.push(cstr(b"--")?);
    }
    for a in command {
        argv.push(cstr(a.as_bytes())?);
    }
    let env = init_env(None)?;
    let cgroup = open_cgroup(cgroup)?;
    let setup = spawn::InitSetup {
        keep_fd: Some(theirs.as_raw_fd()),
        nofile,
        cgroup: cgroup.as_ref().map(|f| f.as_raw_fd()),
    };
    let (pid, pidfd) = spawn::spawn_namespace_init(&argv, &env, setup)
        .map_err(|e| RuntimeError::sys("starting the namespace init", e))?;
    Ok(AwaitingInit {
        pid,
        pidfd,
        channel: ours,
    })
}

/// The channel to a namespace init: both ends close-on-exec from the
/// start, so no process spawned meanwhile by another thread inherits them;
/// init's process alone keeps the second across its exec.
fn init_channel() -> Result<(OwnedFd, OwnedFd), RuntimeError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| RuntimeError::sys("socketpair", e))
}

/// An argument of init's command line.
fn cstr(s: &[u8]) -> Result<CString, RuntimeError> {
    CString::new(s)
        .map_err(|_| RuntimeError::sys("argument with NUL byte", std::io::ErrorKind::InvalidInput))
}

/// A namespace init's environment: the supervisor's without its own
/// variables, plus `app_env` (the config's variables for the application).
fn init_env(
    app_env: Option<(std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<CString>, RuntimeError> {
    std::env::vars_os()
        .filter(|(k, _)| k != LAUNCH_ENV && k != APP_ENV)
        .chain(app_env)
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| {
                RuntimeError::sys("variable with NUL byte", std::io::ErrorKind::InvalidInput)
            })
        })
        .collect()
}

/// The instance's cgroup directory, opened for `CLONE_INTO_CGROUP`.
fn open_cgroup(dir: Option<&Path>) -> Result<Option<std::fs::File>, RuntimeError> {
    dir.map(|dir| {
        std::fs::File::open(dir).map_err(|e| {
            RuntimeError::sys(
                format!("opening the instance's cgroup {}", dir.display()),
                e,
            )
        })
    })
    .transpose()
}

fn spawn_signal_forwarder(set: SigSet, control: Arc<Control>) -> Result<(), RuntimeError> {
    let sfd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC)
        .map_err(|e| RuntimeError::sys("signalfd", e))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(Some(info)) = sfd.read_signal() else {
                continue;
            };
            // Terminal keys and hangups reach the application through its
            // process group already.
            if info.ssi_code == SI_KERNEL {
                continue;
            }
            if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                // A supervisor told to end (a service manager's SIGTERM)
                // ends with its application: no restart.
                if matches!(sig, Signal::SIGTERM | Signal::SIGINT) {
                    control.status.set_stopping();
                }
                let _ = pidfd::send_signal(&control.init(), sig as i32);
            }
        })
        .map_err(|e| RuntimeError::sys("spawning the signal thread", e))?;
    Ok(())
}

/// What the control socket's requests act on.
struct Control {
    launch: Launch,
    /// The application as it runs now (a restart replaces it).
    current: Mutex<Current>,
    /// Frozen, asked to stop, exited, as published for `ps`.
    status: Arc<status::Status>,
    /// Held for the whole of a snapshot, reply included: one at a time.
    /// Holds the write tracking kept on the instance for the next
    /// incremental snapshot, if the last snapshot kept it.
    snapshot: Mutex<Option<snapshots::Armed>>,
    /// The page server of a lazy restore: a snapshot is refused until it
    /// is done, as memory still pending is in no page table to save.
    lazy: Option<LazyStatus>,
}

/// The application's processes of the current run.
struct Current {
    app_pid: u32,
    init_pid: u32,
    init: Arc<OwnedFd>,
}

impl Control {
    fn init(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.current.lock().expect("current lock").init)
    }

    /// Waits `delay` before a restart; false if a stop came meanwhile.
    fn wait_unless_stopped(&self, delay: Duration) -> bool {
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline {
            if self.status.stopping() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.status.stopping()
    }

    /// What the instance is doing now, as `ps` shows it.
    fn state(&self) -> &'static str {
        self.status.state().as_str()
    }

    fn handle(&self, req: Request, peer: &Peer) -> Reply {
        match req {
            Request::Status => Reply {
                snapshot: None,
                ok: true,
                state: self.state().into(),
                message: String::new(),
            },
            Request::Stop { grace_secs } => self.stop(grace_secs),
            Request::Snapshot {
                output,
                leave_running,
                pre_copy,
                template,
                external_unix_close,
                parent,
                track,
                sync,
            } => self.snapshot(
                &output,
                snapshots::SnapshotOptions {
                    leave_running,
                    pre_copy,
                    template,
                    external_unix_close,
                    parent,
                    track,
                    durability: snapshots::durability(sync),
                },
                peer,
            ),
        }
    }

    fn stop(&self, grace_secs: u64) -> Reply {
        self.status.set_stopping();
        let (init, init_pid) = {
            let current = self.current.lock().expect("current lock");
            (Arc::clone(&current.init), current.init_pid)
        };
        let _ = pidfd::send_signal(&init, libc::SIGTERM);
        let status = Arc::clone(&self.status);
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(grace_secs);
            while Instant::now() < deadline && !status.ended() {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !status.ended() {
                warn!(
                    pid = init_pid,
                    "instance ignored SIGTERM for {grace_secs}s: SIGKILL"
                );
                // Killing the namespace init kills every process in it.
                let _ = pidfd::send_signal(&init, libc::SIGKILL);
            }
        });
        Reply {
            snapshot: None,
            ok: true,
            state: "stopping".into(),
            message: format!("SIGTERM sent; SIGKILL in {grace_secs}s"),
        }
    }

    fn snapshot(&self, output: &Path, options: snapshots::SnapshotOptions, peer: &Peer) -> Reply {
        let leave_running = options.leave_running;
        let refused = |message: String| Reply {
            snapshot: None,
            ok: false,
            state: self.state().into(),
            message,
        };
        if !output.is_absolute() {
            return refused(format!("{}: not an absolute path", output.display()));
        }
        let Ok(mut armed) = self.snapshot.try_lock() else {
            return refused(format!(
                "a snapshot of {} is already under way",
                self.launch.name
            ));
        };
        if self.status.ended() {
            return refused(format!("instance {} has exited", self.launch.name));
        }
        if let Some(lazy) = self.lazy.as_ref().filter(|l| l.in_progress()) {
            return refused(format!(
                "instance {} is still being restored lazily ({} bytes of its memory not in yet); snapshot it once that is done",
                self.launch.name,
                lazy.pending_bytes()
            ));
        }
        let (app, init_pid, init) = {
            let current = self.current.lock().expect("current lock");
            (current.app_pid, current.init_pid, Arc::clone(&current.init))
        };
        let subject = snapshots::Subject {
            run_dir: &self.launch.run_dir,
            name: &self.launch.name,
            aid: &self.launch.aid,
            command: &self.launch.command,
            multiplexed: &self.launch.ports,
            app,
            init_pid,
            init: &init,
        };
        match snapshots::take(&subject, output, options, peer, &self.status, &mut armed) {
            Ok(taken) => {
                // Stopped by the snapshot: saved, not failed, so not
                // restarted. Set while the snapshot lock is held, which the
                // exit waits for.
                if !leave_running {
                    self.status.set_stopping();
                }
                Reply {
                    ok: true,
                    state: if leave_running { "running" } else { "stopped" }.into(),
                    message: taken.summary(),
                    snapshot: Some(Box::new(taken)),
                }
            }
            Err(e) => {
                // The causes too: the requester sees this text only.
                let mut message = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    message.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                warn!(name = %self.launch.name, image = %output.display(), "snapshot failed: {message}");
                refused(message)
            }
        }
    }
}

/// Whether the process of pidfd `init` exits within `period`.
fn exits_within(init: &OwnedFd, period: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + period;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(init.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(Errno::EINTR) => continue,
            // Cannot tell: the wait for its exit decides.
            Err(_) => return false,
        }
    }
}

/// Waits for `pid` and returns its status the way a shell reports it.
fn wait_exit(pid: u32) -> i32 {
    loop {
        match waitpid(Pid::from_raw(pid as i32), None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Launch, LazySettings, Mode};

    pub(super) fn launch(mode: Mode) -> Launch {
        Launch {
            name: "web".into(),
            aid: "a".into(),
            command: vec!["server".into()],
            cwd: None,
            env: Vec::new(),
            ports: vec![9000],
            ephemeral_start: 32768,
            range: Default::default(),
            allocation_timeout_ms: 100,
            run_dir: "/run/appshot".into(),
            mode,
            cluster: Default::default(),
            identity: None,
            user: None,
            remove_on_exit: false,
            pidfile: None,
            log_max_bytes: 1,
            restart: Default::default(),
            config: None,
            routing: Default::default(),
            free_ports: 0,
        }
    }

    #[test]
    fn clones_are_refused_when_their_range_has_too_few_free_real_ports() {
        use appshot_vpm::{PortRange, Protocol, RegistryState, Translation};
        let held = |real_port| Translation {
            protocol: Protocol::Tcp,
            addr: std::net::Ipv4Addr::UNSPECIFIED.into(),
            virtual_port: 9000,
            aid: "a".into(),
            real_port,
            owner: "x".into(),
            socket_inode: 1,
        };
        let state = RegistryState {
            // Two in the range; one below it does not count.
            translations: vec![held(20000), held(20002), held(9000)],
            ..Default::default()
        };
        let range = PortRange {
            start: 20000,
            end: 20003,
        };
        assert_eq!(super::check_free_ports(&state, range, 1, 2), Ok(()));
        assert_eq!(super::check_free_ports(&state, range, 2, 1), Ok(()));
        assert_eq!(super::check_free_ports(&state, range, 0, 9), Ok(()));
        assert_eq!(
            super::check_free_ports(&state, range, 1, 3),
            Err("3 clones of a template with 1 listening sockets need 3 real ports; port range 20000-20003 has 2 free".into())
        );
        assert!(super::check_free_ports(&state, range, 3, 1).is_err());
    }

    #[test]
    fn a_launch_reaches_a_detached_supervisor_as_it_was_made() {
        // `run --detach` hands the Launch to `__supervise` as JSON.
        for mode in [
            Mode::Run,
            Mode::Restore {
                image: "/i.img".into(),
                tcp_close: true,
                lazy: Some(LazySettings {
                    prefetch_bytes_per_sec: Some(1 << 20),
                }),
            },
            Mode::Clone {
                template: "/t.img".into(),
            },
        ] {
            let json = serde_json::to_string(&launch(mode)).unwrap();
            let back: Launch = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        let json = serde_json::to_value(launch(Mode::Restore {
            image: "/i.img".into(),
            tcp_close: false,
            lazy: None,
        }))
        .unwrap();
        assert_eq!(
            json["mode"],
            serde_json::json!({"kind": "restore", "image": "/i.img", "tcp_close": false})
        );
    }

    #[test]
    fn a_clones_files_belong_to_the_user_its_application_runs_as() {
        use super::{files_owner, user::RunAs};
        use appshot_snapshot::image::Credentials;
        let creds = Credentials {
            // Real, effective, saved, file-system: it is the last the
            // kernel judges a file access by.
            uids: [0, 0, 0, 1000],
            gids: [0, 0, 0, 100],
            ..Credentials::default()
        };
        assert_eq!(files_owner(None, Some(&creds)), (1000, 100));
        assert_eq!(files_owner(None, None), (0, 0));
        let run_as = RunAs {
            uid: 65534,
            gid: 65534,
            groups: Vec::new(),
            home: None,
        };
        assert_eq!(files_owner(Some(&run_as), Some(&creds)), (65534, 65534));
    }
}
