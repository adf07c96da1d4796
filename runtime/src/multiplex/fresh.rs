//! The registry as the policy reads it on every notified call, without a
//! path lookup per call.
//!
//! [`CachedRegistry`] re-reads the registry when a commit has replaced its
//! file, and finds out with a stat of the file's path: on the machines
//! measured that stat (a walk of every component of the path) cost more
//! than any other step of a notified getsockname. Here an inotify watch on
//! the registry's directory says whether anything there was created,
//! removed or renamed since the last look; only then is the cache asked
//! (its stat included), and its state copied for the calls that follow.
//! The kernel queues the event within the rename that commits, so a
//! commit that completed before a call is seen by that call, as with the
//! stat. The events are drained before the cache is asked: a commit racing
//! the re-read leaves an event for the next call.

use std::os::fd::AsFd;

use appshot_vpm::{CachedRegistry, RegistryState, VpmError};
use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tracing::debug;

pub struct FreshRegistry {
    cache: CachedRegistry,
    /// What the cache last answered; `None` until it answered once, and
    /// again whenever it failed.
    state: Option<RegistryState>,
    /// `None` when no watch could be set (out of inotify instances, say):
    /// then every call asks the cache.
    watch: Option<Inotify>,
}

/// Whatever replaces, removes or creates the registry's file (or moves
/// the directory away) is one of these.
fn changes() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
}

/// The directory itself was removed or moved, or the watch is gone.
fn gone() -> AddWatchFlags {
    AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF | AddWatchFlags::IN_IGNORED
}

impl FreshRegistry {
    pub fn new(cache: CachedRegistry) -> FreshRegistry {
        let dir = cache.registry().dir().to_path_buf();
        let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .and_then(|w| w.add_watch(&dir, changes()).map(|_| w));
        if let Err(e) = &watch {
            debug!(dir = %dir.display(), "no inotify watch on the registry, a stat per call instead: {e}");
        }
        FreshRegistry {
            cache,
            state: None,
            watch: watch.ok(),
        }
    }

    /// The registry as of now.
    pub fn get(&mut self) -> Result<&RegistryState, VpmError> {
        if self.state.is_none() || self.changed() {
            self.state = None;
            self.state = Some(self.cache.get()?.clone());
        }
        Ok(self.state.as_ref().expect("set above"))
    }

    /// The registry as the last [`get`](Self::get) read it, without
    /// looking again: for a second look within one call, which the first
    /// made fresh.
    pub fn last(&self) -> Option<&RegistryState> {
        self.state.as_ref()
    }

    /// Whether the directory may have changed since the last look; drains
    /// the events that say so.
    fn changed(&mut self) -> bool {
        let Some(watch) = &self.watch else {
            return true;
        };
        let mut any = false;
        loop {
            match watch.read_events() {
                Ok(events) if !events.is_empty() => {
                    any = true;
                    if events.iter().any(|e| e.mask.intersects(gone())) {
                        // The path no longer leads to the watched
                        // directory: only the stat can follow it now.
                        self.watch = None;
                        return true;
                    }
                }
                Ok(_) | Err(Errno::EAGAIN) => return any,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    // Events may be lost: never trust the watch again.
                    debug!(fd = ?watch.as_fd(), "reading the registry watch: {e}");
                    self.watch = None;
                    return true;
                }
            }
        }
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

    fn real_ports(fresh: &mut FreshRegistry) -> Vec<u16> {
        let st = fresh.get().unwrap();
        st.translations.iter().map(|t| t.real_port).collect()
    }

    #[test]
    fn a_commit_is_seen_by_the_next_read() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _web) = registry(dir.path());
        let mut fresh = FreshRegistry::new(CachedRegistry::new(registry.clone()));
        assert!(fresh.watch.is_some(), "inotify watch set");
        assert_eq!(real_ports(&mut fresh), Vec::<u16>::new());
        for port in [20001, 20002] {
            registry
                .transaction(|st| st.insert(translation(port)))
                .unwrap();
            assert_eq!(real_ports(&mut fresh).last(), Some(&port));
        }
        // Nothing changed: answered from the copy, and the same.
        assert_eq!(real_ports(&mut fresh), [20001, 20002]);
    }

    #[test]
    fn a_registry_directory_moved_away_is_followed_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run");
        let (old, web) = registry(&path);
        let mut fresh = FreshRegistry::new(CachedRegistry::new(old));
        assert_eq!(real_ports(&mut fresh), Vec::<u16>::new());
        drop(web);
        std::fs::rename(&path, dir.path().join("old")).unwrap();
        let (again, _web) = registry(&path);
        again
            .transaction(|st| st.insert(translation(20003)))
            .unwrap();
        assert_eq!(real_ports(&mut fresh), [20003]);
        assert!(fresh.watch.is_none(), "the stat per call took over");
    }
}
