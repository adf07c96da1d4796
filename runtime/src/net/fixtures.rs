//! Registry states for the unit tests of the kernel's route tables
//! (`udproutes`, `connroutes`).

use std::collections::BTreeMap;

use appshot_vpm::{Protocol, RegistryState, Translation};

/// A translation whose socket inode is its real port.
pub(crate) fn translation(
    protocol: Protocol,
    aid: &str,
    addr: &str,
    virtual_port: u16,
    real_port: u16,
    owner: &str,
) -> Translation {
    Translation {
        protocol,
        addr: addr.parse().unwrap(),
        virtual_port,
        aid: aid.into(),
        real_port,
        owner: owner.into(),
        socket_inode: u64::from(real_port),
    }
}

pub(crate) fn state(translations: Vec<Translation>) -> RegistryState {
    RegistryState {
        translations,
        ..RegistryState::default()
    }
}

/// AIDs a, b and c with their cgroup ids.
pub(crate) fn aids() -> BTreeMap<String, u64> {
    [("a", 101), ("b", 102), ("c", 103)]
        .into_iter()
        .map(|(aid, id)| (aid.to_string(), id))
        .collect()
}
