//! The registry as the policy reads it for one notified call: a name looks
//! at it twice (before and after duplicating the task's socket), and the
//! second look reuses what the first read, so that a call pays for one
//! read of the registry. What a name asks of it (does any translation
//! rename a port, and this one?) is answered from an index of the renamed
//! real ports, built again only when the cache read the registry anew: a
//! bit test per call, whatever the number of translations on the host.
//!
//! The read itself is [`CachedRegistry`]'s: a load of the registry's
//! mapped change counter, which every commit raises, and a read
//! transaction only when it moved (or every `RECHECK`). An inotify watch
//! on the registry's directory once stood for that check (the JSON registry
//! was replaced by a rename per commit, an event the kernel queues before
//! the commit is visible); the SQLite registry commits by writing its WAL
//! and then updating its shared-memory index, which no event follows, so a
//! watch could say "unchanged" after a commit and is not used.

use appshot_vpm::{CachedRegistry, RegistryState, VpmError};

pub struct FreshRegistry {
    cache: CachedRegistry,
    /// The renamed real ports of the state the cache read at its
    /// `reads()` count noted beside them.
    renamed: Option<(u64, RenamedPorts)>,
}

/// The real ports some translation (of any protocol and address) maps to
/// another virtual port, as a bit per port.
struct RenamedPorts {
    bits: Box<[u64; 1024]>,
    any: bool,
}

impl RenamedPorts {
    fn of(state: &RegistryState) -> RenamedPorts {
        let mut ports = RenamedPorts {
            bits: Box::new([0; 1024]),
            any: false,
        };
        for t in state
            .translations
            .iter()
            .filter(|t| t.real_port != t.virtual_port)
        {
            ports.bits[usize::from(t.real_port / 64)] |= 1 << (t.real_port % 64);
            ports.any = true;
        }
        ports
    }

    /// Whether `port` is renamed, or with `None` whether any is.
    fn contains(&self, port: Option<u16>) -> bool {
        match port {
            None => self.any,
            Some(p) => self.bits[usize::from(p / 64)] & (1 << (p % 64)) != 0,
        }
    }
}

impl FreshRegistry {
    pub fn new(cache: CachedRegistry) -> FreshRegistry {
        FreshRegistry {
            cache,
            renamed: None,
        }
    }

    /// The registry as of now.
    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        self.cache.get()
    }

    /// Whether a translation renames real port `port` (`None`: any port),
    /// in the registry as of now; `false` if it cannot be read.
    pub fn renames(&mut self, port: Option<u16>) -> bool {
        self.cache.get().is_ok() && self.renames_last(port)
    }

    /// [`renames`](Self::renames) in the registry as the last look read
    /// it.
    pub fn renames_last(&mut self, port: Option<u16>) -> bool {
        let reads = self.cache.reads();
        if !matches!(&self.renamed, Some((at, _)) if *at == reads) {
            let Some(state) = self.cache.last() else {
                return false;
            };
            self.renamed = Some((reads, RenamedPorts::of(state)));
        }
        self.cache.last().is_some()
            && self
                .renamed
                .as_ref()
                .is_some_and(|(_, ports)| ports.contains(port))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use appshot_vpm::{InstanceLock, Protocol, Registry, Translation};

    use super::*;
    use crate::multiplex::tests::register;

    /// A registry in `dir` with a running instance `web`, which owns the
    /// translations the tests commit (a dead owner's would be reclaimed).
    fn registry(dir: &std::path::Path) -> (Registry, InstanceLock) {
        let registry = Registry::open(dir).unwrap();
        let lock = InstanceLock::acquire(&registry, "web").unwrap();
        register(&registry, "web", "a");
        (registry, lock)
    }

    fn translation(real_port: u16) -> Translation {
        Translation {
            protocol: Protocol::Tcp,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            virtual_port: 9000,
            aid: "a".into(),
            real_port,
            owner: "web".into(),
            socket_inode: u64::from(real_port),
        }
    }

    fn real_ports(st: Option<&RegistryState>) -> Vec<u16> {
        let mut ports: Vec<u16> = st
            .unwrap()
            .translations
            .iter()
            .map(|t| t.real_port)
            .collect();
        ports.sort();
        ports
    }

    #[test]
    fn a_commit_is_seen_by_the_next_read_and_the_last_read_stays_put() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _web) = registry(dir.path());
        let mut fresh = FreshRegistry::new(CachedRegistry::new(registry.clone()));
        assert_eq!(real_ports(fresh.get().ok()), Vec::<u16>::new());
        for (port, all) in [(20001, vec![20001]), (20002, vec![20001, 20002])] {
            registry
                .transaction(|st| st.insert(translation(port)))
                .unwrap();
            // The last read is what it was until the next look.
            assert_ne!(real_ports(fresh.cache.last()), all);
            assert_eq!(real_ports(fresh.get().ok()), all);
            assert_eq!(real_ports(fresh.cache.last()), all);
        }
    }

    #[test]
    fn renamed_ports_follow_the_commits_and_the_last_look_stays_put() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _web) = registry(dir.path());
        let mut fresh = FreshRegistry::new(CachedRegistry::new(registry.clone()));
        assert!(!fresh.renames(None));
        // A first instance holds its virtual port as its real one.
        registry
            .transaction(|st| st.insert(translation(9000)))
            .unwrap();
        assert!(!fresh.renames(None));
        assert!(!fresh.renames_last(Some(9000)));
        registry
            .transaction(|st| st.insert(translation(20001)))
            .unwrap();
        assert!(!fresh.renames_last(Some(20001)), "not looked at again");
        assert!(fresh.renames(None));
        assert!(fresh.renames_last(Some(20001)));
        assert!(!fresh.renames_last(Some(20002)));
        assert!(!fresh.renames_last(Some(9000)));
    }
}
