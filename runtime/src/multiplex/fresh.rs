//! The registry as the policy reads it for one notified call: a name looks
//! at it twice (before and after duplicating the task's socket), and the
//! second look reuses what the first read, so that a call pays for one
//! read of the registry.
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
    /// What the cache last answered; `None` until it answered once, and
    /// again whenever it failed.
    state: Option<RegistryState>,
}

impl FreshRegistry {
    pub fn new(cache: CachedRegistry) -> FreshRegistry {
        FreshRegistry { cache, state: None }
    }

    /// The registry as of now.
    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        let now = match self.cache.get() {
            Ok(now) => now,
            Err(e) => {
                self.state = None;
                return Err(e);
            }
        };
        // Copied only when it changed: most calls compare and go on.
        if self.state.as_ref() != Some(now) {
            self.state = Some(now.clone());
        }
        Ok(self.state.as_ref().expect("set above"))
    }

    /// The registry as the last [`get`](Self::get) read it, without
    /// looking again: for a second look within one call, which the first
    /// made fresh.
    pub fn last(&self) -> Option<&RegistryState> {
        self.state.as_ref()
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
            assert_ne!(real_ports(fresh.last()), all);
            assert_eq!(real_ports(fresh.get().ok()), all);
            assert_eq!(real_ports(fresh.last()), all);
        }
    }
}
