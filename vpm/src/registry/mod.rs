//! Host-wide state shared by independent supervisor processes: a SQLite
//! database (`store`) whose writers are serialised by an flock, plus one
//! liveness lock per instance.
//!
//! The run directory and everything in it is its owner's alone (0700 and
//! 0600): any user who could open `registry.lock` could flock it (a
//! read-only descriptor suffices) and stall every supervisor, whose port
//! allocations run under that lock, and the database holds the instances'
//! command lines.

mod cache;
mod liveness;
mod own;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use cache::CachedRegistry;
pub use liveness::{is_alive, InstanceLock, PendingRecord};

use crate::error::VpmError;
use crate::translation::{InstanceRecord, Protocol, RegistryState, SourceRuleRecord, Translation};
use own::OwnRecords;
use store::{Changes, Db, Snapshot};

const LOCK_FILE: &str = "registry.lock";
/// The JSON registry of earlier versions, migrated into the database when
/// the database is created.
const LEGACY_STATE_FILE: &str = "registry.json";
const LEGACY_STAGING_FILE: &str = "registry.json.tmp";
const INSTANCES_DIR: &str = "instances";
/// How often (seconds) a transaction probes every instance's liveness lock
/// instead of trusting that a holder whose pid exists is alive: a pid
/// reused by another process would otherwise keep a dead instance's
/// entries for good.
const FULL_SCAN_SECS: i64 = 30;

/// Called with the registry directory and the names of the instances a
/// transaction reclaimed, so that state kept outside the registry (the
/// kernel's nftables chains of source rules) goes with them.
pub type ReclaimHook = fn(&Path, &[String]);

static RECLAIM_HOOK: OnceLock<ReclaimHook> = OnceLock::new();

/// Installs the process-wide reclaim hook; the first call wins.
pub fn set_reclaim_hook(hook: ReclaimHook) {
    let _ = RECLAIM_HOOK.set(hook);
}

/// Told, under the registry lock and after the commit, that the set of UDP
/// translations changed, with the state just committed: kernel rules that
/// route datagrams are rebuilt from it (the datagram path has no
/// supervisor to ask the registry).
pub type UdpChangeHook = fn(&Path, &RegistryState);

static UDP_CHANGE_HOOK: OnceLock<UdpChangeHook> = OnceLock::new();

/// Installs the process-wide UDP change hook; the first call wins.
pub fn set_udp_change_hook(hook: UdpChangeHook) {
    let _ = UDP_CHANGE_HOOK.set(hook);
}

/// Told, as the UDP change hook is, that the TCP translations or the
/// damaged instances changed, with the state the transaction began from and
/// the one it committed: the kernel's connect and name routes of the
/// instances that leave those calls to it follow the difference.
pub type TcpChangeHook = fn(&Path, &RegistryState, &RegistryState);

static TCP_CHANGE_HOOK: OnceLock<TcpChangeHook> = OnceLock::new();

/// Installs the process-wide TCP change hook; the first call wins.
pub fn set_tcp_change_hook(hook: TcpChangeHook) {
    let _ = TCP_CHANGE_HOOK.set(hook);
}

#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
    store: Arc<Connections>,
}

/// A handle's database connections, opened on first use: one for writers
/// and one for readers, so that a read inside a transaction's closure sees
/// the last commit instead of waiting for the transaction.
#[derive(Debug, Default)]
struct Connections {
    writer: Mutex<Option<Db>>,
    reader: Mutex<Option<Db>>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a transaction rolled it back: the connection is sound.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every instance name's rows, grouped, for telling which instances a
/// transaction changed.
type Grouped<'a> = BTreeMap<
    &'a str,
    (
        Option<&'a InstanceRecord>,
        Vec<&'a Translation>,
        Vec<&'a SourceRuleRecord>,
    ),
>;

fn grouped(state: &RegistryState) -> Grouped<'_> {
    let mut groups = Grouped::new();
    for (name, record) in &state.instances {
        groups.entry(name).or_default().0 = Some(record);
    }
    for t in &state.translations {
        groups.entry(&t.owner).or_default().1.push(t);
    }
    for r in &state.source_rules {
        groups.entry(&r.owner).or_default().2.push(r);
    }
    groups
}

/// The instances whose records differ between `before` and `after`.
fn changed_owners(before: &RegistryState, after: &RegistryState) -> BTreeSet<String> {
    let (old, new) = (grouped(before), grouped(after));
    let mut changed: BTreeSet<String> = old
        .iter()
        .filter(|(name, rows)| new.get(*name) != Some(rows))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    changed.extend(
        new.keys()
            .filter(|name| !old.contains_key(*name))
            .map(|name| (*name).to_owned()),
    );
    changed
}

/// The translations of `protocol` of `owners`: only a change of these calls
/// its change hook.
fn of<'a>(
    state: &'a RegistryState,
    protocol: Protocol,
    owners: &BTreeSet<String>,
) -> Vec<&'a Translation> {
    state
        .translations
        .iter()
        .filter(|t| t.protocol == protocol && owners.contains(&t.owner))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether process `pid` (in this PID namespace) is running: it exists and
/// has not exited (a killed supervisor stays a zombie until its parent
/// reaps it, but its pidfd already reads as exited).
fn pid_running(pid: u32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let Ok(pidfd) = appshot_sys::pidfd::open_process(pid) else {
        return false;
    };
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(0) => true,
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN)),
        // Undecidable: the caller probes the lock instead.
        Err(_) => false,
    }
}

/// What a transaction hands to the hooks once it has committed.
struct Committed<R> {
    result: R,
    reclaimed: Vec<String>,
    udp: Option<RegistryState>,
    /// Before and after.
    tcp: Option<(RegistryState, RegistryState)>,
}

impl Registry {
    /// Opens the registry in `dir`, creating it (and its `instances`
    /// directory) accessible to its owner only. An existing registry left
    /// accessible to others by an older version is made private, if it is
    /// ours. The database itself is opened (and created) on first use.
    pub fn open(dir: &Path) -> Result<Registry, VpmError> {
        private_dir(dir, true).map_err(VpmError::io(dir))?;
        let instances = dir.join(INSTANCES_DIR);
        private_dir(&instances, false).map_err(VpmError::io(&instances))?;
        for name in [
            LOCK_FILE,
            store::DB_FILE,
            store::WAL_FILE,
            store::SHM_FILE,
            store::CHANGES_FILE,
            LEGACY_STATE_FILE,
        ] {
            let path = dir.join(name);
            private_file(&path).map_err(VpmError::io(&path))?;
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            store: Arc::default(),
        })
    }

    /// The directory `name` inside the run directory (e.g. the instances'
    /// logs), created or made accessible to its owner only.
    pub fn private_subdir(&self, name: &str) -> Result<PathBuf, VpmError> {
        let path = self.dir.join(name);
        private_dir(&path, false).map_err(VpmError::io(&path))?;
        Ok(path)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens this handle's database connections now rather than at their
    /// first use, for a supervisor started ahead of its instance (an
    /// instance shell). Commits nothing. While a connection is open the
    /// write-ahead log stays: the last connection to close checkpoints it
    /// and deletes it, and the next writer then creates it again with two
    /// fsyncs (the log's header and the directory), measured at 1–3 ms on
    /// this project's machines, on the path of a clone's start.
    pub fn prepare(&self) -> Result<(), VpmError> {
        {
            let _held = self.lock()?;
            let mut slot = locked(&self.store.writer);
            self.writer_db(&mut slot)?;
        }
        let mut slot = locked(&self.store.reader);
        self.read_snapshot(&mut slot)?;
        Ok(())
    }

    /// Runs `f` on the current state with every other writer on the host
    /// excluded, after dropping instances whose supervisor has died, and
    /// commits the rows of the instances whose records changed.
    pub fn transaction<R>(&self, f: impl FnOnce(&mut RegistryState) -> R) -> Result<R, VpmError> {
        let held = self.lock()?;
        self.transaction_locked(&held, None, f)
    }

    /// [`Registry::transaction`] for a caller that already holds the
    /// registry lock. `fresh` names an instance whose lock was just taken:
    /// it is recorded as held by this process, its own copy, if any, is a
    /// dead predecessor's and is rewritten from what `f` leaves.
    fn transaction_locked<R>(
        &self,
        _held: &Flock<File>,
        fresh: Option<&str>,
        f: impl FnOnce(&mut RegistryState) -> R,
    ) -> Result<R, VpmError> {
        let mut slot = locked(&self.store.writer);
        let db = self.writer_db(&mut slot)?;
        let full_due = unix_now() - store::last_full_scan(db)? >= FULL_SCAN_SECS;
        let committed = db.write(|snapshot| {
            let before = &snapshot.state;
            let mut state = before.clone();
            let live = self.live_names(snapshot, full_due);
            let reclaimed = self.reclaim(&mut state, &live);
            let result = f(&mut state);
            let owners = changed_owners(before, &state);
            // Own copies first: a commit interrupted between the two leaves
            // a copy ahead of the database, which errs towards keeping a
            // translation should the database be lost.
            for name in &owners {
                let damaged = state.damaged.contains(name);
                if live.contains(name) && !damaged && Some(name.as_str()) != fresh {
                    own::write(
                        &self.instances_dir().join(name),
                        &OwnRecords::of(&state, name),
                    )?;
                }
            }
            if let Some(name) = fresh {
                own::write(
                    &self.instances_dir().join(name),
                    &OwnRecords::of(&state, name),
                )?;
            }
            let mut holders: BTreeMap<String, Option<u32>> =
                reclaimed.iter().map(|n| (n.clone(), None)).collect();
            if let Some(name) = fresh {
                holders.insert(name.to_owned(), Some(std::process::id()));
            }
            let forget: BTreeSet<&str> =
                reclaimed.iter().map(String::as_str).chain(fresh).collect();
            let damaged: Option<BTreeSet<String>> = state
                .damaged
                .iter()
                .any(|n| forget.contains(n.as_str()))
                .then(|| {
                    state
                        .damaged
                        .iter()
                        .filter(|n| !forget.contains(n.as_str()))
                        .cloned()
                        .collect()
                });
            let changed = |p| of(before, p, &owners) != of(&state, p, &owners);
            let udp = changed(Protocol::Udp).then(|| state.clone());
            let tcp = (changed(Protocol::Tcp) || damaged.is_some()).then(|| {
                let mut after = state.clone();
                if let Some(damaged) = &damaged {
                    after.damaged = damaged.clone();
                }
                (before.clone(), after)
            });
            let changes =
                (!owners.is_empty() || !holders.is_empty() || damaged.is_some() || full_due).then(
                    || Changes {
                        state: Some(state),
                        owners,
                        holders,
                        damaged,
                        full_scan: full_due.then(unix_now),
                    },
                );
            Ok((
                Committed {
                    result,
                    reclaimed,
                    udp,
                    tcp,
                },
                changes,
            ))
        })?;
        drop(slot);
        if let (false, Some(hook)) = (committed.reclaimed.is_empty(), RECLAIM_HOOK.get()) {
            // Under the registry lock, so a successor of the same name
            // cannot install its rules before the stale ones are gone.
            hook(&self.dir, &committed.reclaimed);
        }
        if let (Some(after), Some(hook)) = (&committed.udp, UDP_CHANGE_HOOK.get()) {
            hook(&self.dir, after);
        }
        if let (Some((before, after)), Some(hook)) = (&committed.tcp, TCP_CHANGE_HOOK.get()) {
            hook(&self.dir, before, after);
        }
        Ok(committed.result)
    }

    /// The writer's connection, reopened when the database was deleted or
    /// replaced, and created (migrating `registry.json`, or rebuilt from the
    /// live instances' own copies) when it is missing. Under the registry
    /// lock.
    fn writer_db<'a>(&self, slot: &'a mut Option<Db>) -> Result<&'a mut Db, VpmError> {
        if let Some(db) = slot.take() {
            if db.current()? {
                *slot = Some(db);
            } else {
                db.abandon();
            }
        }
        if slot.is_none() {
            let (db, created) = Db::open_for_writing(&self.db_path(), || self.initial_state())?;
            if created {
                let legacy = self.dir.join(LEGACY_STATE_FILE);
                match fs::remove_file(&legacy) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(VpmError::io(&legacy)(e))
                    }
                    _ => {}
                }
            }
            *slot = Some(db);
        }
        Ok(slot.as_mut().expect("opened above"))
    }

    /// What a new database starts with: an earlier version's
    /// `registry.json` if there is one, with every live instance's records
    /// made those of its own copy (the database was deleted, or never was).
    fn initial_state(&self) -> Result<RegistryState, VpmError> {
        let legacy = self.dir.join(LEGACY_STATE_FILE);
        let mut state = match fs::read(&legacy) {
            Ok(bytes) => {
                let state: RegistryState = parse_json(&legacy, &bytes)?;
                tracing::info!(from = %legacy.display(), to = %self.db_path().display(), "migrating the registry");
                state
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => RegistryState::default(),
            Err(e) => return Err(VpmError::io(&legacy)(e)),
        };
        let live = self.live_instances()?;
        let found = own::reconcile(&mut state, &live);
        found.report(&self.db_path(), true);
        state.damaged = found.damaged.into_keys().collect();
        let live: BTreeSet<String> = live.into_iter().map(|(name, _)| name).collect();
        for name in owners(&state) {
            if !live.contains(&name) {
                state.remove_instance(&name);
            }
        }
        Ok(state)
    }

    /// Records that this process no longer holds the liveness lock of
    /// `name` (an OCI agent holds many and outlives each), so that the next
    /// transaction probes it instead of trusting the holder's pid.
    fn forget_holder(&self, _held: &Flock<File>, name: &str) -> Result<(), VpmError> {
        let mut slot = locked(&self.store.writer);
        let db = self.writer_db(&mut slot)?;
        db.write(|snapshot| {
            let changes = snapshot.holders.contains_key(name).then(|| Changes {
                holders: BTreeMap::from([(name.to_owned(), None)]),
                ..Changes::default()
            });
            Ok(((), changes))
        })?;
        Ok(())
    }

    /// For the new live holder of `name`: whatever an earlier instance of
    /// that name left behind (its supervisor died, and no transaction could
    /// reclaim it since, the name now being alive again) is removed, and the
    /// reclaim hook is told, so that state kept outside the registry goes
    /// too. Called under the registry lock, before the new holder records
    /// anything.
    fn forget_predecessor(&self, state: &mut RegistryState, name: &str) {
        if owners(state).contains(name) {
            let ports: Vec<String> = state
                .translations_of(name)
                .map(|t| {
                    format!(
                        "{} {}->{} ({})",
                        t.protocol, t.virtual_port, t.real_port, t.aid
                    )
                })
                .collect();
            tracing::warn!(
                instance = %name,
                ports = %ports.join(", "),
                "removing what a dead instance of the same name left behind"
            );
            state.remove_instance(name);
        }
        // Also without registry entries: a predecessor may have died
        // between installing its kernel rules and recording them.
        if let Some(hook) = RECLAIM_HOOK.get() {
            hook(&self.dir, &[name.to_owned()]);
        }
    }

    /// The last committed state, read without the registry lock and
    /// without waiting for a writer, minus instances whose supervisor has
    /// died since. A deleted database reads as what the live instances' own
    /// copies hold (the next transaction commits it).
    pub fn read(&self) -> Result<RegistryState, VpmError> {
        self.read_live().map(|(state, _)| state)
    }

    /// [`Registry::read`], and whether it left out dead instances.
    fn read_live(&self) -> Result<(RegistryState, bool), VpmError> {
        let mut slot = locked(&self.store.reader);
        let Some(snapshot) = self.read_snapshot(&mut slot)? else {
            drop(slot);
            return self.rebuilt_from_own_copies().map(|state| (state, false));
        };
        let mut state = snapshot.state.clone();
        let dead: Vec<String> = owners(&state)
            .into_iter()
            .filter(|name| !self.alive(&snapshot.holders, name, false))
            .collect();
        for name in &dead {
            state.remove_instance(name);
        }
        Ok((state, !dead.is_empty()))
    }

    /// [`Registry::read`], followed by a transaction when the read met
    /// instances whose supervisor has died, so that their entries (and what
    /// the reclaim hook removes with them, such as source rules in the
    /// kernel) go now rather than with the next change. Writes nothing
    /// while every instance is alive.
    pub fn read_reclaiming(&self) -> Result<RegistryState, VpmError> {
        match self.read_live()? {
            (_, true) => self.transaction(|s| s.clone()),
            (state, false) => Ok(state),
        }
    }

    /// The committed snapshot through the reader connection in `slot`,
    /// reopened if the database was replaced; `None`: there is none.
    fn read_snapshot<'a>(
        &self,
        slot: &'a mut Option<Db>,
    ) -> Result<Option<&'a Snapshot>, VpmError> {
        if let Some(db) = slot.take() {
            if db.current()? {
                *slot = Some(db);
            } else {
                db.abandon();
            }
        }
        if slot.is_none() {
            match Db::open_existing(&self.db_path())? {
                Some(db) => *slot = Some(db),
                None => return Ok(None),
            }
        }
        let db = slot.as_mut().expect("opened above");
        db.snapshot().map(Some)
    }

    /// The state as the live instances' own copies tell it, for a registry
    /// that is not there.
    fn rebuilt_from_own_copies(&self) -> Result<RegistryState, VpmError> {
        let mut state = RegistryState::default();
        let live = self.live_instances()?;
        let found = own::reconcile(&mut state, &live);
        found.report(&self.db_path(), true);
        state.damaged = found.damaged.into_keys().collect();
        Ok(state)
    }

    /// Every instance whose supervisor holds its liveness lock, with its own
    /// copy of its records as read.
    fn live_instances(&self) -> Result<Vec<own::Live>, VpmError> {
        let instances = self.instances_dir();
        let entries = match fs::read_dir(&instances) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(VpmError::io(&instances)(e)),
        };
        let mut live = Vec::new();
        for entry in entries {
            let dir = entry.map_err(VpmError::io(&instances))?.path();
            // A name that is not UTF-8 is no instance's: names are strings.
            let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if liveness::holder_alive(&dir) {
                live.push((name.to_owned(), own::read(&dir)));
            }
        }
        Ok(live)
    }

    /// Whether instance `name` is alive: its lock holder's process exists
    /// (a syscall, not a lock probe, which would need the lock file opened
    /// for every instance on every transaction), or, when that is not known
    /// or `full`, its lock is held.
    fn alive(&self, holders: &BTreeMap<String, u32>, name: &str, full: bool) -> bool {
        let presumed = !full && holders.get(name).is_some_and(|&pid| pid_running(pid));
        presumed || is_alive(&self.dir, name)
    }

    /// The names of the live instances among those with a directory or
    /// registry entries.
    fn live_names(&self, snapshot: &Snapshot, full: bool) -> BTreeSet<String> {
        let mut names = owners(&snapshot.state);
        if let Ok(entries) = fs::read_dir(self.instances_dir()) {
            names.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok()),
            );
        }
        names
            .into_iter()
            .filter(|name| self.alive(&snapshot.holders, name, full))
            .collect()
    }

    fn db_path(&self) -> PathBuf {
        self.dir.join(store::DB_FILE)
    }

    fn instances_dir(&self) -> PathBuf {
        self.dir.join(INSTANCES_DIR)
    }

    /// The host-wide writer lock; also serialises creation and removal of
    /// instance directories so a liveness probe never races them.
    fn lock(&self) -> Result<Flock<File>, VpmError> {
        let path = self.dir.join(LOCK_FILE);
        let mut file = open_lock_file(&path)?;
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(lock) => return Ok(lock),
                Err((again, Errno::EINTR)) => file = again,
                Err((_, errno)) => return Err(VpmError::io(&path)(errno.into())),
            }
        }
    }

    /// Removes the entries of every instance not in `live`, and the
    /// directories of those with no live holder; returns the names whose
    /// entries went.
    fn reclaim(&self, state: &mut RegistryState, live: &BTreeSet<String>) -> Vec<String> {
        let mut reclaimed = Vec::new();
        for name in owners(state) {
            if live.contains(&name) {
                continue;
            }
            let ports: Vec<String> = state
                .translations_of(&name)
                .map(|t| format!("{} {}->{}", t.protocol, t.virtual_port, t.real_port))
                .collect();
            tracing::warn!(
                instance = %name,
                ports = %ports.join(", "),
                "reclaiming stale instance whose supervisor is gone"
            );
            state.remove_instance(&name);
            reclaimed.push(name);
        }
        self.remove_dead_instance_dirs(live);
        reclaimed
    }

    /// Also covers supervisors that died before registering anything.
    fn remove_dead_instance_dirs(&self, live: &BTreeSet<String>) {
        let instances = self.instances_dir();
        let entries = match fs::read_dir(&instances) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(dir = %instances.display(), %error, "cannot list instance directories");
                return;
            }
        };
        for entry in entries.flatten() {
            let live = entry.file_name().to_str().is_some_and(|n| live.contains(n));
            let dir = entry.path();
            // Probed again: `live` may have trusted a pid.
            if live || liveness::holder_alive(&dir) {
                continue;
            }
            if let Err(error) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove stale instance directory");
            }
        }
    }
}

/// Writes `value` to `staging` then renames it over `path`, so readers see
/// the old file or the new one, never part of one. Not synced: these files
/// (an instance's own records) live only as long as the instance, which a
/// machine crash takes with it; a killed process loses nothing written.
fn write_atomically(staging: &Path, path: &Path, value: &impl Serialize) -> Result<(), VpmError> {
    write_staging(staging, value)?;
    fs::rename(staging, path).map_err(VpmError::io(path))
}

fn write_staging(staging: &Path, value: &impl Serialize) -> Result<(), VpmError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| VpmError::io(staging)(e.into()))?;
    // A leftover of an interrupted commit keeps its mode when truncated;
    // created anew, the file gets 0600 and so does what it is renamed to.
    match fs::remove_file(staging) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(VpmError::io(staging)(e));
        }
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(staging)
        .map_err(VpmError::io(staging))?;
    file.write_all(&bytes).map_err(VpmError::io(staging))
}

/// What appshot keeps in a run directory (registry, instances, logs,
/// verified templates, negotiation records).
const RUN_DIR_ENTRIES: &[&str] = &[
    LOCK_FILE,
    store::DB_FILE,
    store::WAL_FILE,
    store::SHM_FILE,
    store::CHANGES_FILE,
    LEGACY_STATE_FILE,
    LEGACY_STAGING_FILE,
    INSTANCES_DIR,
    "logs",
    "verified",
    "remote",
    "sourcerules",
];

/// Creates directory `dir` with mode 0700 (missing parents with the
/// default mode), or makes an existing one of ours 0700. With `guard`, an
/// existing directory holding anything appshot does not keep there keeps
/// its mode, with a warning, as does one with the sticky bit (`/tmp`) or
/// of another owner: a run directory pointed at a shared directory must
/// not lock others out of it.
fn private_dir(dir: &Path, guard: bool) -> io::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)?;
    }
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a directory",
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let ours = meta.uid() == nix::unistd::geteuid().as_raw();
    let shared = mode & 0o1000 != 0;
    let registry_like = || -> io::Result<bool> {
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            if !RUN_DIR_ENTRIES.iter().any(|known| name == *known) {
                return Ok(false);
            }
        }
        Ok(true)
    };
    if ours && !shared && (!guard || registry_like()?) {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
    } else {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:o}"),
            "directory open to other users left as it is (not ours, sticky, or holding what appshot does not keep there): make it 0700 or use another run directory"
        );
        Ok(())
    }
}

/// Makes an existing file of ours 0600 (a missing one is created so later).
fn private_file(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let ours = meta.uid() == nix::unistd::geteuid().as_raw();
    if meta.is_file() && ours && meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn parse_json<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, VpmError> {
    serde_json::from_slice(bytes).map_err(|e| VpmError::Corrupt {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Every instance the state mentions, whether by record, translation or
/// source rule.
fn owners(state: &RegistryState) -> BTreeSet<String> {
    state
        .instances
        .keys()
        .chain(state.translations.iter().map(|t| &t.owner))
        .chain(state.source_rules.iter().map(|r| &r.owner))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests;

/// Opens (creating, never truncating) a file whose only use is to be
/// flocked; private, since anyone who can open it can hold the lock.
pub(crate) fn open_lock_file(path: &Path) -> Result<File, VpmError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(VpmError::io(path))
}
