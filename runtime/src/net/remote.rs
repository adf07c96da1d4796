//! The supervisor's side of cross-host multiplexing and of source rules:
//! the cluster settings resolved from config and environment, the
//! negotiation with a remote host's agent before a supervised client's
//! connect to it, the peer map that lets getpeername answer the virtual
//! port of a negotiated connection, and the records `appshot ports` shows.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use appshot_configurator::{AppConfig, Peer, SourceRule};
use appshot_vpm::remote::{self, Answer, ClusterKey, Exchange, KeyError, DEFAULT_AGENT_PORT};
use appshot_vpm::{Protocol, Registry};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::net::sourcerules::{self, Policy};

pub const KEY_FILE_ENV: &str = "APPSHOT_CLUSTER_KEY_FILE";
pub const AGENT_PORT_ENV: &str = "APPSHOT_AGENT_PORT";
pub const AGENT_TIMEOUT_ENV: &str = "APPSHOT_AGENT_TIMEOUT_MS";
/// Used when neither the config nor the environment names a key file, if
/// it exists.
pub const DEFAULT_KEY_FILE: &str = "/etc/appshot/cluster.key";
const DEFAULT_AGENT_TIMEOUT_MS: u64 = 300;
/// How long "no agent at this host" is believed: long enough that
/// ordinary outbound traffic is not slowed, short enough that a newly
/// started agent is found soon.
const NO_AGENT_TTL: Duration = Duration::from_secs(10);
/// Idle pooled connections are dropped well before the agent's own idle
/// timeout closes them; and few are kept, because the agent limits the
/// connections of one peer host, which all its supervisors share.
const POOL_IDLE: Duration = Duration::from_secs(5);
const POOL_KEPT: usize = 2;
const PEER_MAP_CAPACITY: usize = 4096;
/// Records older than this are not shown by `appshot ports`.
pub const RECORD_TTL: Duration = Duration::from_secs(600);
const RECORDS_KEPT: usize = 128;

/// Cross-host settings of one instance, resolved by the CLI from the
/// config, then the environment, then the defaults; carried to a detached
/// supervisor inside its launch description.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub source_rules: Vec<SourceRule>,
    pub default_aid: Option<String>,
    pub peers: Vec<Peer>,
    pub agent_port: u16,
    pub cluster_key_file: Option<PathBuf>,
    pub agent_timeout_ms: u64,
}

/// Why the cluster settings or key are not usable, naming the variable or
/// file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{name}={value:?}: not a number")]
    NotANumber { name: &'static str, value: String },
    #[error("{AGENT_PORT_ENV}={0}: not a port (1-65535)")]
    NotAPort(u64),
    #[error("{AGENT_TIMEOUT_ENV}={0}: expected 1 to 10000 ms")]
    Timeout(u64),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("no cluster key: give --key-file, set APPSHOT_CLUSTER_KEY_FILE, or create /etc/appshot/cluster.key (32+ random bytes)")]
    NoKey,
}

impl ClusterSettings {
    pub fn resolve(config: &AppConfig) -> Result<ClusterSettings, ClusterError> {
        let env_u64 = |name: &'static str| -> Result<Option<u64>, ClusterError> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| ClusterError::NotANumber { name, value: v }),
                Err(_) => Ok(None),
            }
        };
        let agent_port = match config.agent_port {
            Some(p) => p,
            None => match env_u64(AGENT_PORT_ENV)? {
                Some(p) => u16::try_from(p)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or(ClusterError::NotAPort(p))?,
                None => DEFAULT_AGENT_PORT,
            },
        };
        let agent_timeout_ms = match config.agent_timeout {
            Some(t) => t.as_millis() as u64,
            None => match env_u64(AGENT_TIMEOUT_ENV)? {
                Some(ms) if (1..=10_000).contains(&ms) => ms,
                Some(ms) => return Err(ClusterError::Timeout(ms)),
                None => DEFAULT_AGENT_TIMEOUT_MS,
            },
        };
        let cluster_key_file = config
            .cluster_key_file
            .clone()
            .or_else(|| std::env::var_os(KEY_FILE_ENV).map(PathBuf::from))
            .or_else(|| {
                let default = PathBuf::from(DEFAULT_KEY_FILE);
                default.exists().then_some(default)
            });
        if let Some(path) = &cluster_key_file {
            // Checked now, so that a bad key fails `appshot run` instead of
            // every negotiation later.
            ClusterKey::load(path)?;
        }
        Ok(ClusterSettings {
            source_rules: config.source_rules.clone(),
            default_aid: config.default_aid.clone(),
            peers: config.peers.clone(),
            agent_port,
            cluster_key_file,
            agent_timeout_ms,
        })
    }
}

/// One negotiation outcome as `appshot ports` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NegotiationRecord {
    /// `client` (this host asked) or `agent` (this host answered).
    pub side: String,
    /// The asking instance (client side).
    pub instance: Option<String>,
    /// Client side: the agent asked; agent side: the asking host.
    pub peer: String,
    pub dest: String,
    pub virtual_port: u16,
    pub aid: String,
    /// `ack`, `refused`, `not multiplexed`, `no agent`, `denied`, or the
    /// reason of an agent-side refusal.
    pub answer: String,
    pub real_port: Option<u16>,
    pub count: u64,
    pub last_unix_ms: u64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where negotiation records live: `RUN_DIR/remote/`.
pub fn records_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("remote")
}

/// Recent negotiation outcomes, written to a JSON file by a background
/// flusher so that recording never costs a connect any I/O.
pub struct RecordLog {
    path: PathBuf,
    entries: Mutex<BTreeMap<(String, String, u16, String), NegotiationRecord>>,
    dirty: AtomicBool,
}

impl RecordLog {
    pub fn new(path: PathBuf) -> Arc<RecordLog> {
        let log = Arc::new(RecordLog {
            path,
            entries: Mutex::new(BTreeMap::new()),
            dirty: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&log);
        let spawned = std::thread::Builder::new()
            .name("records".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                match weak.upgrade() {
                    Some(log) => log.flush(),
                    None => return,
                }
            });
        if let Err(e) = spawned {
            warn!("negotiation records will not be written: {e}");
        }
        log
    }

    pub fn note(&self, mut record: NegotiationRecord) {
        let key = (
            record.peer.clone(),
            record.dest.clone(),
            record.virtual_port,
            record.aid.clone(),
        );
        let mut entries = self.entries.lock().expect("records lock");
        if let Some(old) = entries.get(&key) {
            record.count = old.count + 1;
        }
        entries.insert(key, record);
        if entries.len() > RECORDS_KEPT {
            let oldest = entries
                .iter()
                .min_by_key(|(_, r)| r.last_unix_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                entries.remove(&k);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    pub fn flush(&self) {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let records: Vec<NegotiationRecord> = self
            .entries
            .lock()
            .expect("records lock")
            .values()
            .cloned()
            .collect();
        if let Err(e) = write_atomically(&self.path, &records) {
            debug!(path = %self.path.display(), "writing negotiation records: {e}");
        }
    }
}

fn write_atomically(path: &Path, records: &[NegotiationRecord]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(records).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

/// Every record under `RUN_DIR/remote/` younger than [`RECORD_TTL`].
pub fn read_records(run_dir: &Path) -> Vec<NegotiationRecord> {
    let Ok(entries) = std::fs::read_dir(records_dir(run_dir)) else {
        return Vec::new();
    };
    let oldest = now_ms().saturating_sub(RECORD_TTL.as_millis() as u64);
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let records: Vec<NegotiationRecord> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if records.iter().all(|r| r.last_unix_ms < oldest) {
            // Nothing left worth showing: a supervisor or agent long gone.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        out.extend(records.into_iter().filter(|r| r.last_unix_ms >= oldest));
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.last_unix_ms));
    out
}

/// What a negotiation decided for one connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Connect to the destination as the application named it.
    Plain,
    /// Connect to this address instead (same host, real port).
    To(SocketAddr),
    /// Fail the connect with ECONNREFUSED.
    Refused,
}

/// The remote half of an instance's multiplexer, plus its source rules.
pub struct Cluster {
    instance: String,
    aid: String,
    registry_dir: PathBuf,
    policy: Policy,
    client: Option<Client>,
    peer_map: Mutex<PeerMap>,
}

struct Client {
    key: ClusterKey,
    peers: Vec<Peer>,
    agent_port: u16,
    timeout: Duration,
    no_agent: Mutex<HashMap<SocketAddr, Instant>>,
    pool: Mutex<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
    records: Arc<RecordLog>,
}

/// (socket inode, real peer address) → virtual port, for getpeername of
/// negotiated connections; the registry only knows this host's ports.
#[derive(Default)]
struct PeerMap {
    map: HashMap<(u64, SocketAddr), u16>,
    order: VecDeque<(u64, SocketAddr)>,
}

impl PeerMap {
    fn insert(&mut self, key: (u64, SocketAddr), virtual_port: u16) {
        if self.map.insert(key, virtual_port).is_none() {
            self.order.push_back(key);
            if self.order.len() > PEER_MAP_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

impl Cluster {
    pub fn new(
        settings: &ClusterSettings,
        run_dir: &Path,
        instance: &str,
        aid: &str,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let client = match &settings.cluster_key_file {
            None => None,
            Some(path) => {
                let key = ClusterKey::load(path)?;
                Some(Client {
                    key,
                    peers: settings.peers.clone(),
                    agent_port: settings.agent_port,
                    timeout: Duration::from_millis(settings.agent_timeout_ms.max(1)),
                    no_agent: Mutex::new(HashMap::new()),
                    pool: Mutex::new(HashMap::new()),
                    records: RecordLog::new(
                        records_dir(run_dir).join(format!("client-{instance}.json")),
                    ),
                })
            }
        };
        Ok(Arc::new(Cluster {
            instance: instance.to_owned(),
            aid: aid.to_owned(),
            registry_dir: run_dir.to_path_buf(),
            policy: Policy {
                rules: settings.source_rules.clone(),
                default_aid: settings.default_aid.clone(),
            },
            client,
            peer_map: Mutex::new(PeerMap::default()),
        }))
    }

    /// Whether the instance's fixed ports are steered by source rules. The
    /// fixed port itself is then never a real port: traffic addressed to it
    /// must always meet the rules, never an instance directly.
    pub fn source_rules_active(&self) -> bool {
        self.policy.active()
    }

    /// After a bind of a multiplexed port: (re)install the instance's rules.
    pub fn after_bind(&self, registry: &Registry) {
        if self.policy.active() {
            sourcerules::refresh(registry, &self.policy, &self.instance, &self.aid);
        }
    }

    /// When the instance has ended: its chains go, its records are written.
    pub fn shutdown(&self) {
        if self.policy.active() {
            sourcerules::remove(&self.registry_dir, &self.instance);
        }
        if let Some(c) = &self.client {
            c.records.flush();
        }
    }

    /// Whether a connect to `ip` (not local) is negotiated first.
    pub fn negotiates(&self, ip: IpAddr) -> bool {
        self.client
            .as_ref()
            .is_some_and(|c| c.agent_for(ip).is_some())
    }

    pub fn remember_peer(&self, inode: u64, real: SocketAddr, virtual_port: u16) {
        self.peer_map
            .lock()
            .expect("peer map lock")
            .insert((inode, canonical(real)), virtual_port);
    }

    pub fn peer_virtual_port(&self, inode: u64, peer: SocketAddr) -> Option<u16> {
        let map = self.peer_map.lock().expect("peer map lock");
        if map.map.is_empty() {
            return None;
        }
        map.map.get(&(inode, canonical(peer))).copied()
    }

    pub fn has_peers(&self) -> bool {
        !self.peer_map.lock().expect("peer map lock").map.is_empty()
    }

    /// Asks the agent of `dest`'s host where `dest` leads, over
    /// `protocol`, for this instance's AID.
    pub fn negotiate(&self, protocol: Protocol, dest: SocketAddr) -> Route {
        let Some(client) = &self.client else {
            return Route::Plain;
        };
        let Some(agent) = client.agent_for(dest.ip()) else {
            return Route::Plain;
        };
        let (route, answer, real_port) = client.ask(agent, protocol, dest, &self.aid);
        client.records.note(NegotiationRecord {
            side: "client".into(),
            instance: Some(self.instance.clone()),
            peer: agent.to_string(),
            dest: dest.ip().to_string(),
            virtual_port: dest.port(),
            aid: self.aid.clone(),
            answer: answer.into(),
            real_port,
            count: 1,
            last_unix_ms: now_ms(),
        });
        route
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

impl Client {
    /// The agent that speaks for `ip`: a listed peer's, or with no peers
    /// listed, the one on `ip` itself.
    fn agent_for(&self, ip: IpAddr) -> Option<SocketAddr> {
        let ip = ip.to_canonical();
        if self.peers.is_empty() {
            return Some(SocketAddr::new(ip, self.agent_port));
        }
        self.peers
            .iter()
            .find(|p| p.addr.to_canonical() == ip)
            .map(|p| SocketAddr::new(ip, p.agent_port.unwrap_or(self.agent_port)))
    }

    fn ask(
        &self,
        agent: SocketAddr,
        protocol: Protocol,
        dest: SocketAddr,
        aid: &str,
    ) -> (Route, &'static str, Option<u16>) {
        {
            let mut no_agent = self.no_agent.lock().expect("no-agent cache lock");
            match no_agent.get(&agent) {
                Some(until) if *until > Instant::now() => return (Route::Plain, "no agent", None),
                Some(_) => {
                    no_agent.remove(&agent);
                }
                None => {}
            }
        }
        // A pooled connection may have been closed by the agent meanwhile;
        // one fresh attempt follows any failure on it, with a fresh nonce
        // in case the agent did see the first one.
        if let Some(stream) = self.pooled(agent) {
            let ex = Exchange::new(&self.key, protocol, dest.ip(), dest.port(), aid, now_ms());
            if let Ok(frame) = exchange(&stream, &ex.frame) {
                return self.conclude(agent, dest, stream, &ex, &frame);
            }
        }
        let ex = Exchange::new(&self.key, protocol, dest.ip(), dest.port(), aid, now_ms());
        let stream = match TcpStream::connect_timeout(&agent, self.timeout) {
            Ok(s) => s,
            Err(e) => {
                debug!(%agent, "no agent ({e}); connecting plainly for {NO_AGENT_TTL:?}");
                self.no_agent
                    .lock()
                    .expect("no-agent cache lock")
                    .insert(agent, Instant::now() + NO_AGENT_TTL);
                return (Route::Plain, "no agent", None);
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(self.timeout));
        let _ = stream.set_write_timeout(Some(self.timeout));
        match exchange(&stream, &ex.frame) {
            Ok(frame) => self.conclude(agent, dest, stream, &ex, &frame),
            Err(e) => {
                // An agent is there but gave no answer: fail closed rather
                // than reach whatever holds the fixed port.
                warn!(%agent, %dest, "agent gave no answer ({e}): connect refused");
                (Route::Refused, "no answer", None)
            }
        }
    }

    fn conclude(
        &self,
        agent: SocketAddr,
        dest: SocketAddr,
        stream: TcpStream,
        ex: &Exchange,
        frame: &[u8],
    ) -> (Route, &'static str, Option<u16>) {
        match ex.answer(&self.key, frame) {
            Ok(answer) => {
                let mut pool = self.pool.lock().expect("pool lock");
                let idle = pool.entry(agent).or_default();
                if idle.len() < POOL_KEPT {
                    idle.push((stream, Instant::now()));
                }
                drop(pool);
                match answer {
                    Answer::Ack { real_port } => {
                        info!(%dest, %agent, real_port, "negotiated");
                        let mut real = dest;
                        real.set_port(real_port);
                        (Route::To(real), "ack", Some(real_port))
                    }
                    Answer::Refused => {
                        info!(%dest, %agent, "negotiation refused: no instance of this AID there");
                        (Route::Refused, "refused", None)
                    }
                    Answer::NotMultiplexed => (Route::Plain, "not multiplexed", None),
                }
            }
            Err(e) => {
                warn!(%agent, %dest, "negotiation denied or unauthenticated ({e}); cluster keys may differ: connect refused");
                (Route::Refused, "denied", None)
            }
        }
    }

    fn pooled(&self, agent: SocketAddr) -> Option<TcpStream> {
        let mut pool = self.pool.lock().expect("pool lock");
        let streams = pool.get_mut(&agent)?;
        while let Some((s, since)) = streams.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some(s);
            }
        }
        None
    }
}

fn exchange(mut stream: &TcpStream, request: &[u8]) -> Result<Vec<u8>, remote::ReadError> {
    stream.write_all(request)?;
    remote::read_frame(&mut stream)
}

/// Reads the cluster key and says why not, naming the file.
pub fn load_key(path: &Path) -> Result<ClusterKey, ClusterError> {
    let key = ClusterKey::load(path)?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(path = %path.display(), "cluster key file is readable by group or others; chmod 600 it");
        }
    }
    Ok(key)
}

/// The key file the agent uses: `--key-file`, else the environment, else
/// the default path.
pub fn agent_key_file(flag: Option<PathBuf>) -> Result<PathBuf, ClusterError> {
    flag.or_else(|| std::env::var_os(KEY_FILE_ENV).map(PathBuf::from))
        .or_else(|| {
            let default = PathBuf::from(DEFAULT_KEY_FILE);
            default.exists().then_some(default)
        })
        .ok_or(ClusterError::NoKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(peers: Vec<Peer>) -> Client {
        Client {
            key: ClusterKey::from_bytes(vec![1; 32], Path::new("k")).unwrap(),
            peers,
            agent_port: 7946,
            timeout: Duration::from_millis(300),
            no_agent: Mutex::new(HashMap::new()),
            pool: Mutex::new(HashMap::new()),
            records: RecordLog::new(std::env::temp_dir().join("appshot-unit-records.json")),
        }
    }

    #[test]
    fn without_peers_every_destination_is_asked_on_the_agent_port() {
        let c = client(Vec::new());
        assert_eq!(
            c.agent_for("10.200.1.1".parse().unwrap()),
            Some("10.200.1.1:7946".parse().unwrap())
        );
        assert_eq!(
            c.agent_for("::ffff:10.200.1.1".parse().unwrap()),
            Some("10.200.1.1:7946".parse().unwrap())
        );
    }

    #[test]
    fn with_peers_only_they_are_asked_each_on_its_port() {
        let c = client(vec![
            "10.200.1.1:7000".parse().unwrap(),
            "10.200.1.2".parse().unwrap(),
        ]);
        assert_eq!(
            c.agent_for("10.200.1.1".parse().unwrap()),
            Some("10.200.1.1:7000".parse().unwrap())
        );
        assert_eq!(
            c.agent_for("10.200.1.2".parse().unwrap()),
            Some("10.200.1.2:7946".parse().unwrap())
        );
        assert_eq!(c.agent_for("10.200.1.3".parse().unwrap()), None);
    }

    #[test]
    fn the_peer_map_is_bounded_and_keyed_by_socket() {
        let mut m = PeerMap::default();
        let a: SocketAddr = "10.200.1.1:20001".parse().unwrap();
        m.insert((1, a), 9000);
        assert_eq!(m.map.get(&(1, a)), Some(&9000));
        assert_eq!(m.map.get(&(2, a)), None);
        for i in 0..PEER_MAP_CAPACITY as u64 + 10 {
            m.insert((100 + i, a), 9000);
        }
        assert_eq!(m.map.len(), PEER_MAP_CAPACITY);
        assert_eq!(m.map.get(&(1, a)), None, "oldest evicted");
    }

    #[test]
    fn records_count_repeats_and_stay_bounded() {
        let run_dir = tempfile_dir();
        let dir = records_dir(&run_dir);
        let log = RecordLog::new(dir.join("client-x.json"));
        let rec = |port: u16, ms: u64| NegotiationRecord {
            side: "client".into(),
            instance: Some("x".into()),
            peer: "10.200.1.1:7946".into(),
            dest: "10.200.1.1".into(),
            virtual_port: port,
            aid: "a".into(),
            answer: "ack".into(),
            real_port: Some(20001),
            count: 1,
            last_unix_ms: ms,
        };
        let now = now_ms();
        log.note(rec(9000, now));
        log.note(rec(9000, now));
        for p in 0..RECORDS_KEPT as u16 + 5 {
            log.note(rec(10000 + p, now + 1 + u64::from(p)));
        }
        log.flush();
        let read: Vec<NegotiationRecord> =
            serde_json::from_slice(&std::fs::read(dir.join("client-x.json")).unwrap()).unwrap();
        assert_eq!(read.len(), RECORDS_KEPT);
        assert!(
            read.iter().all(|r| r.virtual_port != 9000),
            "oldest evicted"
        );
        let shown = read_records(&run_dir);
        assert_eq!(shown.len(), RECORDS_KEPT);
        assert!(
            shown[0].last_unix_ms >= shown[1].last_unix_ms,
            "newest first"
        );
        let _ = std::fs::remove_dir_all(&run_dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("appshot-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
