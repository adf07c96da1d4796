//! `appshot oci-agent`: the service OCI runtimes hand containers' seccomp
//! listeners to. Each container becomes an instance of the registry, named
//! by its container id and owned by the agent (its liveness lock held for
//! as long as the container's init lives), served by the same
//! [`Multiplexer`] and notification loop as the supervisor of `appshot
//! run`. When the container's init exits, its translations go.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use appshot_configurator::AppConfig;
use appshot_sys::{fd, pidfd};
use appshot_vpm::{CachedRegistry, InstanceLock, InstanceRecord, PortRange, Registry};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt};
use tracing::{info, warn};

use super::state::{self, Handoff};
use crate::error::{FileOp, RuntimeError};
use crate::multiplex::{Multiplexer, PortSet, Settings};
use crate::net::remote::{Cluster, ClusterError, ClusterSettings};
use crate::seccomp::notify;
use crate::supervisor::control::{self, Peer, Reply, Request};
use crate::supervisor::status::{Phase, Status};

/// The largest state message accepted (annotations included).
const MAX_MESSAGE: usize = 1 << 20;
/// How long a runtime may take to send its message once connected.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct AgentArgs {
    pub listen: PathBuf,
    pub run_dir: PathBuf,
    /// Start of the ephemeral range: ports below it are multiplexed.
    pub ephemeral_start: u16,
}

/// Runs the agent in the foreground; returns only on a fatal error.
pub fn run(args: AgentArgs) -> Result<i32, RuntimeError> {
    Registry::open(&args.run_dir)?;
    let listener = listen(&args.listen)?;
    info!(socket = %args.listen.display(), run_dir = %args.run_dir.display(), "OCI seccomp agent listening");
    let args = Arc::new(args);
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting a runtime connection: {e}");
                continue;
            }
        };
        let args = Arc::clone(&args);
        let spawned = std::thread::Builder::new()
            .name("oci-container".into())
            .spawn(move || {
                if let Err(e) = accept(conn, &args) {
                    warn!("container refused: {e}");
                }
            });
        if let Err(e) = spawned {
            warn!("no thread for a runtime connection: {e}");
        }
    }
    Ok(0)
}

/// Binds the socket, mode 0600 (runtimes run as root). A socket file left
/// by a dead agent is replaced; one a live agent answers on is not.
fn listen(path: &Path) -> Result<UnixListener, RuntimeError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(RuntimeError::Oci(format!(
                "{}: exists and is not a socket",
                path.display()
            )));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(RuntimeError::Oci(format!(
                "{}: another agent is listening on it",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::file(FileOp::Create, dir, e))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| RuntimeError::file(FileOp::Bind, path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::file(FileOp::Chmod, path, e))?;
    Ok(listener)
}

/// One runtime connection: check the peer, read its message, serve the
/// container until it exits.
fn accept(conn: UnixStream, args: &AgentArgs) -> Result<(), RuntimeError> {
    let cred = getsockopt(&conn, sockopt::PeerCredentials)
        .map_err(|e| RuntimeError::sys("peer credentials", e))?;
    if cred.uid() != 0 {
        return Err(RuntimeError::Oci(format!(
            "peer pid {} runs as uid {}: only root may hand over containers",
            cred.pid(),
            cred.uid()
        )));
    }
    conn.set_read_timeout(Some(MESSAGE_TIMEOUT))
        .map_err(|e| RuntimeError::sys("socket timeout", e))?;
    let conn: OwnedFd = conn.into();
    let (mut bytes, fds) = fd::recv_with_fds(&conn, MAX_MESSAGE)
        .map_err(|e| RuntimeError::sys("receiving the container state", e))?;
    // A stream may deliver the rest of a long state in later reads.
    while !state::is_complete(&bytes) && bytes.len() < MAX_MESSAGE {
        let mut more = vec![0u8; MAX_MESSAGE - bytes.len()];
        match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&conn), &mut more) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&more[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(RuntimeError::sys("reading the container state", e)),
        }
    }
    drop(conn);
    let handoff = state::parse(&bytes, fds)?;
    serve_container(handoff, args)
}

/// The container's command, from its bundle's config (for `ps`).
fn command_of(bundle: &Path) -> Vec<String> {
    oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|spec| spec.process().as_ref().and_then(|p| p.args().clone()))
        .unwrap_or_default()
}

/// The containers being served, by id: a later handoff for one of them
/// (`runc exec` sends the listener of each process it starts) is served
/// by the container's multiplexer. Container ids are unique per runtime
/// root; two roots handing over one id share the instance.
fn served() -> &'static Mutex<HashMap<String, Arc<Multiplexer>>> {
    static SERVED: OnceLock<Mutex<HashMap<String, Arc<Multiplexer>>>> = OnceLock::new();
    SERVED.get_or_init(Default::default)
}

fn serve_container(h: Handoff, args: &AgentArgs) -> Result<(), RuntimeError> {
    let joined = served()
        .lock()
        .expect("served containers")
        .get(&h.id)
        .map(Arc::clone);
    if let Some(mux) = joined {
        info!(container = %h.id, "a process exec'd in the container served");
        notify::spawn(h.listener, mux, "oci-notify")?;
        return Ok(());
    }
    // Opened first: from here on the pid cannot name another process.
    let init = pidfd::open_process(h.pid)
        .map_err(|e| RuntimeError::sys(format!("container `{}`: pidfd of {}", h.id, h.pid), e))?;
    let registry = Registry::open(&args.run_dir)?;
    let lock = InstanceLock::acquire(&registry, &h.id)?;
    // Before the registry lists it, as a supervisor does.
    let status = Status::new(lock.instance_dir(), Phase::Running);
    let config = AppConfig::default();
    let cluster_error = |e: ClusterError| RuntimeError::Cluster {
        name: h.id.clone(),
        source: e.into(),
    };
    let cluster_settings = ClusterSettings::resolve(&config).map_err(cluster_error)?;
    let cluster =
        Cluster::new(&cluster_settings, &args.run_dir, &h.id, &h.aid).map_err(cluster_error)?;
    let settings = Settings {
        instance: h.id.clone(),
        aid: h.aid.clone(),
        multiplexed: PortSet::Below(args.ephemeral_start),
        range: PortRange {
            start: config.port_range.start,
            end: config.port_range.end,
        },
        allocation_timeout: config.allocation_timeout,
        init_pid: h.pid,
        cluster: Arc::clone(&cluster),
        // The container's processes are in the engine's cgroups, not ours.
        route_udp: false,
    };
    let mux = Arc::new(Multiplexer::new(
        settings,
        Registry::open(&args.run_dir)?,
        CachedRegistry::new(Registry::open(&args.run_dir)?),
    ));
    let command = command_of(&h.bundle);
    registry.transaction(|s| {
        s.instances.insert(
            h.id.clone(),
            InstanceRecord {
                name: h.id.clone(),
                aid: h.aid.clone(),
                supervisor_pid: std::process::id(),
                pid: h.pid,
                command,
                started_unix: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                multiplexed: Vec::new(),
                config: None,
                user: None,
                port_range: None,
            },
        );
    })?;
    served()
        .lock()
        .expect("served containers")
        .insert(h.id.clone(), Arc::clone(&mux));
    notify::spawn(h.listener, mux, "oci-notify")?;
    info!(container = %h.id, aid = %h.aid, pid = h.pid, bundle = %h.bundle.display(), "container served");

    let init = Arc::new(init);
    let stop_control = Arc::new(AtomicBool::new(false));
    let exited = Arc::new(AtomicBool::new(false));
    let control = Container {
        init: Arc::clone(&init),
        exited: Arc::clone(&exited),
        status,
    };
    control::serve_until(
        lock.instance_dir(),
        &args.run_dir,
        move |req, peer| control.handle(req, peer),
        Arc::clone(&stop_control),
    )?;

    wait_exit(&init);
    exited.store(true, Ordering::SeqCst);
    info!(container = %h.id, "container exited");
    served().lock().expect("served containers").remove(&h.id);
    stop_control.store(true, Ordering::SeqCst);
    let _ = UnixStream::connect(lock.instance_dir().join(control::SOCKET_NAME));
    cluster.shutdown();
    registry.transaction(|s| s.remove_instance(&h.id))?;
    drop(lock);
    Ok(())
}

/// Blocks until the process behind `pidfd` has exited.
fn wait_exit(pidfd: &OwnedFd) {
    loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(n) if n > 0 => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("polling a container's pidfd: {e}");
                return;
            }
        }
    }
}

/// Control requests for a container: status and stop; a container is not
/// snapshotted by appshot (its runtime owns it).
struct Container {
    init: Arc<OwnedFd>,
    exited: Arc<AtomicBool>,
    /// `running`, or `stopping` once asked to (the container's runtime,
    /// not the agent, has its exit status).
    status: Status,
}

impl Container {
    fn handle(&self, req: Request, _peer: &Peer) -> Reply {
        match req {
            Request::Status => Reply {
                snapshot: None,
                ok: true,
                state: self.status.state().as_str().into(),
                message: String::new(),
            },
            Request::Stop { grace_secs } => {
                self.status.set_stopping();
                let _ = pidfd::send_signal(&self.init, libc::SIGTERM);
                let init = Arc::clone(&self.init);
                let exited = Arc::clone(&self.exited);
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(grace_secs);
                    while Instant::now() < deadline && !exited.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    if !exited.load(Ordering::SeqCst) {
                        let _ = pidfd::send_signal(&init, libc::SIGKILL);
                    }
                });
                Reply {
                    snapshot: None,
                    ok: true,
                    state: "stopping".into(),
                    message: format!(
                        "SIGTERM sent to the container's init; SIGKILL in {grace_secs}s"
                    ),
                }
            }
            Request::Snapshot { .. } => Reply {
                snapshot: None,
                ok: false,
                state: "running".into(),
                message: "a container is snapshotted by its runtime, not by appshot".into(),
            },
        }
    }
}
