//! The registry as seen on the hot path of intercepted calls.

use std::time::{Duration, Instant};

use super::store::Db;
use super::Registry;
use crate::error::VpmError;
use crate::translation::RegistryState;

/// Re-reads the registry only when something was committed since, in a
/// read transaction that never waits for a writer. Whether something was
/// is a load of the change counter every commit raises (no syscall); at
/// least every [`RECHECK`] the database is looked at anyway (a stat and one
/// indexed read), which bounds how long a reader trusts a counter that
/// cannot tell: one whose file was replaced, or a writer killed between
/// its commit and the counter. A database that
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
    /// The change counter as it read before the database was last looked
    /// at, and when that was.
    seen: Option<(u64, Instant)>,
    /// How many times [`get`](Self::get) answered from a read of its own
    /// (not from the counter alone): what a reader that derives something
    /// from the state compares to know when to derive it again.
    reads: u64,
    /// Whether the last [`get`](Self::get) answered.
    answered: bool,
}

/// How long a read trusts the change counter alone.
pub const RECHECK: Duration = Duration::from_millis(100);

impl CachedRegistry {
    pub fn new(registry: Registry) -> CachedRegistry {
        CachedRegistry {
            registry,
            db: None,
            missing: None,
            seen: None,
            reads: 0,
            answered: false,
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        self.answered = false;
        let unchanged = match (&self.db, self.seen) {
            (Some(db), Some((counter, at))) => {
                db.cached().is_some() && db.changes() == Some(counter) && at.elapsed() < RECHECK
            }
            _ => false,
        };
        if unchanged {
            self.answered = true;
            let db = self.db.as_ref().expect("looked at above");
            return Ok(&db.cached().expect("looked at above").state);
        }
        self.seen = None;
        self.reads += 1;
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
                    self.answered = true;
                    return Ok(self.missing.as_ref().expect("rebuilt above"));
                }
            }
        }
        let db = self.db.as_mut().expect("opened above");
        let counter = db.changes();
        let snapshot = db.snapshot()?;
        self.seen = counter.map(|c| (c, Instant::now()));
        self.answered = true;
        Ok(&snapshot.state)
    }

    /// What the last [`get`](Self::get) answered, without looking again;
    /// `None` if it failed (or was never made).
    pub fn last(&self) -> Option<&RegistryState> {
        if !self.answered {
            return None;
        }
        match &self.db {
            Some(db) => db.cached().map(|s| &s.state),
            None => self.missing.as_ref(),
        }
    }

    /// Raised by every [`get`](Self::get) that read the registry rather
    /// than trust the change counter: while it stays put, so does
    /// [`last`](Self::last)'s answer.
    pub fn reads(&self) -> u64 {
        self.reads
    }
}
