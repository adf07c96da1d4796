//! Host-wide state shared by independent supervisor processes: a JSON file
//! replaced atomically under an flock, plus one liveness lock per instance.
//!
//! The run directory and everything in it is its owner's alone (0700 and
//! 0600): any user who could open `registry.lock` could flock it (a
//! read-only descriptor suffices) and stall every supervisor, whose port
//! allocations run under that lock, and `registry.json` holds the
//! instances' command lines.

mod cache;
mod liveness;
mod own;

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use cache::CachedRegistry;
pub use liveness::{is_alive, InstanceLock};

use crate::error::VpmError;
use crate::translation::{Protocol, RegistryState, Translation};
use own::OwnRecords;

const LOCK_FILE: &str = "registry.lock";
const STATE_FILE: &str = "registry.json";
const STAGING_FILE: &str = "registry.json.tmp";
const INSTANCES_DIR: &str = "instances";

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
/// translations changed, with the state before and the state just
/// committed: kernel rules that route datagrams are rebuilt from it (the
/// datagram path has no supervisor to ask the registry).
pub type UdpChangeHook = fn(&Path, &RegistryState, &RegistryState);

static UDP_CHANGE_HOOK: OnceLock<UdpChangeHook> = OnceLock::new();

/// Installs the process-wide UDP change hook; the first call wins.
pub fn set_udp_change_hook(hook: UdpChangeHook) {
    let _ = UDP_CHANGE_HOOK.set(hook);
}

fn udp_translations(state: &RegistryState) -> Vec<&Translation> {
    state
        .translations
        .iter()
        .filter(|t| t.protocol == Protocol::Udp)
        .collect()
}

#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    /// Opens the registry in `dir`, creating it (and its `instances`
    /// directory) accessible to its owner only. An existing registry left
    /// accessible to others by an older version is made private, if it is
    /// ours.
    pub fn open(dir: &Path) -> Result<Registry, VpmError> {
        private_dir(dir, true).map_err(VpmError::io(dir))?;
        let instances = dir.join(INSTANCES_DIR);
        private_dir(&instances, false).map_err(VpmError::io(&instances))?;
        for name in [LOCK_FILE, STATE_FILE] {
            let path = dir.join(name);
            private_file(&path).map_err(VpmError::io(&path))?;
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
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

    /// Runs `f` on the current state with every other writer on the host
    /// excluded, after dropping instances whose supervisor has died, and
    /// commits the result if anything changed.
    ///
    /// Live instances' records the registry has lost (or that differ from
    /// their own copies) are put back first, and the repair is committed.
    pub fn transaction<R>(&self, f: impl FnOnce(&mut RegistryState) -> R) -> Result<R, VpmError> {
        let held = self.lock()?;
        self.transaction_locked(&held, None, f)
    }

    /// [`Registry::transaction`] for a caller that already holds the
    /// registry lock. `fresh` names an instance whose lock was just taken:
    /// its own copy, if any, is a dead predecessor's and is not restored;
    /// the copy is rewritten from what `f` leaves.
    fn transaction_locked<R>(
        &self,
        _held: &Flock<File>,
        fresh: Option<&str>,
        f: impl FnOnce(&mut RegistryState) -> R,
    ) -> Result<R, VpmError> {
        let path = self.state_path();
        let committed = load(&path)?;
        let live = self.live_instances()?;
        let mut base = committed.clone();
        // Under the lock no commit is in flight: any difference is damage.
        let found = own::reconcile(
            &mut base,
            live.iter().filter(|(name, _)| Some(name.as_str()) != fresh),
        );
        found.report(&path, true);
        let mut state = base.clone();
        self.reclaim(&mut state);
        let result = f(&mut state);
        // Own copies first: a commit interrupted between the two leaves the
        // copies ahead, and the next load completes it from them.
        for (name, _) in &live {
            if found.damaged.contains_key(name) {
                // Rewriting it from a registry that lost it would make the
                // loss permanent; the damage lasts until the instance ends.
                continue;
            }
            let own = OwnRecords::of(&state, name);
            if Some(name.as_str()) == fresh || own != OwnRecords::of(&base, name) {
                let dir = self.instances_dir().join(name);
                own::write(&dir, &own)?;
            }
        }
        if state != committed {
            state.generation = committed.generation + 1;
            write_atomically(&self.dir.join(STAGING_FILE), &path, &state)?;
            if let (true, Some(hook)) = (
                udp_translations(&state) != udp_translations(&committed),
                UDP_CHANGE_HOOK.get(),
            ) {
                hook(&self.dir, &committed, &state);
            }
        }
        Ok(result)
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

    /// The last committed state without taking the lock (commits are atomic
    /// renames), minus instances whose supervisor has died since, plus live
    /// instances' records the registry has lost (put back in the returned
    /// state only; the next transaction commits the repair).
    pub fn read(&self) -> Result<RegistryState, VpmError> {
        let mut state = load(&self.state_path())?;
        let live = self.reconcile_read(&mut state, false)?;
        for name in owners(&state) {
            if !live.contains(&name) {
                state.remove_instance(&name);
            }
        }
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

    /// Holds `state`, as read without the lock, against the live
    /// instances' own records, and returns their names. `certain`: the
    /// caller knows the registry was damaged (it vanished, or its generation
    /// went backwards), so a difference is no commit in flight.
    fn reconcile_read(
        &self,
        state: &mut RegistryState,
        certain: bool,
    ) -> Result<BTreeSet<String>, VpmError> {
        let live = self.live_instances()?;
        let found = own::reconcile(state, &live);
        found.report(&self.state_path(), certain);
        state.damaged = found.damaged.into_keys().collect();
        Ok(live.into_iter().map(|(name, _)| name).collect())
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
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

    fn reclaim(&self, state: &mut RegistryState) {
        let mut reclaimed = Vec::new();
        for name in owners(state) {
            if is_alive(&self.dir, &name) {
                continue;
            }
            reclaimed.push(name.clone());
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
        }
        if let (false, Some(hook)) = (reclaimed.is_empty(), RECLAIM_HOOK.get()) {
            // Under the registry lock, so a successor of the same name
            // cannot install its rules before the stale ones are gone.
            hook(&self.dir, &reclaimed);
        }
        self.remove_dead_instance_dirs();
    }

    /// Also covers supervisors that died before registering anything.
    fn remove_dead_instance_dirs(&self) {
        let instances = self.instances_dir();
        let entries = match fs::read_dir(&instances) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(dir = %instances.display(), %error, "cannot list instance directories");
                return;
            }
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if liveness::holder_alive(&dir) {
                continue;
            }
            if let Err(error) = fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove stale instance directory");
            }
        }
    }
}

/// Writes `value` to `staging` then renames it over `path`, so readers see
/// the old file or the new one, never part of one.
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
    file.write_all(&bytes)
        .and_then(|()| file.sync_data())
        .map_err(VpmError::io(staging))
}

/// What appshot keeps in a run directory (registry, instances, logs,
/// verified templates, negotiation records).
const RUN_DIR_ENTRIES: &[&str] = &[
    LOCK_FILE,
    STATE_FILE,
    STAGING_FILE,
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

/// A missing registry reads as empty: whatever live instances it should
/// hold is put back from their own copies by every load.
fn load(path: &Path) -> Result<RegistryState, VpmError> {
    match fs::read(path) {
        Ok(bytes) => parse_json(path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RegistryState::default()),
        Err(e) => Err(VpmError::io(path)(e)),
    }
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
