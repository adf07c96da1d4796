//! Restore and clone as the supervisor carries them out around
//! `appshot_snapshot::restore`: the namespace init with a stub per
//! top-level process, the instance's registry record, the rebuild, and on
//! failure the clean-up that leaves nothing half-built (no process, no
//! record, no translation of a port the rebuild had taken).
//!
//! The steps that reach the kernel are a [`RestoreHost`]; `Plan` and
//! [`restore`] decide, so their tests drive them with a recording double,
//! without root, as `multiplex/tests.rs` does the notified calls.

use std::time::{Duration, Instant};

use appshot_snapshot::image::InstanceInfo;
use appshot_snapshot::restore::Connections;
use appshot_vpm::Registry;
use tracing::info;

use super::{register, Launch};
use crate::error::RuntimeError;

/// How long the namespace init may take to fork the processes to restore
/// into.
pub const STUB_DEADLINE: Duration = Duration::from_secs(5);

/// What a restore or clone of one image does, decided from how it was
/// asked for and what the image says of its instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// A clone of a template: its pages are mapped from the image, shared
    /// copy-on-write with every other clone.
    pub clone: bool,
    pub connections: Connections,
    /// The image's connections are rebuilt or given up once restored, so
    /// the network lock its snapshot left on their packets goes.
    pub releases_netlock: bool,
    /// The processes the namespace init forks for the rebuild.
    pub stubs: usize,
    /// The namespace init the instance's record was made for with its lock
    /// (a claimed instance shell's, started ahead): if that init is the
    /// one started, the record is not written again.
    pub recorded_init: Option<u32>,
}

impl Plan {
    /// `stubs`: the image's top-level processes.
    pub fn new(clone: bool, tcp_close: bool, info: &InstanceInfo, stubs: usize) -> Plan {
        // Only the restore of a stopped instance can own its connections: a
        // live snapshot's original still has them, and templates and clones
        // are copies.
        let connections = if clone || tcp_close || info.template || info.left_running {
            Connections::Close
        } else {
            Connections::Own
        };
        Plan {
            clone,
            connections,
            releases_netlock: connections == Connections::Own || tcp_close,
            stubs,
            recorded_init: None,
        }
    }
}

/// The steps of a restore that act on the host.
pub trait RestoreHost {
    /// The namespace init as the host holds it (a pidfd).
    type Init;
    /// A restored process's seccomp listener.
    type Listener;
    /// Starts the namespace init that forks the stubs; returns its PID.
    fn start_init(&mut self) -> Result<(u32, Self::Init), RuntimeError>;
    /// The processes below the namespace init, init itself left out.
    fn stubs(&mut self, init_pid: u32) -> Vec<u32>;
    /// Rebuilds the image in `stubs`; returns each process's listener and
    /// our PID of the main process. Restored listening sockets register
    /// their translations as they are bound.
    fn rebuild(
        &mut self,
        stubs: &[u32],
        plan: &Plan,
    ) -> Result<(Vec<Self::Listener>, u32), RuntimeError>;
    /// Kills the namespace init, and so every process of the namespace,
    /// waits for it, and ends what the instance started besides (its
    /// negotiations with other hosts).
    fn kill(&mut self, init: &Self::Init, init_pid: u32);
    /// Lets the image's connections' packets flow again.
    fn release_netlock(&mut self);
}

/// A restored instance, its processes released.
pub struct Restored<H: RestoreHost> {
    pub init_pid: u32,
    pub init: H::Init,
    pub listeners: Vec<H::Listener>,
    pub main: u32,
}

/// Restores `launch`'s instance as `plan` says. The instance is listed
/// (as its supervisor published it: `restoring`) while it is rebuilt; if the rebuild
/// fails, its processes are killed and its registry record goes with
/// every translation registered meanwhile.
pub fn restore<H: RestoreHost>(
    host: &mut H,
    plan: &Plan,
    registry: &Registry,
    launch: &Launch,
    stub_deadline: Duration,
) -> Result<Restored<H>, RuntimeError> {
    let (init_pid, init) = host.start_init()?;
    let started = Instant::now();
    let recorded = match plan.recorded_init {
        Some(pid) if pid == init_pid => Ok(()),
        _ => register(registry, launch, init_pid),
    };
    let rebuilt = recorded
        .and_then(|()| wait_for_stubs(host, init_pid, plan.stubs, &launch.name, stub_deadline))
        .and_then(|stubs| host.rebuild(&stubs, plan));
    if rebuilt.is_ok() && plan.releases_netlock {
        host.release_netlock();
    }
    info!(name = %launch.name, ms = started.elapsed().as_secs_f64() * 1e3, clone = plan.clone, "restore work done");
    match rebuilt {
        Ok((listeners, main)) => Ok(Restored {
            init_pid,
            init,
            listeners,
            main,
        }),
        Err(e) => {
            // Nothing half-built survives: the namespace goes with its
            // init, and the sockets' translations with the instance record.
            host.kill(&init, init_pid);
            registry.transaction(|s| s.remove_instance(&launch.name))?;
            Err(e)
        }
    }
}

fn wait_for_stubs<H: RestoreHost>(
    host: &mut H,
    init_pid: u32,
    wanted: usize,
    name: &str,
    deadline: Duration,
) -> Result<Vec<u32>, RuntimeError> {
    let deadline = Instant::now() + deadline;
    loop {
        let stubs = host.stubs(init_pid);
        if stubs.len() >= wanted {
            return Ok(stubs);
        }
        if Instant::now() > deadline {
            return Err(RuntimeError::Start {
                name: name.to_string(),
                reason: format!(
                    "the namespace init created {} of {wanted} processes to restore into",
                    stubs.len()
                ),
            });
        }
        // Init forks them within a few ms of its exec; a coarser poll
        // would add up to its period to every restore.
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use appshot_snapshot::image::InstanceInfo;
    use appshot_snapshot::restore::Connections;
    use appshot_vpm::{InstanceLock, Protocol, Registry, Translation};

    use super::{restore, Plan, RestoreHost};
    use crate::error::RuntimeError;
    use crate::supervisor::tests::launch;
    use crate::supervisor::Mode;

    const INIT: u32 = 100;

    /// What the orchestration did to the host, as the double recorded it.
    #[derive(Debug, PartialEq, Eq)]
    enum Op {
        StartInit,
        Rebuild(Vec<u32>, Connections, bool),
        Kill(u32),
        ReleaseNetlock,
    }

    /// The host as a test arranges it: how many stubs the init forks,
    /// the real ports the rebuild's listening sockets register (as the
    /// multiplexer does while they are bound) and whether it then fails.
    struct Double {
        registry: Registry,
        stubs: Vec<u32>,
        listeners: Vec<(u16, u16)>,
        fails: bool,
        ops: Vec<Op>,
    }

    impl RestoreHost for Double {
        type Init = ();
        type Listener = u16;

        fn start_init(&mut self) -> Result<(u32, ()), RuntimeError> {
            self.ops.push(Op::StartInit);
            Ok((INIT, ()))
        }

        fn stubs(&mut self, init_pid: u32) -> Vec<u32> {
            assert_eq!(init_pid, INIT);
            self.stubs.clone()
        }

        fn rebuild(&mut self, stubs: &[u32], plan: &Plan) -> Result<(Vec<u16>, u32), RuntimeError> {
            self.ops
                .push(Op::Rebuild(stubs.to_vec(), plan.connections, plan.clone));
            for (i, &(virtual_port, real_port)) in self.listeners.iter().enumerate() {
                self.registry
                    .transaction(|s| {
                        s.insert(Translation {
                            protocol: Protocol::Tcp,
                            addr: "0.0.0.0".parse().unwrap(),
                            virtual_port,
                            aid: "a".into(),
                            real_port,
                            owner: "web".into(),
                            socket_inode: 1000 + i as u64,
                        })
                    })
                    .unwrap();
            }
            if self.fails {
                return Err(RuntimeError::Start {
                    name: "web".into(),
                    reason: "rebuild failed".into(),
                });
            }
            Ok((self.listeners.iter().map(|l| l.1).collect(), stubs[0]))
        }

        fn kill(&mut self, _init: &(), init_pid: u32) {
            self.ops.push(Op::Kill(init_pid));
        }

        fn release_netlock(&mut self) {
            self.ops.push(Op::ReleaseNetlock);
        }
    }

    struct World {
        dir: tempfile::TempDir,
        host: Double,
        /// Held as the supervisor holds it: an instance without it is
        /// dead, and its rows are reclaimed.
        _lock: InstanceLock,
    }

    impl World {
        fn new(stubs: &[u32], listeners: &[(u16, u16)], fails: bool) -> World {
            let dir = tempfile::tempdir().unwrap();
            let registry = Registry::open(&dir.path().join("run")).unwrap();
            let lock = InstanceLock::acquire(&registry, "web").unwrap();
            let host = Double {
                registry,
                stubs: stubs.to_vec(),
                listeners: listeners.to_vec(),
                fails,
                ops: Vec::new(),
            };
            World {
                dir,
                host,
                _lock: lock,
            }
        }

        fn restore(&mut self, plan: &Plan) -> Result<super::Restored<Double>, RuntimeError> {
            let registry = Registry::open(&self.dir.path().join("run")).unwrap();
            let restore_mode = Mode::Restore {
                image: "/i.img".into(),
                tcp_close: false,
                lazy: None,
            };
            restore(
                &mut self.host,
                plan,
                &registry,
                &launch(restore_mode),
                Duration::ZERO,
            )
        }

        /// The instance's record and its translations, as `ps` and
        /// `ports` would see them.
        fn listed(&self) -> (bool, Vec<(u16, u16)>) {
            let state = self.host.registry.read().unwrap();
            let ports = state
                .translations_of("web")
                .map(|t| (t.virtual_port, t.real_port))
                .collect();
            (state.instances.contains_key("web"), ports)
        }
    }

    fn image(template: bool, left_running: bool) -> InstanceInfo {
        InstanceInfo {
            name: "web".into(),
            aid: "a".into(),
            command: vec!["server".into()],
            multiplexed: vec![9000],
            template,
            left_running,
        }
    }

    #[test]
    fn only_the_restore_of_a_stopped_instance_owns_its_connections() {
        let own = |clone, tcp_close, template, left_running| {
            let plan = Plan::new(clone, tcp_close, &image(template, left_running), 1);
            (plan.connections, plan.releases_netlock)
        };
        assert_eq!(own(false, false, false, false), (Connections::Own, true));
        // --tcp-close gives the connections up: their packets flow again.
        assert_eq!(own(false, true, false, false), (Connections::Close, true));
        // A live snapshot's original still holds its connections and their
        // lock is its own; a template's and its clones' are copies.
        assert_eq!(own(false, false, false, true), (Connections::Close, false));
        assert_eq!(own(false, false, true, false), (Connections::Close, false));
        assert_eq!(own(true, false, true, false), (Connections::Close, false));
    }

    #[test]
    fn a_clone_rebuilds_with_its_connections_reset_and_its_pages_shared() {
        let mut w = World::new(&[201], &[(9000, 20001)], false);
        let plan = Plan::new(true, false, &image(true, false), 1);
        let restored = w.restore(&plan).unwrap();
        assert_eq!(
            w.host.ops,
            [
                Op::StartInit,
                Op::Rebuild(vec![201], Connections::Close, true)
            ]
        );
        assert_eq!((restored.main, restored.listeners), (201, vec![20001]));
        assert_eq!(w.listed(), (true, vec![(9000, 20001)]));
    }

    #[test]
    fn a_restore_that_owns_its_connections_releases_their_lock_once_rebuilt() {
        let mut w = World::new(&[201, 202], &[], false);
        let plan = Plan::new(false, false, &image(false, false), 2);
        w.restore(&plan).unwrap();
        assert_eq!(
            w.host.ops,
            [
                Op::StartInit,
                Op::Rebuild(vec![201, 202], Connections::Own, false),
                Op::ReleaseNetlock
            ]
        );
    }

    #[test]
    fn a_failed_restore_kills_its_processes_and_releases_the_ports_it_registered() {
        let mut w = World::new(&[201], &[(9000, 20001), (80, 20002)], true);
        let plan = Plan::new(false, false, &image(false, false), 1);
        assert!(w.restore(&plan).is_err());
        assert_eq!(
            w.host.ops,
            [
                Op::StartInit,
                Op::Rebuild(vec![201], Connections::Own, false),
                Op::Kill(INIT)
            ],
            "the lock of connections that did not come back stays"
        );
        assert_eq!(w.listed(), (false, vec![]));
    }

    #[test]
    fn too_few_stubs_fail_the_restore_before_any_rebuild() {
        let mut w = World::new(&[201], &[], false);
        let plan = Plan::new(false, false, &image(false, false), 2);
        let Err(RuntimeError::Start { reason, .. }) = w.restore(&plan) else {
            panic!("restored into too few processes");
        };
        assert!(reason.contains("1 of 2"), "{reason}");
        assert_eq!(w.host.ops, [Op::StartInit, Op::Kill(INIT)]);
        assert_eq!(w.listed(), (false, vec![]));
    }

    /// A claimed shell's clone was recorded with its lock, for the init
    /// that is then started: the restore writes no record again (the
    /// double's one, marked, stays); an init other than the recorded one
    /// is recorded as any.
    #[test]
    fn a_clone_recorded_with_its_lock_for_its_init_is_not_recorded_again() {
        for (recorded, rewritten) in [(INIT, false), (INIT + 1, true)] {
            let mut w = World::new(&[201], &[], false);
            w.host
                .registry
                .transaction(|s| {
                    let mut r = super::super::record_of(&launch(Mode::Run), recorded);
                    r.command = vec!["marked".into()];
                    s.instances.insert("web".into(), r);
                })
                .unwrap();
            let mut plan = Plan::new(true, false, &image(true, false), 1);
            plan.recorded_init = Some(recorded);
            w.restore(&plan).unwrap();
            let state = w.host.registry.read().unwrap();
            let record = &state.instances["web"];
            assert_eq!(record.command == ["marked"], !rewritten, "{record:?}");
            assert_eq!(record.pid, if rewritten { INIT } else { recorded });
        }
    }
}
