//! Whether an instance's supervisor is still running: it holds an flock on
//! `instances/NAME/lock` for as long as it lives, and the kernel drops the
//! lock however the supervisor dies.

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{Registry, INSTANCES_DIR};
use crate::error::VpmError;

const LOCK_FILE: &str = "lock";
/// Liveness probes by lock-free readers hold an instance's lock for a moment,
/// so a contended lock is only reported as in use once it stays contended.
const ACQUIRE_ATTEMPTS: u32 = 5;
const ACQUIRE_RETRY_DELAY: Duration = Duration::from_millis(5);

/// Proof that this process is the live supervisor of one instance name.
#[derive(Debug)]
pub struct InstanceLock {
    registry: Registry,
    name: String,
    dir: PathBuf,
    _held: Flock<File>,
}

impl InstanceLock {
    /// Must not be called, nor the lock dropped, inside
    /// [`Registry::transaction`]: both take the registry lock themselves.
    ///
    /// Whatever a dead earlier instance of the same name left in the
    /// registry is removed (and the reclaim hook called for the name)
    /// before this returns.
    pub fn acquire(registry: &Registry, name: &str) -> Result<InstanceLock, VpmError> {
        Self::acquire_recording(registry, name, |_, _| ()).map(|(lock, ())| lock)
    }

    /// [`InstanceLock::acquire`] that also runs `record` on the registry
    /// in the transaction that takes the name (after a dead predecessor's
    /// entries went), so the new holder's first records cost no second
    /// write transaction: a claimed instance shell knows its instance's
    /// record before it takes the lock. `record` also gets the instance's
    /// directory, made already, for what must be there before the registry
    /// lists the instance.
    pub fn acquire_recording<R>(
        registry: &Registry,
        name: &str,
        record: impl FnOnce(&mut super::RegistryState, &Path) -> R,
    ) -> Result<(InstanceLock, R), VpmError> {
        let (lock, pending) = Self::acquire_pending(registry, name)?;
        let recorded = pending.record(record)?;
        Ok((lock, recorded))
    }

    /// [`InstanceLock::acquire_recording`] in two steps: the name is taken
    /// here, and its first transaction is [`PendingRecord::record`]'s,
    /// which may run on another thread meanwhile (a claimed instance
    /// shell forks its clone while its record is written). The registry
    /// lock is held until then: no other transaction sees the name alive
    /// before a dead predecessor's entries are gone. The pending record
    /// must be recorded or dropped before this lock is dropped (whose drop
    /// takes the registry lock too).
    pub fn acquire_pending(
        registry: &Registry,
        name: &str,
    ) -> Result<(InstanceLock, PendingRecord), VpmError> {
        let dir = instance_dir(registry.dir(), name).ok_or_else(|| VpmError::Io {
            path: registry.instances_dir(),
            error: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid instance name `{name}`"),
            ),
        })?;
        // Reclaim removes dead directories under this lock; holding it too
        // keeps it from deleting ours between creation and locking.
        let registry_lock = registry.lock()?;
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(VpmError::io(&dir))?;
        super::own::create_empty(&dir)?;
        let path = dir.join(LOCK_FILE);
        let mut file = super::open_lock_file(&path)?;
        let mut attempt = 1;
        let held = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(held) => break held,
                Err((again, Errno::EWOULDBLOCK)) if attempt < ACQUIRE_ATTEMPTS => {
                    file = again;
                    attempt += 1;
                    thread::sleep(ACQUIRE_RETRY_DELAY);
                }
                Err((_, Errno::EWOULDBLOCK)) => return Err(VpmError::NameInUse(name.to_owned())),
                Err((_, errno)) => return Err(VpmError::io(&path)(errno.into())),
            }
        };
        let lock = InstanceLock {
            registry: registry.clone(),
            name: name.to_owned(),
            dir: dir.clone(),
            _held: held,
        };
        let pending = PendingRecord {
            registry: registry.clone(),
            name: name.to_owned(),
            dir,
            registry_lock,
        };
        Ok((lock, pending))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn instance_dir(&self) -> &Path {
        &self.dir
    }
}

/// The first transaction of an instance whose name was just taken
/// ([`InstanceLock::acquire_pending`]), the registry lock held until it
/// runs.
#[derive(Debug)]
pub struct PendingRecord {
    registry: Registry,
    name: String,
    dir: PathBuf,
    registry_lock: Flock<File>,
}

impl PendingRecord {
    /// Runs `record` on the registry (with the instance's directory) in
    /// the transaction that makes the name's holder this process, then
    /// releases the registry lock.
    pub fn record<R>(
        self,
        record: impl FnOnce(&mut super::RegistryState, &Path) -> R,
    ) -> Result<R, VpmError> {
        let PendingRecord {
            registry,
            name,
            dir,
            registry_lock,
        } = self;
        // The name is alive again from here on, so no reclaim would ever
        // remove what a dead predecessor of the name left: this holder
        // starts clean, under the same registry lock, before it records
        // anything.
        registry.transaction_locked(&registry_lock, Some(&name), |state| {
            registry.forget_predecessor(state, &name);
            record(state, &dir)
        })
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Under the registry lock so that a successor acquiring the same name
        // cannot have its fresh lock file deleted by this removal.
        let registry_lock = self.registry.lock();
        if let Err(error) = &registry_lock {
            tracing::warn!(%error, "removing instance directory without the registry lock");
        }
        if let Err(error) = fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), %error, "cannot remove instance directory");
        }
        if let Ok(held) = &registry_lock {
            if let Err(error) = self.registry.forget_holder(held, &self.name) {
                tracing::warn!(instance = %self.name, %error, "cannot record that the instance ended");
            }
        }
    }
}

pub fn is_alive(registry_dir: &Path, name: &str) -> bool {
    instance_dir(registry_dir, name).is_some_and(|dir| holder_alive(&dir))
}

/// Whether some process holds the lock in instance directory `dir`.
pub(super) fn holder_alive(dir: &Path) -> bool {
    let file = match File::open(dir.join(LOCK_FILE)) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
        // Undecidable; never reclaim what might be a live instance.
        Err(_) => return true,
    };
    // EWOULDBLOCK means held; any other failure is undecidable, as above.
    // A successful probe unlocks again as it is dropped.
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

/// `None` for names that are not a single path component.
fn instance_dir(registry_dir: &Path, name: &str) -> Option<PathBuf> {
    let valid = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    valid.then(|| registry_dir.join(INSTANCES_DIR).join(name))
}
