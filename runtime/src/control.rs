//! The per-instance control socket: `appshot ps` asks it for the state,
//! `appshot stop` asks it to stop. Only root or the supervisor's own user
//! may talk to it (checked with SO_PEERCRED on every connection).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::RuntimeError;

pub const SOCKET_NAME: &str = "control.sock";
const MAX_REQUEST: u64 = 4096;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// SIGTERM now, SIGKILL after `grace_secs`.
    Stop {
        grace_secs: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub state: String,
    pub message: String,
}

/// Serves requests on `dir/control.sock` until the process exits.
pub fn serve(
    dir: &Path,
    handler: impl Fn(Request) -> Reply + Send + 'static,
) -> Result<(), RuntimeError> {
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .map_err(|e| RuntimeError::sys(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| RuntimeError::sys(format!("chmod {}", path.display()), e))?;
    let me = nix::unistd::geteuid().as_raw();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let cred = match getsockopt(&conn, sockopt::PeerCredentials) {
                Ok(c) => c,
                Err(e) => {
                    warn!("control socket: no peer credentials: {e}");
                    continue;
                }
            };
            if cred.uid() != 0 && cred.uid() != me {
                warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "control socket: peer refused"
                );
                continue;
            }
            if let Err(e) = answer(&conn, &handler) {
                debug!("control connection: {e}");
            }
        }
    });
    Ok(())
}

fn answer(conn: &UnixStream, handler: &impl Fn(Request) -> Reply) -> std::io::Result<()> {
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler(req),
        Err(e) => Reply {
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
    let path: PathBuf = dir.join(SOCKET_NAME);
    let err = |message: String| RuntimeError::Control {
        path: path.clone(),
        message,
    };
    let mut conn = UnixStream::connect(&path).map_err(|e| err(e.to_string()))?;
    conn.set_read_timeout(Some(CLIENT_TIMEOUT))
        .map_err(|e| err(e.to_string()))?;
    let mut msg = serde_json::to_vec(req).map_err(|e| err(e.to_string()))?;
    msg.push(b'\n');
    conn.write_all(&msg).map_err(|e| err(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(conn.take(MAX_REQUEST))
        .read_line(&mut line)
        .map_err(|e| err(e.to_string()))?;
    serde_json::from_str(&line).map_err(|e| err(format!("bad reply: {e}")))
}
