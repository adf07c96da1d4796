use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::*;
use crate::translation::tests::{record, tcp};

fn registry() -> (tempfile::TempDir, Registry) {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::open(&tmp.path().join("run/appshot")).unwrap();
    (tmp, registry)
}

/// What the database holds, read directly (no liveness filter, no repair).
fn on_disk(registry: &Registry) -> RegistryState {
    match Db::open_existing(&registry.db_path()).unwrap() {
        Some(mut db) => db.snapshot().unwrap().state.clone(),
        None => panic!("no database in {}", registry.dir().display()),
    }
}

fn register(registry: &Registry, name: &str, aid: &str, real_port: u16) {
    registry
        .transaction(|s| {
            s.instances.insert(name.into(), record(name, aid));
            s.insert(tcp("0.0.0.0", 9000, aid, real_port, name));
        })
        .unwrap();
}

#[test]
fn open_creates_the_directories() {
    let (_tmp, registry) = registry();
    assert!(registry.dir().join("instances").is_dir());
    assert!(Registry::open(registry.dir()).is_ok());
}

#[test]
fn transaction_round_trip() {
    let (_tmp, registry) = registry();
    assert_eq!(registry.read().unwrap(), RegistryState::default());
    let _alive = InstanceLock::acquire(&registry, "i1").unwrap();

    let answer = registry
        .transaction(|s| {
            s.instances.insert("i1".into(), record("i1", "a"));
            s.insert(tcp("0.0.0.0", 9000, "a", 9000, "i1"));
            42
        })
        .unwrap();
    assert_eq!(answer, 42);

    let state = registry.read().unwrap();
    assert_eq!(state.generation, 1);
    assert_eq!(state.instances["i1"], record("i1", "a"));
    assert_eq!(state.translations, [tcp("0.0.0.0", 9000, "a", 9000, "i1")]);

    let seen = registry.transaction(|s| s.clone()).unwrap();
    assert_eq!(seen, state);
    assert_eq!(
        registry.read().unwrap().generation,
        1,
        "no change, no commit"
    );

    registry
        .transaction(|s| s.remove_socket("i1", 9000))
        .unwrap();
    let state = registry.read().unwrap();
    assert_eq!(state.generation, 2);
    assert!(state.translations.is_empty());
}

#[test]
fn corrupt_state_is_reported_with_its_path() {
    let (_tmp, registry) = registry();
    let path = registry.db_path();
    fs::write(&path, b"not a database, and not empty either").unwrap();

    let expect_corrupt = |err: VpmError| match err {
        VpmError::Corrupt { path: reported, .. } => assert_eq!(reported, path),
        other => panic!("expected Corrupt, got {other:?}"),
    };
    expect_corrupt(registry.transaction(|_| ()).unwrap_err());
    expect_corrupt(registry.read().unwrap_err());
    let err = registry.read().unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn handles_see_each_others_commits() {
    let (_tmp, first) = registry();
    let second = Registry::open(first.dir()).unwrap();
    let _a = InstanceLock::acquire(&first, "a1").unwrap();
    let _b = InstanceLock::acquire(&second, "b1").unwrap();

    register(&first, "a1", "a", 9000);
    register(&second, "b1", "b", 40000);

    for handle in [&first, &second] {
        let state = handle.read().unwrap();
        assert_eq!(state.generation, 2);
        assert_eq!(state.instances.keys().collect::<Vec<_>>(), ["a1", "b1"]);
        assert_eq!(state.translations.len(), 2);
    }
}

#[test]
fn name_in_use_within_one_process() {
    let (_tmp, registry) = registry();
    let held = InstanceLock::acquire(&registry, "web").unwrap();
    assert!(held.instance_dir().is_dir());
    assert!(is_alive(registry.dir(), "web"));
    match InstanceLock::acquire(&registry, "web") {
        Err(VpmError::NameInUse(name)) => assert_eq!(name, "web"),
        other => panic!("expected NameInUse, got {other:?}"),
    }
    assert!(
        held.instance_dir().is_dir(),
        "a refused acquire leaves the holder alone"
    );
    assert!(is_alive(registry.dir(), "web"));

    let dir = held.instance_dir().to_path_buf();
    drop(held);
    assert!(!dir.exists());
    assert!(!is_alive(registry.dir(), "web"));
    assert!(InstanceLock::acquire(&registry, "web").is_ok());
}

#[test]
fn invalid_names_are_rejected() {
    let (_tmp, registry) = registry();
    for name in ["", ".", "..", "a/b", "../x"] {
        match InstanceLock::acquire(&registry, name) {
            Err(VpmError::Io { error, .. }) => {
                assert_eq!(error.kind(), io::ErrorKind::InvalidInput)
            }
            other => panic!("expected InvalidInput for {name:?}, got {other:?}"),
        }
        assert!(!is_alive(registry.dir(), name));
    }
}

#[test]
fn dead_instances_are_hidden_from_reads_and_reclaimed_by_transactions() {
    let (_tmp, registry) = registry();
    let survivor = InstanceLock::acquire(&registry, "live").unwrap();
    let stale = InstanceLock::acquire(&registry, "dead").unwrap();
    register(&registry, "live", "a", 9000);
    register(&registry, "dead", "a", 40000);
    // An orphan translation without a record is reclaimed too.
    registry
        .transaction(|s| s.insert(tcp("::", 8080, "a", 40001, "dead")))
        .unwrap();
    assert!(is_alive(registry.dir(), "dead"));
    drop(stale);
    assert!(!is_alive(registry.dir(), "dead"));

    let read = registry.read().unwrap();
    assert_eq!(read.instances.keys().collect::<Vec<_>>(), ["live"]);
    assert!(read.translations.iter().all(|t| t.owner == "live"));
    let stored = on_disk(&registry);
    assert_eq!(stored.translations.len(), 3, "reads never write");

    let seen = registry.transaction(|s| s.clone()).unwrap();
    assert_eq!(seen.instances.keys().collect::<Vec<_>>(), ["live"]);
    assert_eq!(seen.translations, [tcp("0.0.0.0", 9000, "a", 9000, "live")]);
    let committed = on_disk(&registry);
    assert_eq!(committed.generation, stored.generation + 1);
    assert_eq!(committed.translations, seen.translations);
    assert!(survivor.instance_dir().is_dir());
}

#[test]
fn directories_of_dead_supervisors_are_removed() {
    let (_tmp, registry) = registry();
    let live = InstanceLock::acquire(&registry, "live").unwrap();
    let ghost = registry.dir().join("instances/ghost");
    fs::create_dir_all(&ghost).unwrap();
    fs::write(ghost.join("lock"), b"").unwrap();
    let empty = registry.dir().join("instances/empty");
    fs::create_dir_all(&empty).unwrap();

    registry.transaction(|_| ()).unwrap();
    assert!(!ghost.exists());
    assert!(!empty.exists());
    assert!(live.instance_dir().is_dir());
    assert_eq!(on_disk(&registry).generation, 0, "nothing changed");
}

const CHILD_ENV: &str = "APPSHOT_VPM_TEST_LOCK_CHILD";
const CHILD_READY: &str = "instance lock held";

/// Not a test: the body of the child process in
/// `a_killed_supervisor_is_reclaimed`, which holds an instance lock until its
/// stdin closes or it is killed.
#[test]
#[ignore]
fn instance_lock_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let registry = Registry::open(Path::new(&dir)).unwrap();
    let _lock = InstanceLock::acquire(&registry, "child").unwrap();
    println!("{CHILD_READY}");
    io::copy(&mut io::stdin(), &mut io::sink()).unwrap();
}

/// A process holding the instance lock of "child" in `registry`, until it
/// is killed or its stdin closes.
fn lock_holding_child(registry: &Registry) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "registry::tests::instance_lock_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, registry.dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map(Result::unwrap)
        .any(|line| line.contains(CHILD_READY));
    assert!(ready, "child exited without taking the lock");
    child
}

#[test]
fn a_killed_supervisor_is_reclaimed() {
    let (_tmp, registry) = registry();
    let mut child = lock_holding_child(&registry);

    assert!(is_alive(registry.dir(), "child"));
    assert!(matches!(
        InstanceLock::acquire(&registry, "child"),
        Err(VpmError::NameInUse(_))
    ));
    register(&registry, "child", "a", 9000);
    assert_eq!(registry.read().unwrap().translations.len(), 1);

    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!is_alive(registry.dir(), "child"));
    assert!(registry.dir().join("instances/child").is_dir());

    let state = registry.transaction(|s| s.clone()).unwrap();
    assert!(state.instances.is_empty());
    assert!(state.translations.is_empty());
    assert!(!registry.dir().join("instances/child").exists());
}

#[test]
fn cache_rereads_only_after_a_commit() {
    let (_tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "i1").unwrap();
    let mut cache = CachedRegistry::new(registry.clone());
    assert_eq!(cache.get().unwrap().translations, []);

    register(&registry, "i1", "a", 9000);
    assert_eq!(cache.get().unwrap().generation, 1);
    assert_eq!(cache.get().unwrap().translations.len(), 1);
    registry.transaction(|_| ()).unwrap();
    assert_eq!(cache.get().unwrap().generation, 1, "no change, no commit");

    // A file renamed over it (with its WAL gone, which would otherwise
    // supply the pages it lacks) is a new database, whatever it holds.
    for file in [store::WAL_FILE, store::SHM_FILE] {
        fs::remove_file(registry.dir().join(file)).unwrap();
    }
    let staging = registry.dir().join("garbage");
    fs::write(&staging, b"garbage that is no database").unwrap();
    fs::rename(&staging, registry.db_path()).unwrap();
    // No commit raised the change counter: the file is looked at again
    // once the counter is no longer trusted alone.
    std::thread::sleep(cache::RECHECK);
    assert!(matches!(cache.get(), Err(VpmError::Corrupt { .. })));
    assert!(matches!(registry.read(), Err(VpmError::Corrupt { .. })));

    // Gone while i1 runs: i1's records come back from its own copy.
    fs::remove_file(registry.db_path()).unwrap();
    let rebuilt = cache.get().unwrap();
    assert_eq!(rebuilt.instances["i1"], record("i1", "a"));
    assert_eq!(
        rebuilt.translations,
        [tcp("0.0.0.0", 9000, "a", 9000, "i1")]
    );
    registry
        .transaction(|s| {
            s.instances.insert("i1".into(), record("i1", "b"));
        })
        .unwrap();
    let state = cache.get().unwrap();
    assert_eq!(state.instances["i1"].aid, "b");
    assert_eq!(cache.registry().dir(), registry.dir());
}

static RECLAIMED: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

fn record_reclaim(dir: &Path, names: &[String]) {
    let mut seen = RECLAIMED.lock().unwrap();
    seen.extend(names.iter().map(|n| (dir.to_path_buf(), n.clone())));
}

/// What the hook was told about `dir` so far (other tests share the hook).
fn reclaimed_in(dir: &Path) -> Vec<String> {
    RECLAIMED
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d == dir)
        .map(|(_, n)| n.clone())
        .collect()
}

fn source_rule(owner: &str) -> crate::SourceRuleRecord {
    crate::SourceRuleRecord {
        protocol: crate::Protocol::Tcp,
        owner: owner.into(),
        aid: "b".into(),
        source: "10.9.0.0/24".into(),
        source_port: None,
        virtual_port: 9000,
        real_port: Some(20001),
    }
}

#[test]
fn reclaim_drops_source_rules_and_tells_the_hook() {
    set_reclaim_hook(record_reclaim);
    let (_tmp, registry) = registry();
    let _alive = InstanceLock::acquire(&registry, "live").unwrap();
    let before = reclaimed_in(registry.dir()).len();
    // "gone" holds no lock: its supervisor is dead. Its only trace is a
    // source rule, which must be enough to reclaim it.
    registry
        .transaction(|s| {
            s.source_rules
                .extend([source_rule("live"), source_rule("gone")])
        })
        .unwrap();
    let after = registry.transaction(|s| s.clone()).unwrap();
    assert_eq!(after.source_rules, vec![source_rule("live")]);
    let seen = reclaimed_in(registry.dir());
    assert_eq!(seen[before..], ["gone".to_string()], "{seen:?}");
}

#[test]
fn a_new_holder_of_a_name_drops_what_its_dead_predecessor_left() {
    set_reclaim_hook(record_reclaim);
    let (_tmp, registry) = registry();
    let _other = InstanceLock::acquire(&registry, "other").unwrap();
    register(&registry, "other", "b", 9100);
    let mut child = lock_holding_child(&registry);
    register(&registry, "child", "a", 9000);
    registry
        .transaction(|s| s.source_rules.push(source_rule("child")))
        .unwrap();

    // The supervisor is killed: nothing reclaims its entries before a new
    // instance takes the name.
    child.kill().unwrap();
    child.wait().unwrap();
    let told = reclaimed_in(registry.dir()).len();
    let successor = InstanceLock::acquire(&registry, "child").unwrap();
    assert_eq!(successor.name(), "child");

    // The name is alive again, so reads and transactions would keep the
    // old entries for good had the acquire not removed them.
    for state in [
        registry.read().unwrap(),
        registry.transaction(|s| s.clone()).unwrap(),
        on_disk(&registry),
    ] {
        assert!(!state.instances.contains_key("child"), "{state:?}");
        assert!(state.translations_of("child").next().is_none(), "{state:?}");
        assert!(state.source_rules.is_empty(), "{state:?}");
        assert_eq!(state.translations_of("other").count(), 1, "{state:?}");
        assert!(state.instances.contains_key("other"), "{state:?}");
    }
    let seen = reclaimed_in(registry.dir());
    assert_eq!(seen[told..], ["child".to_string()], "{seen:?}");
    assert!(successor.instance_dir().join("lock").is_file());
    assert!(is_alive(registry.dir(), "child"));
}

#[test]
fn the_run_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let (tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "i1").unwrap();
    register(&registry, "i1", "a", 9000);
    let dir = registry.dir();
    assert_eq!(mode(dir), 0o700);
    assert_eq!(mode(&dir.join("instances")), 0o700);
    assert_eq!(mode(&dir.join("instances/i1")), 0o700);
    assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
    for file in [
        store::DB_FILE,
        store::WAL_FILE,
        store::SHM_FILE,
        store::CHANGES_FILE,
    ] {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&dir.join("instances/i1/lock")), 0o600);
    let logs = registry.private_subdir("logs").unwrap();
    assert_eq!(logs, dir.join("logs"));
    assert_eq!(mode(&logs), 0o700);

    // A registry made by an older version, open to everyone, is closed.
    let chmod = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    for d in [dir.to_path_buf(), dir.join("instances"), logs.clone()] {
        chmod(&d, 0o755);
    }
    chmod(&dir.join(LOCK_FILE), 0o644);
    chmod(&dir.join(store::DB_FILE), 0o644);
    chmod(&dir.join(store::WAL_FILE), 0o644);
    let reopened = Registry::open(dir).unwrap();
    assert_eq!(reopened.private_subdir("logs").unwrap(), logs);
    assert_eq!(mode(dir), 0o700);
    assert_eq!(mode(&dir.join("instances")), 0o700);
    assert_eq!(mode(&logs), 0o700);
    assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
    assert_eq!(mode(&dir.join(store::DB_FILE)), 0o600);
    assert_eq!(mode(&dir.join(store::WAL_FILE)), 0o600);
    register(&reopened, "i1", "b", 9001);

    // A shared directory (sticky, like /tmp) or one that is no run
    // directory is left as it is.
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    Registry::open(&shared).unwrap();
    assert_eq!(mode(&shared), 0o1777);
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign).unwrap();
    fs::write(foreign.join("somebody-elses-file"), b"").unwrap();
    chmod(&foreign, 0o755);
    Registry::open(&foreign).unwrap();
    assert_eq!(mode(&foreign), 0o755);
    assert_eq!(mode(&foreign.join("instances")), 0o700);
    // One that holds only what appshot keeps there is a run directory,
    // e.g. one `appshot clone` made before any registry existed.
    let early = tmp.path().join("early");
    fs::create_dir_all(early.join("verified")).unwrap();
    chmod(&early, 0o755);
    Registry::open(&early).unwrap();
    assert_eq!(mode(&early), 0o700);
}

fn own_copy(registry: &Registry, name: &str) -> PathBuf {
    registry
        .dir()
        .join("instances")
        .join(name)
        .join("records.json")
}

fn route_for(state: &RegistryState, port: u16, aid: &str) -> crate::Route {
    state.route(
        crate::Protocol::Tcp,
        "127.0.0.1".parse().unwrap(),
        port,
        aid,
        0,
    )
}

#[test]
fn every_commit_keeps_a_private_own_copy_per_live_instance() {
    use std::os::unix::fs::PermissionsExt;
    let (_tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "i1").unwrap();
    // There from the moment the lock is held, so readers never take the
    // new instance for a damaged one.
    assert_eq!(
        own::read(_lock.instance_dir()).unwrap(),
        OwnRecords::default()
    );
    register(&registry, "i1", "a", 9000);
    let copy = own_copy(&registry, "i1");
    let own = own::read(copy.parent().unwrap()).unwrap();
    assert_eq!(own.instance, Some(record("i1", "a")));
    assert_eq!(own.translations, [tcp("0.0.0.0", 9000, "a", 9000, "i1")]);
    assert_eq!(
        fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_deleted_registry_is_rebuilt_from_the_live_instances() {
    let (_tmp, registry) = registry();
    let _a = InstanceLock::acquire(&registry, "web-a").unwrap();
    let _b = InstanceLock::acquire(&registry, "web-b").unwrap();
    register(&registry, "web-a", "a", 9000);
    register(&registry, "web-b", "b", 40000);
    let before = registry.read().unwrap();
    let mut cache = CachedRegistry::new(registry.clone());
    cache.get().unwrap();

    // Its WAL and shared memory stay, as `rm registry.db` leaves them.
    let path = registry.db_path();
    fs::remove_file(&path).unwrap();
    for state in [registry.read().unwrap(), cache.get().unwrap().clone()] {
        assert_eq!(state.instances, before.instances);
        assert_eq!(state.translations.len(), 2, "{state:?}");
        assert!(state.damaged.is_empty());
        assert_eq!(
            route_for(&state, 9000, "b"),
            crate::Route::To {
                real_port: 40000,
                owner: "web-b".into()
            }
        );
        assert_eq!(route_for(&state, 9000, "z"), crate::Route::Refused);
    }
    assert!(!path.exists(), "reads never write");

    // A transaction commits the repair.
    let repaired = registry.transaction(|s| s.clone()).unwrap();
    assert_eq!(repaired.instances, before.instances);
    let stored = on_disk(&registry);
    assert_eq!(stored.instances, before.instances);
    assert_eq!(stored.translations.len(), 2);
    assert_eq!(cache.get().unwrap().instances, before.instances);
}

#[test]
fn a_registry_replaced_by_an_empty_file_gets_the_live_instances_own_records_back() {
    let (_tmp, registry) = registry();
    let _a = InstanceLock::acquire(&registry, "web-a").unwrap();
    register(&registry, "web-a", "a", 9000);
    let mut cache = CachedRegistry::new(registry.clone());
    assert_eq!(cache.get().unwrap().translations.len(), 1);

    for file in [store::DB_FILE, store::WAL_FILE, store::SHM_FILE] {
        fs::remove_file(registry.dir().join(file)).unwrap();
    }
    fs::write(registry.db_path(), b"").unwrap();
    for state in [
        cache.get().unwrap().clone(),
        registry.read().unwrap(),
        registry.transaction(|s| s.clone()).unwrap(),
        on_disk(&registry),
        cache.get().unwrap().clone(),
    ] {
        assert_eq!(state.instances["web-a"], record("web-a", "a"));
        assert_eq!(
            state.translations,
            [tcp("0.0.0.0", 9000, "a", 9000, "web-a")]
        );
    }
}

#[test]
fn unreadable_own_records_of_a_live_instance_fail_closed() {
    let (_tmp, registry) = registry();
    let a_lock = InstanceLock::acquire(&registry, "web-a").unwrap();
    let _b = InstanceLock::acquire(&registry, "web-b").unwrap();
    register(&registry, "web-a", "a", 9000);
    register(&registry, "web-b", "b", 40000);
    fs::remove_file(own_copy(&registry, "web-a")).unwrap();
    fs::remove_file(registry.db_path()).unwrap();

    let mut cache = CachedRegistry::new(registry.clone());
    for state in [registry.read().unwrap(), cache.get().unwrap().clone()] {
        assert_eq!(state.damaged, BTreeSet::from(["web-a".to_string()]));
        // web-a may hold 9000 itself, or any port: nothing passes through.
        assert_eq!(route_for(&state, 9000, "z"), crate::Route::Refused);
        assert_eq!(route_for(&state, 5432, "z"), crate::Route::Refused);
        // What is known still routes.
        assert_eq!(
            route_for(&state, 9000, "b"),
            crate::Route::To {
                real_port: 40000,
                owner: "web-b".into()
            }
        );
    }

    // Commits neither rewrite the lost copy from what the registry holds
    // nor clear the damage, until web-a ends.
    registry
        .transaction(|s| s.insert(tcp("0.0.0.0", 9001, "a", 9001, "web-a")))
        .unwrap();
    assert!(!own_copy(&registry, "web-a").exists());
    assert_eq!(registry.read().unwrap().damaged.len(), 1);
    drop(a_lock);
    registry
        .transaction(|s| s.remove_instance("web-a"))
        .unwrap();
    let state = registry.read().unwrap();
    assert!(state.damaged.is_empty());
    assert_eq!(route_for(&state, 5432, "z"), crate::Route::PassThrough);
}

#[test]
fn reconcile_restores_differences_and_reports_unreadable_copies() {
    let mut state = RegistryState::default();
    state.instances.insert("same".into(), record("same", "a"));
    state.insert(tcp("0.0.0.0", 9000, "a", 9000, "same"));
    state.insert(tcp("0.0.0.0", 9000, "b", 40000, "lost"));
    let same = OwnRecords::of(&state, "same");
    let lost = OwnRecords {
        instance: Some(record("lost", "b")),
        translations: vec![tcp("0.0.0.0", 9000, "b", 40001, "lost")],
        source_rules: vec![source_rule("lost")],
    };
    let live = vec![
        ("same".to_string(), Ok(same)),
        ("lost".to_string(), Ok(lost.clone())),
        (
            "gone".to_string(),
            Err(VpmError::Corrupt {
                path: "x".into(),
                message: "y".into(),
            }),
        ),
    ];
    let found = own::reconcile(&mut state, &live);
    assert_eq!(found.repaired, BTreeSet::from(["lost".to_string()]));
    assert_eq!(found.damaged.keys().collect::<Vec<_>>(), ["gone"]);
    assert_eq!(OwnRecords::of(&state, "lost"), lost);
    assert_eq!(state.translations_of("same").count(), 1);
}

#[test]
fn an_own_copy_speaking_for_another_instance_is_corrupt() {
    let (_tmp, registry) = registry();
    let lock = InstanceLock::acquire(&registry, "web-a").unwrap();
    let copy = own_copy(&registry, "web-a");
    let own = OwnRecords {
        translations: vec![tcp("0.0.0.0", 9000, "a", 9000, "web-b")],
        ..OwnRecords::default()
    };
    fs::write(&copy, serde_json::to_vec(&own).unwrap()).unwrap();
    match own::read(lock.instance_dir()) {
        Err(VpmError::Corrupt { path, .. }) => assert_eq!(path, copy),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_new_holder_does_not_inherit_its_dead_predecessors_copy() {
    let (_tmp, registry) = registry();
    let mut child = lock_holding_child(&registry);
    register(&registry, "child", "a", 9000);
    child.kill().unwrap();
    child.wait().unwrap();
    fs::remove_file(registry.db_path()).unwrap();

    let successor = InstanceLock::acquire(&registry, "child").unwrap();
    let state = registry.read().unwrap();
    assert!(state.translations.is_empty(), "{state:?}");
    assert!(state.damaged.is_empty());
    assert_eq!(
        own::read(successor.instance_dir()).unwrap(),
        OwnRecords::default()
    );
}

#[test]
fn concurrent_writers_from_threads_lose_nothing() {
    let (_tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "many").unwrap();
    const THREADS: u16 = 4;
    const EACH: u16 = 25;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            // A handle of its own per thread, as separate supervisors have.
            let handle = Registry::open(registry.dir()).unwrap();
            scope.spawn(move || {
                for i in 0..EACH {
                    let port = 20000 + t * EACH + i;
                    handle
                        .transaction(|s| s.insert(tcp("0.0.0.0", 9000, "a", port, "many")))
                        .unwrap();
                    // Readers run beside the writers and never fail.
                    assert!(handle.read().unwrap().translations.len() > usize::from(i));
                }
            });
        }
    });
    let state = registry.read().unwrap();
    let ports: BTreeSet<u16> = state.translations.iter().map(|t| t.real_port).collect();
    assert_eq!(ports.len(), usize::from(THREADS * EACH));
    assert_eq!(state.generation, u64::from(THREADS * EACH));
    assert_eq!(
        own::read(_lock.instance_dir()).unwrap().translations.len(),
        usize::from(THREADS * EACH)
    );
}

const WRITER_ENV: &str = "APPSHOT_VPM_TEST_WRITER";
const IN_TRANSACTION: &str = "inside the transaction";

/// Not a test: the body of the writer processes of the tests below. With
/// `APPSHOT_VPM_TEST_WRITER=DIR:NAME:MODE`, MODE `loop` commits forever,
/// each commit replacing NAME's translations (200 of them) and its record;
/// `hang` changes NAME's records inside a transaction, says so, and waits
/// there for stdin to close (or for its kill).
#[test]
#[ignore]
fn registry_writer_child() {
    let Some(spec) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let spec = spec.into_string().unwrap();
    let mut parts = spec.splitn(3, ':');
    let (dir, name, mode) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let registry = Registry::open(Path::new(dir)).unwrap();
    match mode {
        "loop" => {
            for round in 0u32.. {
                registry
                    .transaction(|s| {
                        s.remove_instance(name);
                        let mut rec = record(name, "a");
                        rec.started_unix = u64::from(round);
                        s.instances.insert(name.into(), rec);
                        for i in 0..200u16 {
                            let mut t = tcp("0.0.0.0", 9000, "a", 30000 + i, name);
                            t.socket_inode = u64::from(round) * 1000 + u64::from(i);
                            s.insert(t);
                        }
                    })
                    .unwrap();
            }
        }
        "hang" => {
            registry
                .transaction(|s| {
                    s.insert(tcp("0.0.0.0", 9000, "a", 31000, name));
                    println!("{IN_TRANSACTION}");
                    io::copy(&mut io::stdin(), &mut io::sink()).unwrap();
                })
                .unwrap();
        }
        other => panic!("unknown mode {other}"),
    }
}

fn writer_child(registry: &Registry, name: &str, mode: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "registry::tests::registry_writer_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(
            WRITER_ENV,
            format!("{}:{name}:{mode}", registry.dir().display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn integrity(registry: &Registry) -> String {
    let conn = rusqlite::Connection::open(registry.db_path()).unwrap();
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_writer_killed_inside_a_transaction_leaves_the_last_commit_and_never_blocks_readers() {
    let (_tmp, registry) = registry();
    // The instance whose rows the child changes stays alive in this
    // process, so that nothing is reclaimed.
    let _lock = InstanceLock::acquire(&registry, "web").unwrap();
    register(&registry, "web", "a", 9000);
    let before = registry.read().unwrap();
    let mut cache = CachedRegistry::new(registry.clone());
    cache.get().unwrap();

    let mut child = writer_child(&registry, "web", "hang");
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let inside = stdout
        .lines()
        .map(Result::unwrap)
        .any(|line| line.contains(IN_TRANSACTION));
    assert!(inside, "child never entered its transaction");

    // The child holds the writers' lock and SQLite's write lock: readers
    // go on.
    assert_eq!(registry.read().unwrap(), before);
    assert_eq!(cache.get().unwrap().translations, before.translations);
    let other = Registry::open(registry.dir()).unwrap();
    assert_eq!(other.read().unwrap(), before);

    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(integrity(&registry), "ok");
    assert_eq!(registry.read().unwrap(), before);
    let after = registry
        .transaction(|s| {
            s.insert(tcp("0.0.0.0", 9001, "a", 9001, "web"));
            s.clone()
        })
        .unwrap();
    assert_eq!(after.translations.len(), 2);
    assert_eq!(on_disk(&registry).translations, after.translations);
    assert_eq!(cache.get().unwrap().translations, after.translations);
}

#[test]
fn writers_killed_at_any_moment_leave_it_consistent() {
    let (_tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "busy").unwrap();
    for round in 0..12u64 {
        let mut child = writer_child(&registry, "busy", "loop");
        // Spread over the commit cycle (a commit of 200 rows takes a few
        // milliseconds).
        std::thread::sleep(std::time::Duration::from_millis(40 + round * 7));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(integrity(&registry), "ok", "after kill {round}");
        let state = registry.read().unwrap();
        let ours: Vec<&Translation> = state.translations_of("busy").collect();
        // All of one commit or none of it: 200 translations of one round,
        // and the record of that same round.
        if let Some(rec) = state.instances.get("busy") {
            assert_eq!(ours.len(), 200, "after kill {round}");
            let round_of = |t: &&Translation| t.socket_inode / 1000;
            assert!(ours.iter().all(|t| round_of(t) == rec.started_unix));
        } else {
            assert!(ours.is_empty(), "after kill {round}");
        }
        // And the registry takes commits again.
        registry.transaction(|s| s.generation).unwrap();
    }
}

type UdpSeen = (PathBuf, usize);
static UDP_CHANGES: std::sync::Mutex<Vec<UdpSeen>> = std::sync::Mutex::new(Vec::new());

fn record_udp_change(dir: &Path, after: &RegistryState) {
    let udp = after
        .translations
        .iter()
        .filter(|t| t.protocol == crate::Protocol::Udp)
        .count();
    UDP_CHANGES.lock().unwrap().push((dir.to_path_buf(), udp));
}

/// The number of UDP translations each call of the hook was given.
fn udp_changes_in(dir: &Path) -> Vec<usize> {
    UDP_CHANGES
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d == dir)
        .map(|(_, after)| *after)
        .collect()
}

#[test]
fn the_udp_hook_hears_of_udp_changes_only() {
    set_udp_change_hook(record_udp_change);
    let (_tmp, registry) = registry();
    let _lock = InstanceLock::acquire(&registry, "dns").unwrap();
    register(&registry, "dns", "a", 9000);
    assert_eq!(udp_changes_in(registry.dir()), [0usize; 0], "TCP only");

    let mut udp = tcp("0.0.0.0", 53, "a", 20053, "dns");
    udp.protocol = crate::Protocol::Udp;
    registry.transaction(|s| s.insert(udp.clone())).unwrap();
    assert_eq!(udp_changes_in(registry.dir()), [1]);

    // The same instance's record and TCP rows change, its UDP rows not.
    registry
        .transaction(|s| {
            s.instances.insert("dns".into(), record("dns", "b"));
            s.insert(tcp("0.0.0.0", 9001, "a", 9001, "dns"));
        })
        .unwrap();
    assert_eq!(udp_changes_in(registry.dir()), [1]);

    registry
        .transaction(|s| s.remove_socket("dns", udp.socket_inode))
        .unwrap();
    assert_eq!(udp_changes_in(registry.dir()), [1, 0]);
}

static TCP_CHANGES: std::sync::Mutex<Vec<UdpSeen>> = std::sync::Mutex::new(Vec::new());

fn record_tcp_change(dir: &Path, _before: &RegistryState, after: &RegistryState) {
    let tcp = after
        .translations
        .iter()
        .filter(|t| t.protocol == crate::Protocol::Tcp)
        .count();
    TCP_CHANGES.lock().unwrap().push((dir.to_path_buf(), tcp));
}

#[test]
fn the_tcp_hook_hears_of_tcp_changes_only() {
    set_tcp_change_hook(record_tcp_change);
    let (_tmp, registry) = registry();
    let seen = || {
        TCP_CHANGES
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| d == registry.dir())
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    let _lock = InstanceLock::acquire(&registry, "web").unwrap();
    register(&registry, "web", "a", 9000);
    assert_eq!(seen(), [1]);

    let mut udp = tcp("0.0.0.0", 53, "a", 20053, "web");
    udp.protocol = crate::Protocol::Udp;
    registry.transaction(|s| s.insert(udp.clone())).unwrap();
    registry
        .transaction(|s| {
            s.instances.insert("web".into(), record("web", "b"));
        })
        .unwrap();
    assert_eq!(seen(), [1], "UDP rows and records only");

    registry
        .transaction(|s| s.insert(tcp("0.0.0.0", 9001, "a", 9001, "web")))
        .unwrap();
    assert_eq!(seen(), [1, 2]);
}

#[test]
fn a_killed_supervisor_not_yet_reaped_is_dead_and_reclaimed_by_a_reclaiming_read() {
    let (_tmp, registry) = registry();
    let _other = InstanceLock::acquire(&registry, "other").unwrap();
    register(&registry, "other", "b", 9100);
    let mut child = lock_holding_child(&registry);
    register(&registry, "child", "a", 9000);
    assert_eq!(registry.read_reclaiming().unwrap().translations.len(), 2);

    // Killed, and left a zombie: its pid still exists.
    child.kill().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while registry.read().unwrap().instances.contains_key("child") {
        assert!(
            std::time::Instant::now() < deadline,
            "zombie taken for alive"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        on_disk(&registry).translations.len(),
        2,
        "reads never write"
    );
    let state = registry.read_reclaiming().unwrap();
    assert_eq!(state.translations.len(), 1);
    assert_eq!(on_disk(&registry).translations.len(), 1);
    assert!(!registry.dir().join("instances/child").exists());
    child.wait().unwrap();
}

#[test]
fn an_earlier_versions_registry_json_is_migrated_once() {
    let (_tmp, registry) = registry();
    let _web = InstanceLock::acquire(&registry, "web").unwrap();
    register(&registry, "web", "a", 9000);
    // As an earlier appshot left the run directory: registry.json, no
    // database; "gone" died long ago.
    let mut legacy = registry.read().unwrap();
    legacy.instances.insert("gone".into(), record("gone", "z"));
    legacy.insert(tcp("0.0.0.0", 9000, "z", 40000, "gone"));
    for file in [store::DB_FILE, store::WAL_FILE, store::SHM_FILE] {
        fs::remove_file(registry.dir().join(file)).unwrap();
    }
    let json = registry.dir().join(LEGACY_STATE_FILE);
    fs::write(&json, b"{ not json").unwrap();
    assert!(matches!(
        registry.transaction(|_| ()),
        Err(VpmError::Corrupt { path, .. }) if path == json
    ));
    assert!(json.exists(), "a registry that cannot be migrated stays");

    fs::write(&json, serde_json::to_vec(&legacy).unwrap()).unwrap();
    let state = registry.transaction(|s| s.clone()).unwrap();
    assert_eq!(state.instances.keys().collect::<Vec<_>>(), ["web"]);
    assert_eq!(state.translations, [tcp("0.0.0.0", 9000, "a", 9000, "web")]);
    assert_eq!(on_disk(&registry).translations, state.translations);
    assert!(!json.exists(), "migrated once");
}

/// Every connection commits without an fsync of the WAL (a process crash
/// loses nothing in WAL mode): SQLite keeps the setting per connection, so
/// an opener of the existing database sets it too.
#[test]
fn an_existing_database_is_opened_with_normal_synchronous() {
    let (_tmp, registry) = registry();
    register(&registry, "a", "x", 21000);
    let db = Db::open_existing(&registry.db_path())
        .unwrap()
        .expect("the database exists");
    let level: i64 = db
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(level, 1, "NORMAL");
}

/// A handle prepared ahead (an instance shell's) commits nothing and keeps
/// the write-ahead log while another handle comes and goes: without it,
/// that handle's close checkpoints and deletes the log, and the next
/// writer pays two fsyncs to create it again.
#[test]
fn a_prepared_handle_commits_nothing_and_keeps_the_log() {
    let (_tmp, registry) = registry();
    register(&registry, "web", "shop", 20001);
    drop(registry.clone());
    let dir = registry.dir().to_path_buf();
    drop(registry);
    let wal = dir.join(store::WAL_FILE);
    assert!(!wal.exists(), "the last connection's close deletes the log");

    let shell = Registry::open(&dir).unwrap();
    let before = on_disk(&shell);
    shell.prepare().unwrap();
    assert_eq!(on_disk(&shell), before);
    let cli = Registry::open(&dir).unwrap();
    cli.read().unwrap();
    drop(cli);
    assert!(wal.exists(), "a prepared handle keeps the log");
    shell.transaction(|s| s.remove_instance("web")).unwrap();
    assert!(on_disk(&shell).translations.is_empty());
}

/// The commits made to `registry`'s database so far.
fn commits(registry: &Registry) -> u64 {
    Db::open_existing(&registry.db_path())
        .unwrap()
        .unwrap()
        .changes()
        .unwrap()
}

/// The name taken first and its first record written later from another
/// thread (a claimed shell forks its clone meanwhile): the name is alive
/// from the first step, nothing is listed for it until the record, and the
/// record is still one commit made after the dead predecessor's entries
/// went.
#[test]
fn a_pending_record_is_written_from_another_thread_once_the_name_is_taken() {
    let (_tmp, registry) = registry();
    register(&registry, "web", "old", 20001);
    let before = commits(&registry);
    let (held, pending) = InstanceLock::acquire_pending(&registry, "web").unwrap();
    assert!(is_alive(registry.dir(), "web"), "the name is taken");
    assert_eq!(commits(&registry), before, "nothing committed yet");
    let recorder = std::thread::spawn(move || {
        pending
            .record(|s, dir| {
                assert!(dir.is_dir(), "its directory is there");
                let seen = s.translations_of("web").count();
                s.instances.insert("web".into(), record("web", "new"));
                seen
            })
            .unwrap()
    });
    assert_eq!(
        recorder.join().unwrap(),
        0,
        "the predecessor's translation went first"
    );
    assert_eq!(commits(&registry), before + 1, "one commit");
    let state = registry.read().unwrap();
    assert_eq!(state.instances["web"].aid, "new");
    assert!(state.translations.is_empty());
    assert_eq!(
        own::read(held.instance_dir()).unwrap(),
        OwnRecords::of(&state, "web")
    );
    // The registry lock went with the record: the lock's own drop takes it.
    drop(held);
    assert!(!is_alive(registry.dir(), "web"));
}

/// The name and the holder's first record in one commit: what a dead
/// predecessor of the name left is gone before the record is made, and the
/// holder's own copy already has the record.
#[test]
fn the_lock_and_the_first_record_are_one_commit() {
    let (_tmp, registry) = registry();
    register(&registry, "web", "old", 20001);
    let before = commits(&registry);
    let (held, seen) = InstanceLock::acquire_recording(&registry, "web", |s, dir| {
        assert!(dir.is_dir(), "its directory is there");
        let seen = s.translations_of("web").count();
        s.instances.insert("web".into(), record("web", "new"));
        s.insert(tcp("0.0.0.0", 9000, "new", 20002, "web"));
        seen
    })
    .unwrap();
    assert_eq!(seen, 0, "the dead predecessor's translation went first");
    assert_eq!(commits(&registry), before + 1, "one commit");
    let state = registry.read().unwrap();
    assert_eq!(state.instances["web"].aid, "new");
    assert_eq!(
        state
            .translations
            .iter()
            .map(|t| t.real_port)
            .collect::<Vec<_>>(),
        [20002]
    );
    let own = own::read(held.instance_dir()).unwrap();
    assert_eq!(own, OwnRecords::of(&state, "web"), "its own copy has it");
}
