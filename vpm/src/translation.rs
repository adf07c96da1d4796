use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::routing::Route;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One socket of a supervised app that bound a virtual port and really holds
/// `real_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Translation {
    pub protocol: Protocol,
    /// The address the app bound; may be unspecified (`0.0.0.0` or `::`).
    pub addr: IpAddr,
    pub virtual_port: u16,
    pub aid: String,
    pub real_port: u16,
    /// Name of the owning instance.
    pub owner: String,
    pub socket_inode: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub name: String,
    pub aid: String,
    pub supervisor_pid: u32,
    /// The app's main pid.
    pub pid: u32,
    pub command: Vec<String>,
    pub started_unix: u64,
    /// Ports named by the configuration; empty means every port below the
    /// ephemeral range.
    pub multiplexed: Vec<u16>,
    /// The config file given with `--config`, if any (older registries and
    /// restored or OCI instances have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<std::path::PathBuf>,
    /// Who the application runs as, `UID:GID`, when not as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The real ports it takes, `A-B`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<String>,
}

/// A kernel (nftables) rule an instance installed so that clients outside
/// appshot reach it by their source address; recorded so that `appshot
/// ports` can show it. The rules themselves live in the instance's own
/// chains, which go with the instance (or with its reclaim).
fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRuleRecord {
    pub owner: String,
    pub aid: String,
    /// Records written before UDP was multiplexed are TCP's.
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// Address or CIDR; `*` for every source no other rule names.
    pub source: String,
    pub source_port: Option<u16>,
    pub virtual_port: u16,
    /// Where matching connections go; `None`: they are reset.
    pub real_port: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryState {
    pub generation: u64,
    pub instances: BTreeMap<String, InstanceRecord>,
    pub translations: Vec<Translation>,
    /// Older registries have none.
    #[serde(default)]
    pub source_rules: Vec<SourceRuleRecord>,
    /// Live instances whose records could be neither found in the registry
    /// nor read from their own copy, as a load found them (never stored).
    #[serde(skip)]
    pub damaged: BTreeSet<String>,
}

impl RegistryState {
    /// Replaces an earlier entry for the same socket so that re-reporting a
    /// bind is idempotent.
    pub fn insert(&mut self, t: Translation) {
        match self
            .translations
            .iter_mut()
            .find(|old| old.owner == t.owner && old.socket_inode == t.socket_inode)
        {
            Some(old) => *old = t,
            None => self.translations.push(t),
        }
    }

    pub fn remove_socket(&mut self, owner: &str, socket_inode: u64) {
        self.translations
            .retain(|t| !(t.owner == owner && t.socket_inode == socket_inode));
    }

    pub fn remove_instance(&mut self, name: &str) {
        self.instances.remove(name);
        self.translations.retain(|t| t.owner != name);
        self.source_rules.retain(|r| r.owner != name);
    }

    pub fn translations_of<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = &'a Translation> {
        self.translations.iter().filter(move |t| t.owner == owner)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn tcp(
        addr: &str,
        virtual_port: u16,
        aid: &str,
        real_port: u16,
        owner: &str,
    ) -> Translation {
        Translation {
            protocol: Protocol::Tcp,
            addr: addr.parse().unwrap(),
            virtual_port,
            aid: aid.into(),
            real_port,
            owner: owner.into(),
            socket_inode: u64::from(real_port),
        }
    }

    pub(crate) fn record(name: &str, aid: &str) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            aid: aid.into(),
            supervisor_pid: 1,
            pid: 2,
            command: vec!["app".into()],
            started_unix: 0,
            multiplexed: vec![9000],
            config: None,
            user: None,
            port_range: None,
        }
    }

    #[test]
    fn protocol_serialises_lowercase_and_displays_the_same() {
        assert_eq!(serde_json::to_string(&Protocol::Udp).unwrap(), "\"udp\"");
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(
            serde_json::from_str::<Protocol>("\"tcp\"").unwrap(),
            Protocol::Tcp
        );
    }

    #[test]
    fn insert_replaces_the_same_socket() {
        let mut s = RegistryState::default();
        s.insert(tcp("0.0.0.0", 9000, "a", 9000, "i1"));
        let mut moved = tcp("0.0.0.0", 9000, "a", 40000, "i1");
        moved.socket_inode = 9000;
        s.insert(moved.clone());
        s.insert(tcp("0.0.0.0", 9001, "a", 9001, "i1"));
        assert_eq!(s.translations.len(), 2);
        assert_eq!(s.translations[0], moved);
    }

    #[test]
    fn removal_by_socket_and_by_instance() {
        let mut s = RegistryState::default();
        s.instances.insert("i1".into(), record("i1", "a"));
        s.instances.insert("i2".into(), record("i2", "a"));
        s.insert(tcp("0.0.0.0", 9000, "a", 9000, "i1"));
        s.insert(tcp("0.0.0.0", 9001, "a", 9001, "i1"));
        s.insert(tcp("0.0.0.0", 9000, "a", 40000, "i2"));

        s.remove_socket("i1", 9001);
        let ports: Vec<u16> = s.translations_of("i1").map(|t| t.real_port).collect();
        assert_eq!(ports, [9000]);

        s.remove_instance("i1");
        assert!(!s.instances.contains_key("i1"));
        assert_eq!(s.translations_of("i1").count(), 0);
        assert_eq!(s.translations_of("i2").count(), 1);
    }
}
