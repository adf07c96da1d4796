//! Each live instance's own copy of its records, in its instance directory:
//! `registry.json` is host-wide state anyone with access can delete or
//! overwrite, and losing an instance's translations there would let
//! connects pass through to it (the first instance of a port holds the
//! fixed port itself). The copy lives exactly as long as the instance's
//! liveness lock, so every load can tell a live instance whose records are
//! missing from the registry and put them back.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{parse_json, write_atomically, write_staging};
use crate::error::VpmError;
use crate::translation::{InstanceRecord, RegistryState, SourceRuleRecord, Translation};

const RECORDS_FILE: &str = "records.json";
const STAGING_FILE: &str = "records.json.tmp";

/// Everything the registry holds for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct OwnRecords {
    pub instance: Option<InstanceRecord>,
    pub translations: Vec<Translation>,
    pub source_rules: Vec<SourceRuleRecord>,
}

impl OwnRecords {
    pub fn of(state: &RegistryState, name: &str) -> OwnRecords {
        OwnRecords {
            instance: state.instances.get(name).cloned(),
            translations: state.translations_of(name).cloned().collect(),
            source_rules: state
                .source_rules
                .iter()
                .filter(|r| r.owner == name)
                .cloned()
                .collect(),
        }
    }

    fn put_into(self, state: &mut RegistryState, name: &str) {
        state.remove_instance(name);
        if let Some(record) = self.instance {
            state.instances.insert(name.to_owned(), record);
        }
        state.translations.extend(self.translations);
        state.source_rules.extend(self.source_rules);
    }

    /// Records naming another instance would let one instance's file speak
    /// for another's ports.
    fn all_of(&self, name: &str) -> bool {
        self.instance.as_ref().is_none_or(|r| r.name == name)
            && self.translations.iter().all(|t| t.owner == name)
            && self.source_rules.iter().all(|r| r.owner == name)
    }
}

/// A live instance and its own copy of its records, as read.
pub(super) type Live = (String, Result<OwnRecords, VpmError>);

/// What a load found when it held the registry against the live instances'
/// own records.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Reconciled {
    /// Live instances whose records the registry had lost or altered, put
    /// back from their own copy.
    pub repaired: BTreeSet<String>,
    /// Live instances whose own copy could not be read, and why: what they
    /// serve is unknown.
    pub damaged: BTreeMap<String, String>,
}

impl Reconciled {
    /// Logs what was found; `certain` when it cannot be a commit in flight
    /// (own copies are written just before the registry).
    pub fn report(&self, registry: &Path, certain: bool) {
        if !self.repaired.is_empty() {
            let names = self.repaired.iter().cloned().collect::<Vec<_>>().join(", ");
            if certain {
                tracing::warn!(
                    registry = %registry.display(),
                    instances = %names,
                    "registry lost records of running instances: restored from their own copies"
                );
            } else {
                tracing::debug!(instances = %names, "registry behind instances' own records");
            }
        }
        for (name, error) in &self.damaged {
            tracing::warn!(
                registry = %registry.display(),
                instance = %name,
                %error,
                "own records of a running instance unreadable: local connects no instance of the client's AID serves are refused while it runs"
            );
        }
    }
}

/// Makes every live instance's records in `state` those of its own copy.
/// `live` pairs each live instance with its copy as read.
pub(super) fn reconcile<'a>(
    state: &mut RegistryState,
    live: impl IntoIterator<Item = &'a Live>,
) -> Reconciled {
    let mut found = Reconciled::default();
    for (name, own) in live {
        match own {
            Ok(own) if *own == OwnRecords::of(state, name) => {}
            Ok(own) => {
                own.clone().put_into(state, name);
                found.repaired.insert(name.clone());
            }
            Err(error) => {
                found.damaged.insert(name.clone(), error.to_string());
            }
        }
    }
    found
}

pub(super) fn read(instance_dir: &Path) -> Result<OwnRecords, VpmError> {
    let path = instance_dir.join(RECORDS_FILE);
    let bytes = fs::read(&path).map_err(VpmError::io(&path))?;
    let own: OwnRecords = parse_json(&path, &bytes)?;
    let name = instance_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if !own.all_of(name) {
        return Err(VpmError::Corrupt {
            path,
            message: format!("records of instances other than `{name}`"),
        });
    }
    Ok(own)
}

pub(super) fn write(instance_dir: &Path, own: &OwnRecords) -> Result<(), VpmError> {
    write_atomically(
        &instance_dir.join(STAGING_FILE),
        &instance_dir.join(RECORDS_FILE),
        own,
    )
}

/// For a new instance directory, before its lock is taken: lock-free
/// readers that see the lock held must find a complete copy, or they would
/// take the new instance for a damaged one. An existing copy (a live
/// holder's, or a dead predecessor's the new holder's first commit
/// replaces) stays. Called under the registry lock, like every write here.
pub(super) fn create_empty(instance_dir: &Path) -> Result<(), VpmError> {
    let staging = instance_dir.join(STAGING_FILE);
    let path = instance_dir.join(RECORDS_FILE);
    write_staging(&staging, &OwnRecords::default())?;
    let linked = match fs::hard_link(&staging, &path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(VpmError::io(&path)(e)),
        _ => Ok(()),
    };
    fs::remove_file(&staging).map_err(VpmError::io(&staging))?;
    linked
}
