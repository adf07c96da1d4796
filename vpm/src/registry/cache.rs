//! The registry as seen on the hot path of intercepted calls.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{parse_json, Registry};
use crate::error::VpmError;
use crate::translation::RegistryState;

/// Re-reads the registry only when a commit has replaced the file (or it
/// vanished), at the cost of one stat per [`get`](Self::get) otherwise. A
/// re-read also holds it against the live instances' own records (a scan of
/// the instance directories), so a registry that lost them routes as if it
/// had not, or refuses where it cannot tell.
///
/// Unlike [`Registry::read`], it does not filter out dead instances: that
/// would cost a lock probe per instance on every call. Entries of a dead
/// instance linger until the next transaction reclaims them, and routing to
/// one meets a closed port, as it would had the instance just crashed.
#[derive(Debug)]
pub struct CachedRegistry {
    registry: Registry,
    path: PathBuf,
    state: RegistryState,
    loaded: Option<Loaded>,
}

#[derive(Debug)]
enum Loaded {
    File {
        dev: u64,
        ino: u64,
        // Kept open so the inode cannot be freed and reused by a later
        // commit, which would make a replaced file look unchanged.
        _file: File,
    },
    /// Commits never remove the file: it was deleted, and `state` is what
    /// the live instances' own records rebuilt.
    Missing,
}

impl CachedRegistry {
    pub fn new(registry: Registry) -> CachedRegistry {
        let path = registry.state_path();
        CachedRegistry {
            registry,
            path,
            state: RegistryState::default(),
            loaded: None,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        match fs::metadata(&self.path) {
            Ok(meta) => {
                let unchanged = matches!(
                    self.loaded,
                    Some(Loaded::File { dev, ino, .. }) if dev == meta.dev() && ino == meta.ino()
                );
                if !unchanged {
                    self.reload()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !matches!(self.loaded, Some(Loaded::Missing)) {
                    self.rebuild_missing()?;
                }
            }
            Err(e) => return Err(VpmError::io(&self.path)(e)),
        }
        Ok(&self.state)
    }

    /// Identity and content both come from one open file, so a commit racing
    /// the reload is noticed by the next call.
    fn reload(&mut self) -> Result<(), VpmError> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.rebuild_missing(),
            Err(e) => return Err(VpmError::io(&self.path)(e)),
        };
        let meta = file.metadata().map_err(VpmError::io(&self.path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(VpmError::io(&self.path))?;
        let mut state: RegistryState = parse_json(&self.path, &bytes)?;
        let backwards = state.generation < self.state.generation;
        self.registry.reconcile_read(&mut state, backwards)?;
        self.state = state;
        self.loaded = Some(Loaded::File {
            dev: meta.dev(),
            ino: meta.ino(),
            _file: file,
        });
        Ok(())
    }

    fn rebuild_missing(&mut self) -> Result<(), VpmError> {
        let mut state = RegistryState::default();
        self.registry.reconcile_read(&mut state, true)?;
        self.state = state;
        self.loaded = Some(Loaded::Missing);
        Ok(())
    }
}
