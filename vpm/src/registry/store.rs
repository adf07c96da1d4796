//! The registry's storage: one SQLite database in WAL mode, one row per
//! instance, translation, source rule and liveness-lock holder, so that a
//! commit writes the rows of the instances it changed and nothing else,
//! and readers (`ps`, `ports`, routing) read a committed snapshot without
//! waiting for a writer.
//!
//! `synchronous = NORMAL`: in WAL mode a commit survives any crash of the
//! process (kill -9 included) and is only lost with the machine, whose
//! instances are gone with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, TransactionBehavior};

use appshot_sys::counter::SharedCounter;
use tracing::debug;

use crate::error::VpmError;
use crate::translation::{InstanceRecord, Protocol, RegistryState, SourceRuleRecord, Translation};

pub(super) const DB_FILE: &str = "registry.db";
pub(super) const WAL_FILE: &str = "registry.db-wal";
pub(super) const SHM_FILE: &str = "registry.db-shm";
/// A counter every commit raises, mapped by readers (see [`Db::changes`]).
pub(super) const CHANGES_FILE: &str = "registry.changes";

const SCHEMA_VERSION: i64 = 1;
const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('generation', 0), ('epoch', 0), ('full_scan', 0);
CREATE TABLE instances (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE translations (
    owner TEXT NOT NULL,
    socket_inode INTEGER NOT NULL,
    protocol TEXT NOT NULL,
    addr TEXT NOT NULL,
    virtual_port INTEGER NOT NULL,
    aid TEXT NOT NULL,
    real_port INTEGER NOT NULL
);
CREATE INDEX translations_by_route ON translations (protocol, virtual_port, aid);
CREATE INDEX translations_by_owner ON translations (owner);
CREATE INDEX translations_by_real_port ON translations (real_port);
CREATE TABLE source_rules (owner TEXT NOT NULL, rule TEXT NOT NULL);
CREATE INDEX source_rules_by_owner ON source_rules (owner);
CREATE TABLE holders (name TEXT PRIMARY KEY, pid INTEGER NOT NULL);
CREATE TABLE damaged (name TEXT PRIMARY KEY);
";

/// How long a connection waits for SQLite's own locks; writers are already
/// serialised by the registry lock, so this only covers a checkpoint.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything committed, as of `epoch` (which every commit raises, unlike
/// the state's `generation`, which only changes of the state raise).
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    pub epoch: i64,
    pub state: RegistryState,
    /// Instance name → pid of the process holding its liveness lock.
    pub holders: BTreeMap<String, u32>,
}

/// An open database, the file it was opened on, and the last snapshot
/// read through it.
#[derive(Debug)]
pub(super) struct Db {
    pub(super) conn: Connection,
    path: PathBuf,
    identity: (u64, u64),
    cached: Option<Snapshot>,
    /// Raised after every commit, so that a reader can tell "nothing
    /// committed since" with a memory load; `None` for a reader that
    /// could not map it, which then reads the database every time.
    changes: Option<SharedCounter>,
}

fn identity(meta: &fs::Metadata) -> (u64, u64) {
    (meta.dev(), meta.ino())
}

pub(super) fn db_error(path: &Path) -> impl Fn(rusqlite::Error) -> VpmError + '_ {
    move |error| match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => VpmError::Corrupt {
            path: path.to_path_buf(),
            message: error.to_string(),
        },
        _ => VpmError::Database {
            path: path.to_path_buf(),
            error,
        },
    }
}

impl Db {
    /// Opens the database at `path` if there is one with the registry's
    /// schema; never creates anything (readers call this). `None`: no
    /// database, or an empty file where it should be: what the live
    /// instances' own copies say is all there is.
    pub fn open_existing(path: &Path) -> Result<Option<Db>, VpmError> {
        let before = match fs::metadata(path) {
            Ok(meta) => identity(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VpmError::io(path)(e)),
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_error(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error(path))?;
        // Per connection, not kept in the file: without it every commit
        // waits for an fsync of the WAL (10-40 ms each on a busy disk).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_error(path))?;
        let after = match fs::metadata(path) {
            Ok(meta) => identity(&meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(VpmError::io(path)(e)),
        };
        if before != after {
            // Replaced while opening: the caller's next look opens the new one.
            return Ok(None);
        }
        let changes = match map_changes(path, false) {
            Ok(changes) => Some(changes),
            Err(e) => {
                debug!(error = %e, "no change counter: every read looks at the database");
                None
            }
        };
        let db = Db {
            conn,
            path: path.to_path_buf(),
            identity: after,
            cached: None,
            changes,
        };
        Ok(db.formatted()?.then_some(db))
    }

    /// Opens the database at `path` for a writer holding the registry
    /// lock, creating it (0600, WAL) when it is missing or an empty file,
    /// with what `initial` returns, in the transaction that creates its
    /// tables: a database is never there without its rows. `Ok((db,
    /// true))`: created.
    pub fn open_for_writing(
        path: &Path,
        initial: impl FnOnce() -> Result<RegistryState, VpmError>,
    ) -> Result<(Db, bool), VpmError> {
        if let Some(db) = Db::open_existing(path)? {
            return Ok((db, false));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if !path.exists() {
            // A WAL without its database is a deleted database's: SQLite
            // would replay it into the new one.
            for name in [WAL_FILE, SHM_FILE] {
                let stale = dir.join(name);
                match fs::remove_file(&stale) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(VpmError::io(&stale)(e))
                    }
                    _ => {}
                }
            }
            // SQLite gives its WAL and shared-memory files the database's mode.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(VpmError::io(path))?;
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_error(path))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_error(path))?;
        let meta = fs::metadata(path).map_err(VpmError::io(path))?;
        let changes = map_changes(path, true).map_err(VpmError::io(&changes_path(path)))?;
        let mut db = Db {
            conn,
            path: path.to_path_buf(),
            identity: identity(&meta),
            cached: None,
            changes: Some(changes),
        };
        let err = db_error(path);
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(&err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(VpmError::Corrupt {
                path: path.to_path_buf(),
                message: format!("journal mode {mode}, not WAL"),
            });
        }
        db.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(&err)?;
        let tx = db
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        // Another writer may have formatted it first (it held the lock
        // before us); then it is simply opened.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        let created = version == 0;
        if created {
            tx.execute_batch(SCHEMA).map_err(&err)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(&err)?;
            // Dropping `tx` on an error rolls the tables back too.
            let state = initial()?;
            let changes = Changes {
                owners: super::owners(&state),
                damaged: Some(state.damaged.clone()),
                state: Some(state),
                ..Changes::default()
            };
            changes.apply(&tx, Snapshot::default()).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        db.committed();
        db.formatted()?;
        Ok((db, created))
    }

    /// Whether the file holds the registry's schema; an empty file (no
    /// schema, no tables) does not, and anything else is no registry.
    fn formatted(&self) -> Result<bool, VpmError> {
        let err = db_error(&self.path);
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(&err)?;
        if version == SCHEMA_VERSION {
            return Ok(true);
        }
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(&err)?;
        if version == 0 && tables == 0 {
            return Ok(false);
        }
        Err(VpmError::Corrupt {
            path: self.path.clone(),
            message: format!(
                "schema version {version}, not {SCHEMA_VERSION}: not a registry of this appshot"
            ),
        })
    }

    /// Whether the path still names the file this connection has open.
    pub fn current(&self) -> Result<bool, VpmError> {
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(identity(&meta) == self.identity),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(VpmError::io(&self.path)(e)),
        }
    }

    /// The change counter now, if mapped: when it reads as it did before a
    /// [`snapshot`](Self::snapshot), nothing was committed since.
    pub fn changes(&self) -> Option<u64> {
        self.changes.as_ref().map(SharedCounter::load)
    }

    /// The snapshot last read, without looking at the database.
    pub fn cached(&self) -> Option<&Snapshot> {
        self.cached.as_ref()
    }

    fn committed(&self) {
        if let Some(changes) = &self.changes {
            changes.bump();
        }
    }

    /// Lets go of a database whose file was deleted or replaced without
    /// closing it: SQLite's last close of a database checkpoints it and
    /// then unlinks its WAL *by name*, which is by now the new database's.
    /// The descriptors go with the process.
    pub fn abandon(self) {
        std::mem::forget(self);
    }

    /// The committed snapshot, read in one read transaction (which never
    /// waits for a writer), or the cached one when nothing was committed
    /// since.
    pub fn snapshot(&mut self) -> Result<&Snapshot, VpmError> {
        let err = db_error(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        let epoch = epoch(&tx).map_err(&err)?;
        let fresh = self.cached.as_ref().is_some_and(|c| c.epoch == epoch);
        if !fresh {
            let snapshot = load(&tx, epoch).map_err(&err)?;
            self.cached = Some(snapshot);
        }
        tx.commit().map_err(&err)?;
        Ok(self.cached.as_ref().expect("snapshot just read"))
    }

    /// Runs `f` in a write transaction (`BEGIN IMMEDIATE`) on the committed
    /// snapshot; `f` returns the changes to commit, or `None`.
    pub fn write<R>(
        &mut self,
        f: impl FnOnce(&Snapshot) -> Result<(R, Option<Changes>), VpmError>,
    ) -> Result<R, VpmError> {
        let path = self.path.clone();
        let err = db_error(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let epoch = epoch(&tx).map_err(&err)?;
        let snapshot = match self.cached.take() {
            Some(c) if c.epoch == epoch => c,
            _ => load(&tx, epoch).map_err(&err)?,
        };
        let (result, changes) = match f(&snapshot) {
            Ok(done) => done,
            Err(e) => {
                self.cached = Some(snapshot);
                return Err(e);
            }
        };
        let Some(changes) = changes else {
            self.cached = Some(snapshot);
            return Ok(result);
        };
        let next = changes.apply(&tx, snapshot).map_err(&err)?;
        tx.commit().map_err(&err)?;
        self.committed();
        self.cached = Some(next);
        Ok(result)
    }
}

fn changes_path(db: &Path) -> PathBuf {
    db.with_file_name(CHANGES_FILE)
}

/// Maps the change counter beside the database at `db`; a writer creates
/// it (0600, as the database) where it is missing or short.
fn map_changes(db: &Path, create: bool) -> io::Result<SharedCounter> {
    let path = changes_path(db);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    if create && file.metadata()?.len() < 8 {
        file.set_len(8)?;
    }
    SharedCounter::map(&file)
}

fn epoch(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = 'epoch'")?
        .query_row([], |r| r.get(0))
}

fn meta_value(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
}

fn set_meta(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?
        .execute(params![key, value])
        .map(drop)
}

fn json_error(e: serde_json::Error) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(e))
}

fn column_error(
    column: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, Box::new(e))
}

fn load(conn: &Connection, epoch: i64) -> rusqlite::Result<Snapshot> {
    let mut state = RegistryState {
        generation: u64::try_from(meta_value(conn, "generation")?).unwrap_or_default(),
        ..RegistryState::default()
    };
    let mut stmt = conn.prepare_cached("SELECT record FROM instances ORDER BY name")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let text: String = row.get(0)?;
        let record: InstanceRecord = serde_json::from_str(&text).map_err(|e| column_error(0, e))?;
        state.instances.insert(record.name.clone(), record);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT owner, socket_inode, protocol, addr, virtual_port, aid, real_port
         FROM translations ORDER BY rowid",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let protocol: String = row.get(2)?;
        let addr: String = row.get(3)?;
        state.translations.push(Translation {
            owner: row.get(0)?,
            socket_inode: row.get::<_, i64>(1)? as u64,
            protocol: match protocol.as_str() {
                "udp" => Protocol::Udp,
                _ => Protocol::Tcp,
            },
            addr: addr.parse().map_err(|e| column_error(3, e))?,
            virtual_port: row.get(4)?,
            aid: row.get(5)?,
            real_port: row.get(6)?,
        });
    }
    let mut stmt = conn.prepare_cached("SELECT rule FROM source_rules ORDER BY rowid")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let text: String = row.get(0)?;
        let rule: SourceRuleRecord = serde_json::from_str(&text).map_err(|e| column_error(0, e))?;
        state.source_rules.push(rule);
    }
    let mut stmt = conn.prepare_cached("SELECT name FROM damaged")?;
    state.damaged = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<BTreeSet<String>>>()?;
    let mut stmt = conn.prepare_cached("SELECT name, pid FROM holders")?;
    let holders = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<BTreeMap<String, u32>>>()?;
    Ok(Snapshot {
        epoch,
        state,
        holders,
    })
}

/// What a write changes: the whole records of the instances named, the
/// holders named, and the damage marks.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// The new state; only the rows of `owners` are written from it.
    pub state: Option<RegistryState>,
    pub owners: BTreeSet<String>,
    pub holders: BTreeMap<String, Option<u32>>,
    pub damaged: Option<BTreeSet<String>>,
    pub full_scan: Option<i64>,
}

impl Changes {
    fn apply(self, conn: &Connection, mut snapshot: Snapshot) -> rusqlite::Result<Snapshot> {
        if let Some(state) = self.state {
            for owner in &self.owners {
                write_owner(conn, &state, owner)?;
            }
            if !self.owners.is_empty() {
                let generation = snapshot.state.generation + 1;
                set_meta(conn, "generation", generation as i64)?;
                snapshot.state = RegistryState {
                    generation,
                    ..state
                };
            }
        }
        if let Some(damaged) = self.damaged {
            conn.execute("DELETE FROM damaged", [])?;
            let mut stmt = conn.prepare_cached("INSERT INTO damaged (name) VALUES (?1)")?;
            for name in &damaged {
                stmt.execute([name])?;
            }
            snapshot.state.damaged = damaged;
        }
        for (name, pid) in self.holders {
            match pid {
                Some(pid) => {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO holders (name, pid) VALUES (?1, ?2)",
                    )?
                    .execute(params![name, pid])?;
                    snapshot.holders.insert(name, pid);
                }
                None => {
                    conn.prepare_cached("DELETE FROM holders WHERE name = ?1")?
                        .execute([&name])?;
                    snapshot.holders.remove(&name);
                }
            }
        }
        if let Some(at) = self.full_scan {
            set_meta(conn, "full_scan", at)?;
        }
        snapshot.epoch += 1;
        set_meta(conn, "epoch", snapshot.epoch)?;
        Ok(snapshot)
    }
}

/// When the last full liveness scan ran (seconds since the epoch).
pub(super) fn last_full_scan(db: &mut Db) -> Result<i64, VpmError> {
    meta_value(&db.conn, "full_scan").map_err(db_error(&db.path))
}

/// Replaces every row of instance `owner` with what `state` holds for it.
fn write_owner(conn: &Connection, state: &RegistryState, owner: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM instances WHERE name = ?1")?
        .execute([owner])?;
    conn.prepare_cached("DELETE FROM translations WHERE owner = ?1")?
        .execute([owner])?;
    conn.prepare_cached("DELETE FROM source_rules WHERE owner = ?1")?
        .execute([owner])?;
    if let Some(record) = state.instances.get(owner) {
        conn.prepare_cached("INSERT INTO instances (name, record) VALUES (?1, ?2)")?
            .execute(params![
                owner,
                serde_json::to_string(record).map_err(json_error)?
            ])?;
    }
    let mut insert = conn.prepare_cached(
        "INSERT INTO translations (owner, socket_inode, protocol, addr, virtual_port, aid, real_port)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for t in state.translations_of(owner) {
        insert.execute(params![
            t.owner,
            t.socket_inode as i64,
            t.protocol.to_string(),
            t.addr.to_string(),
            t.virtual_port,
            t.aid,
            t.real_port
        ])?;
    }
    let mut insert =
        conn.prepare_cached("INSERT INTO source_rules (owner, rule) VALUES (?1, ?2)")?;
    for rule in state.source_rules.iter().filter(|r| r.owner == owner) {
        insert.execute(params![
            owner,
            serde_json::to_string(rule).map_err(json_error)?
        ])?;
    }
    Ok(())
}
