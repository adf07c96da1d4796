//! The registry as seen on the hot path of intercepted calls.

use super::store::Db;
use super::Registry;
use crate::error::VpmError;
use crate::translation::RegistryState;

/// Re-reads the registry only when something was committed since (at the
/// cost of a stat and one indexed read per [`get`](Self::get) otherwise),
/// in a read transaction that never waits for a writer. A database that
/// was deleted or emptied reads as what the live instances' own records
/// hold (a scan of the instance directories), so a registry that lost
/// them routes as if it had not, or refuses where it cannot tell.
///
/// Unlike [`Registry::read`], it does not filter out dead instances: that
/// would cost a liveness check per instance on every call. Entries of a
/// dead instance linger until the next transaction reclaims them, and
/// routing to one meets a closed port, as it would had the instance just
/// crashed.
#[derive(Debug)]
pub struct CachedRegistry {
    registry: Registry,
    db: Option<Db>,
    /// What the own copies held when the database was last found missing.
    missing: Option<RegistryState>,
}

impl CachedRegistry {
    pub fn new(registry: Registry) -> CachedRegistry {
        CachedRegistry {
            registry,
            db: None,
            missing: None,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        if let Some(db) = self.db.take() {
            if db.current()? {
                self.db = Some(db);
            } else {
                db.abandon();
            }
        }
        if self.db.is_none() {
            match Db::open_existing(&self.registry.db_path())? {
                Some(db) => {
                    self.db = Some(db);
                    self.missing = None;
                }
                None => {
                    if self.missing.is_none() {
                        self.missing = Some(self.registry.rebuilt_from_own_copies()?);
                    }
                    return Ok(self.missing.as_ref().expect("rebuilt above"));
                }
            }
        }
        let db = self.db.as_mut().expect("opened above");
        Ok(&db.snapshot()?.state)
    }
}
