//! `appshot vpm agent`: answers other hosts' negotiations from this host's
//! registry. One thread per connection, bounded in number overall and per
//! peer, with read deadlines, so garbage or a slow peer can neither crash
//! nor stall it. Which frames are served is decided by
//! `appshot_vpm::remote::AgentCore`; this module is its sockets.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use appshot_vpm::remote::{self, AgentCore, Answer, ReadError, Refusal, Request};
use appshot_vpm::{CachedRegistry, Registry, Route};
use tracing::{debug, info, warn};

use crate::net::remote::{
    agent_key_file, load_key, now_ms, records_dir, NegotiationRecord, RecordLog,
};

/// Connections served at once, and from one peer address (all supervisors
/// of a client host share the latter; each keeps at most two idle).
const MAX_CONNECTIONS: usize = 512;
const MAX_PER_PEER: usize = 64;
/// A peer must send a complete, authentic first frame within this; a
/// frame's body must follow its header within it too.
const FIRST_FRAME: Duration = Duration::from_secs(2);
/// An authenticated peer may keep its connection idle this long between
/// requests (clients pool connections, and drop them after 5 s).
const IDLE: Duration = Duration::from_secs(10);

pub struct AgentArgs {
    pub listen: SocketAddr,
    pub key_file: Option<PathBuf>,
    pub run_dir: PathBuf,
}

struct Shared {
    core: Mutex<AgentCore>,
    registry: Mutex<CachedRegistry>,
    pick: AtomicUsize,
    records: Arc<RecordLog>,
    active: Mutex<HashMap<IpAddr, usize>>,
}

/// Why the agent did not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Cluster(#[from] crate::net::remote::ClusterError),
    #[error(transparent)]
    Vpm(#[from] appshot_vpm::VpmError),
    #[error("agent: listening on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        error: std::io::Error,
    },
}

/// Runs the agent in the foreground until it is killed.
pub fn run(args: AgentArgs) -> Result<i32, AgentError> {
    let key_path = agent_key_file(args.key_file)?;
    let key = load_key(&key_path)?;
    let registry = Registry::open(&args.run_dir)?;
    let listener = TcpListener::bind(args.listen).map_err(|error| AgentError::Listen {
        addr: args.listen,
        error,
    })?;
    let shared = Arc::new(Shared {
        core: Mutex::new(AgentCore::new(key)),
        registry: Mutex::new(CachedRegistry::new(registry)),
        pick: AtomicUsize::new(0),
        records: RecordLog::new(records_dir(&args.run_dir).join("agent.json")),
        active: Mutex::new(HashMap::new()),
    });
    info!(
        listen = %args.listen,
        key = %key_path.display(),
        run_dir = %args.run_dir.display(),
        "agent listening"
    );
    serve(listener, shared);
    Ok(0)
}

fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if !admit(&shared, peer.ip()) {
            warn!(%peer, "agent: too many connections; closed");
            continue;
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                connection(&conn_shared, stream, peer);
                release(&conn_shared, peer.ip());
            });
        if let Err(e) = spawned {
            warn!(%peer, "agent: cannot start a connection thread: {e}");
            release(&shared, peer.ip());
        }
    }
}

fn admit(shared: &Shared, ip: IpAddr) -> bool {
    let mut active = shared.active.lock().expect("connection table lock");
    let total: usize = active.values().sum();
    let mine = active.entry(ip).or_insert(0);
    if total >= MAX_CONNECTIONS || *mine >= MAX_PER_PEER {
        if *mine == 0 {
            active.remove(&ip);
        }
        return false;
    }
    *mine += 1;
    true
}

fn release(shared: &Shared, ip: IpAddr) {
    let mut active = shared.active.lock().expect("connection table lock");
    if let Some(n) = active.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            active.remove(&ip);
        }
    }
}

fn connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(FIRST_FRAME));
    let mut authenticated = false;
    loop {
        let wait = if authenticated { IDLE } else { FIRST_FRAME };
        if stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        let frame = match remote::read_frame(&mut &stream) {
            Ok(f) => f,
            Err(ReadError::Closed) => return,
            Err(ReadError::Io(e)) => {
                debug!(%peer, "agent: connection ended: {e}");
                return;
            }
            Err(ReadError::Decode(e)) => {
                refuse(shared, peer, &format!("malformed frame: {e}"));
                let _ = (&stream).write_all(&remote::message::deny_frame());
                return;
            }
        };
        let handled = {
            let mut core = shared.core.lock().expect("agent core lock");
            core.handle(&frame, now_ms(), |req| lookup(shared, req))
        };
        if (&stream).write_all(&handled.reply).is_err() {
            return;
        }
        match handled.outcome {
            Ok((req, answer)) => {
                authenticated = true;
                served(shared, peer, &req, answer);
            }
            Err(refusal) => {
                let why = match &refusal {
                    Refusal::Auth(remote::AuthError::BadMac) => {
                        "bad MAC (wrong cluster key?)".to_string()
                    }
                    other => other.to_string(),
                };
                refuse(shared, peer, &why);
                return;
            }
        }
    }
}

/// The answer of this host's registry, as for a local supervised client.
fn lookup(shared: &Shared, req: &Request) -> Answer {
    let pick = shared.pick.fetch_add(1, Ordering::Relaxed);
    let mut cache = shared.registry.lock().expect("registry cache lock");
    let state = match cache.get() {
        Ok(s) => s,
        Err(e) => {
            warn!("agent: registry unreadable, negotiation refused: {e}");
            return Answer::Refused;
        }
    };
    match state.route(req.protocol, req.dest, req.virtual_port, &req.aid, pick) {
        Route::To { real_port, .. } => Answer::Ack { real_port },
        Route::Refused => Answer::Refused,
        Route::PassThrough => Answer::NotMultiplexed,
    }
}

fn served(shared: &Shared, peer: SocketAddr, req: &Request, answer: Answer) {
    let (text, real_port) = match answer {
        Answer::Ack { real_port } => ("ack", Some(real_port)),
        Answer::Refused => ("refused", None),
        Answer::NotMultiplexed => ("not multiplexed", None),
    };
    info!(
        %peer,
        aid = %req.aid,
        dest = %req.dest,
        port = req.virtual_port,
        answer = text,
        real_port,
        "agent: negotiation"
    );
    shared.records.note(NegotiationRecord {
        side: "agent".into(),
        instance: None,
        peer: peer.ip().to_string(),
        dest: req.dest.to_string(),
        virtual_port: req.virtual_port,
        aid: req.aid.clone(),
        answer: text.into(),
        real_port,
        count: 1,
        last_unix_ms: now_ms(),
    });
}

fn refuse(shared: &Shared, peer: SocketAddr, why: &str) {
    warn!(%peer, "agent: negotiation refused: {why}");
    // Unauthenticated: nothing of the request is trustworthy enough to
    // show but the peer's address and the reason.
    shared.records.note(NegotiationRecord {
        side: "agent".into(),
        instance: None,
        peer: peer.ip().to_string(),
        dest: "-".into(),
        virtual_port: 0,
        aid: "?".into(),
        answer: format!("refused: {why}"),
        real_port: None,
        count: 1,
        last_unix_ms: now_ms(),
    });
}
