//! Host-wide state shared by independent supervisor processes: a JSON file
//! replaced atomically under an flock, plus one liveness lock per instance.

mod cache;
mod liveness;

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

pub use cache::CachedRegistry;
pub use liveness::{is_alive, InstanceLock};

use crate::error::VpmError;
use crate::translation::RegistryState;

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

#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

impl Registry {
    pub fn open(dir: &Path) -> Result<Registry, VpmError> {
        let instances = dir.join(INSTANCES_DIR);
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&instances)
            .map_err(VpmError::io(&instances))?;
        Ok(Registry {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `f` on the current state with every other writer on the host
    /// excluded, after dropping instances whose supervisor has died, and
    /// commits the result if anything changed.
    pub fn transaction<R>(&self, f: impl FnOnce(&mut RegistryState) -> R) -> Result<R, VpmError> {
        let _lock = self.lock()?;
        let committed = load(&self.state_path())?;
        let mut state = committed.clone();
        self.reclaim(&mut state);
        let result = f(&mut state);
        if state != committed {
            state.generation = committed.generation + 1;
            self.commit(&state)?;
        }
        Ok(result)
    }

    /// The last committed state without taking the lock (commits are atomic
    /// renames), minus instances whose supervisor has died since.
    pub fn read(&self) -> Result<RegistryState, VpmError> {
        let mut state = load(&self.state_path())?;
        for name in owners(&state) {
            if !is_alive(&self.dir, &name) {
                state.remove_instance(&name);
            }
        }
        Ok(state)
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
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .map_err(VpmError::io(&path))?;
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

    fn commit(&self, state: &RegistryState) -> Result<(), VpmError> {
        let staging = self.dir.join(STAGING_FILE);
        let bytes =
            serde_json::to_vec_pretty(state).map_err(|e| VpmError::io(&staging)(e.into()))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&staging)
            .map_err(VpmError::io(&staging))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_data())
            .map_err(VpmError::io(&staging))?;
        let path = self.state_path();
        fs::rename(&staging, &path).map_err(VpmError::io(&path))
    }
}

fn load(path: &Path) -> Result<RegistryState, VpmError> {
    match fs::read(path) {
        Ok(bytes) => parse(path, &bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RegistryState::default()),
        Err(e) => Err(VpmError::io(path)(e)),
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<RegistryState, VpmError> {
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
