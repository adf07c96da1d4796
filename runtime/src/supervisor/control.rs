//! The per-instance control socket: `appshot ps` asks it for the state,
//! `appshot stop` asks it to stop, `appshot snapshot` asks it to dump the
//! instance (the supervisor is the tracer, so a requester that dies cannot
//! leave the instance half-frozen). One JSON request a line; the answer is
//! one [`Reply`] line, preceded for a snapshot by [`Progress`] lines.
//!
//! Only root or the supervisor's own user may talk to it (SO_PEERCRED on
//! every connection), and never a supervisor of this run directory or a
//! process running under one: a supervised application is root too, and
//! must not stop or snapshot other instances.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use appshot_vpm::{CachedRegistry, Registry};
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, recv, sockopt, MsgFlags};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::{ControlStep, FileOp, RuntimeError};

pub const SOCKET_NAME: &str = "control.sock";
const MAX_REQUEST: u64 = 4096;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A requester that stops reading progress for this long is treated as
/// gone: the instance must not stay frozen behind a full socket buffer.
const PROGRESS_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Ancestors followed from a peer before giving up on its lineage.
const MAX_LINEAGE: usize = 256;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// SIGTERM now, SIGKILL after `grace_secs`.
    Stop {
        grace_secs: u64,
    },
    /// Dump the instance into `output` (an absolute path), then let it run
    /// on or stop it. Abandoned, with the instance released unchanged, if
    /// the requester's connection closes before the image is in place.
    Snapshot {
        output: PathBuf,
        leave_running: bool,
        /// `--pre-copy` (a CLI older than the flag sends none).
        #[serde(default)]
        pre_copy: bool,
        template: bool,
        /// `--external-unix close`.
        #[serde(default)]
        external_unix_close: bool,
        /// `--parent`: an incremental snapshot on this image.
        #[serde(default)]
        parent: Option<PathBuf>,
        /// `--track`: the write tracking stays on the instance afterwards.
        #[serde(default)]
        track: bool,
        /// `--sync`: the image is on disk before it is in place.
        #[serde(default)]
        sync: bool,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub state: String,
    pub message: String,
    /// A snapshot's statistics, with its summary in `message` (supervisors
    /// of older appshot versions send the summary only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<Box<crate::supervisor::snapshots::Taken>>,
}

/// Bytes of memory saved so far, of `total`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Progress { progress: Progress },
    Reply(Reply),
}

/// The connection a request came on, for handlers that take long.
pub struct Peer<'a> {
    conn: &'a UnixStream,
    lost: Cell<bool>,
}

impl Peer<'_> {
    /// Sends a progress line; a peer that cannot take it counts as gone.
    pub fn progress(&self, done: u64, total: u64) {
        if self.lost.get() {
            return;
        }
        let line = serde_json::json!({ "progress": Progress { done, total } });
        let mut out = line.to_string().into_bytes();
        out.push(b'\n');
        if (&*self.conn).write_all(&out).is_err() {
            self.lost.set(true);
        }
    }

    /// Whether the requester closed its end (it exited or was killed).
    pub fn gone(&self) -> bool {
        if self.lost.get() {
            return true;
        }
        // A peek that neither waits nor consumes: end of file (or an error)
        // means the requester's end is closed; nothing to read means it is
        // still there, waiting for the reply.
        let mut byte = [0u8; 1];
        let gone = !matches!(
            recv(
                self.conn.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Ok(1..) | Err(Errno::EAGAIN | Errno::EINTR)
        );
        self.lost.set(gone);
        gone
    }
}

/// Why a peer may not use the control socket, or `None` if it may.
/// `lineage` is the peer's pid then its ancestors' (empty if the peer is
/// gone); `supervisors` are the supervisors of this run directory, the
/// serving one included.
pub fn refusal(uid: u32, me: u32, lineage: &[u32], supervisors: &BTreeSet<u32>) -> Option<String> {
    if uid != 0 && uid != me {
        return Some(format!("uid {uid} is neither root nor {me}"));
    }
    let Some(&pid) = lineage.first() else {
        return Some("the peer's process is gone or not visible".into());
    };
    match lineage.iter().find(|p| supervisors.contains(p)) {
        Some(&s) if s == pid => Some(format!("pid {pid} is a supervisor")),
        Some(&s) => Some(format!("pid {pid} runs under the supervisor {s}")),
        None => None,
    }
}

/// `pid` and its ancestors up to (not including) PID 1 or the first that
/// cannot be read; empty if `pid` itself cannot be read.
fn lineage(pid: u32) -> Vec<u32> {
    let mut chain = Vec::new();
    let mut next = pid;
    while next > 1 && chain.len() < MAX_LINEAGE {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{next}/stat")) else {
            break;
        };
        chain.push(next);
        next = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
    }
    chain
}

/// Serves requests on `dir/control.sock` until the process exits, each
/// connection on a thread of its own (a snapshot takes long, and `ps`
/// must still get an answer meanwhile). `run_dir`'s registry names the
/// supervisors whose processes are refused.
pub fn serve(
    dir: &Path,
    run_dir: &Path,
    handler: impl Fn(Request, &Peer) -> Reply + Send + Sync + 'static,
) -> Result<(), RuntimeError> {
    serve_until(dir, run_dir, handler, Arc::new(AtomicBool::new(false)))
}

/// [`serve`] until `stop` is set, for a service that outlives the instance
/// (the OCI agent): the accepting thread ends at its next connection, which
/// the service makes itself after setting `stop`.
pub fn serve_until(
    dir: &Path,
    run_dir: &Path,
    handler: impl Fn(Request, &Peer) -> Reply + Send + Sync + 'static,
    stop: Arc<AtomicBool>,
) -> Result<(), RuntimeError> {
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).map_err(|e| RuntimeError::file(FileOp::Bind, &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::file(FileOp::Chmod, &path, e))?;
    // Cached, and without the liveness filter of a plain read: `ps` asks
    // every supervisor in turn, and each answer must not cost a read of
    // every instance. A dead supervisor's pid that lingers until the next
    // transaction reclaims it can only refuse more.
    let mut registry = CachedRegistry::new(Registry::open(run_dir)?);
    let me = nix::unistd::geteuid().as_raw();
    let handler = Arc::new(handler);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let cred = match getsockopt(&conn, sockopt::PeerCredentials) {
                Ok(c) => c,
                Err(e) => {
                    warn!("control socket: no peer credentials: {e}");
                    continue;
                }
            };
            let mut supervisors: BTreeSet<u32> = match registry.get() {
                Ok(state) => state.instances.values().map(|i| i.supervisor_pid).collect(),
                Err(e) => {
                    warn!(
                        pid = cred.pid(),
                        "control socket: reading the registry: {e}"
                    );
                    continue;
                }
            };
            supervisors.insert(std::process::id());
            let peer_pid = u32::try_from(cred.pid()).unwrap_or(0);
            let lineage = if peer_pid == 0 {
                Vec::new()
            } else {
                lineage(peer_pid)
            };
            if let Some(why) = refusal(cred.uid(), me, &lineage, &supervisors) {
                warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "control socket: peer refused: {why}"
                );
                continue;
            }
            let handler = Arc::clone(&handler);
            let spawned = std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    if let Err(e) = answer(&conn, &*handler) {
                        debug!("control connection: {e}");
                    }
                });
            if let Err(e) = spawned {
                warn!("control socket: no thread for a connection: {e}");
            }
        }
    });
    Ok(())
}

fn answer(conn: &UnixStream, handler: &impl Fn(Request, &Peer) -> Reply) -> std::io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    conn.set_write_timeout(Some(PROGRESS_WRITE_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_REQUEST)).read_line(&mut line)?;
    let peer = Peer {
        conn,
        lost: Cell::new(false),
    };
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler(req, &peer),
        Err(e) => Reply {
            snapshot: None,
            ok: false,
            state: String::new(),
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&*conn).write_all(&out)
}

/// Sends one request to the instance whose directory is `dir`.
pub fn request(dir: &Path, req: &Request) -> Result<Reply, RuntimeError> {
    request_with_progress(dir, req, CLIENT_TIMEOUT, |_| {})
}

/// Sends one request and returns its reply, passing the progress lines
/// before it to `progress`; waits at most `idle` for each line.
/// How a request that SIGINT, SIGTERM or SIGHUP may withdraw ended.
pub enum Answered {
    /// The supervisor's reply; `interrupted` if a signal withdrew the
    /// request meanwhile (the reply then says what happened regardless).
    Reply { reply: Reply, interrupted: bool },
    /// A signal withdrew the request, and the supervisor closed the
    /// connection without a reply.
    Withdrawn,
}

/// [`request_with_progress`] for a request the operator may withdraw with
/// Ctrl-C (or SIGTERM, SIGHUP): the signal withdraws it instead of killing
/// the command, and the command still reads the supervisor's answer, so it
/// can say whether the request was abandoned or had already finished.
pub fn request_interruptible(
    dir: &Path,
    req: &Request,
    idle: Duration,
    progress: impl FnMut(Progress),
) -> Result<Answered, RuntimeError> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut signals = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(s);
    }
    let mut previous = SigSet::empty();
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), Some(&mut previous))
        .map_err(|e| RuntimeError::sys("blocking SIGINT", e))?;
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let withdraw: std::sync::Arc<std::sync::Mutex<Option<UnixStream>>> = Default::default();
    {
        let interrupted = std::sync::Arc::clone(&interrupted);
        let withdraw = std::sync::Arc::clone(&withdraw);
        // The mask is inherited: only this thread takes the signals.
        std::thread::spawn(move || {
            if signals.wait().is_ok() {
                interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
                if let Some(conn) = withdraw.lock().expect("withdraw lock").as_ref() {
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                }
            }
        });
    }
    let result = request_on(dir, req, idle, progress, |conn| {
        *withdraw.lock().expect("withdraw lock") = conn.try_clone().ok();
    });
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&previous), None);
    let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
    match result {
        Ok(reply) => Ok(Answered::Reply { reply, interrupted }),
        Err(_) if interrupted => Ok(Answered::Withdrawn),
        Err(e) => Err(e),
    }
}

pub fn request_with_progress(
    dir: &Path,
    req: &Request,
    idle: Duration,
    progress: impl FnMut(Progress),
) -> Result<Reply, RuntimeError> {
    request_on(dir, req, idle, progress, |_| {})
}

/// Sends `req`, hands the connection to `connected`, then reads progress
/// lines until the reply.
fn request_on(
    dir: &Path,
    req: &Request,
    idle: Duration,
    mut progress: impl FnMut(Progress),
    connected: impl FnOnce(&UnixStream),
) -> Result<Reply, RuntimeError> {
    let path: PathBuf = dir.join(SOCKET_NAME);
    let io = |step: ControlStep| {
        let path = path.clone();
        move |error: std::io::Error| RuntimeError::ControlIo { path, step, error }
    };
    let mut conn = UnixStream::connect(&path).map_err(io(ControlStep::Connect))?;
    conn.set_read_timeout(Some(idle))
        .map_err(io(ControlStep::Connect))?;
    let mut msg = serde_json::to_vec(req).expect("serialisable");
    msg.push(b'\n');
    conn.write_all(&msg).map_err(io(ControlStep::Send))?;
    connected(&conn);
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        let n = (&mut reader)
            .take(MAX_REQUEST)
            .read_line(&mut line)
            .map_err(io(ControlStep::Receive))?;
        if n == 0 {
            return Err(RuntimeError::ControlClosed { path });
        }
        let parsed = serde_json::from_str(&line).map_err(|error| RuntimeError::ControlReply {
            path: path.clone(),
            error,
        })?;
        match parsed {
            Line::Progress { progress: p } => progress(p),
            Line::Reply(reply) => return Ok(reply),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_request_names_the_socket_and_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let err = request(dir.path(), &Request::Status).unwrap_err();
        assert!(
            matches!(
                &err,
                RuntimeError::ControlIo {
                    step: ControlStep::Connect,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = crate::error::chain(&err);
        assert!(
            text.contains(SOCKET_NAME) && text.contains("connecting"),
            "{text}"
        );

        // A supervisor that answers garbage, then one that hangs up.
        let listener = UnixListener::bind(dir.path().join(SOCKET_NAME)).unwrap();
        let server = std::thread::spawn(move || {
            for answer in [&b"not json\n"[..], b""] {
                let (conn, _) = listener.accept().unwrap();
                BufReader::new(&conn).read_line(&mut String::new()).unwrap();
                (&conn).write_all(answer).unwrap();
            }
        });
        let garbage = request(dir.path(), &Request::Status).unwrap_err();
        assert!(
            matches!(garbage, RuntimeError::ControlReply { .. }),
            "{garbage:?}"
        );
        let closed = request(dir.path(), &Request::Status).unwrap_err();
        assert!(
            matches!(closed, RuntimeError::ControlClosed { .. }),
            "{closed:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn supervisors_and_their_descendants_are_refused() {
        let supervisors: BTreeSet<u32> = [100, 200].into();
        // A CLI started from a shell.
        assert_eq!(refusal(0, 0, &[500, 400, 300], &supervisors), None);
        // The supervisor itself, and an application under another one
        // (app, then its namespace init, then the supervisor).
        assert!(refusal(0, 0, &[200, 50], &supervisors).is_some_and(|w| w.contains("200")));
        let why = refusal(0, 0, &[202, 201, 200, 50], &supervisors).expect("refused");
        assert!(why.contains("202") && why.contains("200"), "{why}");
        // A peer gone before it could be looked at.
        assert!(refusal(0, 0, &[], &supervisors).is_some());
        // Another user, however it was started.
        assert!(refusal(1000, 0, &[500], &supervisors).is_some());
        assert_eq!(refusal(1000, 1000, &[500], &supervisors), None);
    }
}
