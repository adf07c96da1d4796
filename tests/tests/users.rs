//! Applications that do not run as root: `appshot run --user`, and
//! snapshot and restore keeping every thread's credentials (uids, gids,
//! groups, capability sets, securebits, no_new_privs) exactly.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use common::{pid_of, poll, redis_cli, Harness, READY};

/// The credential lines of every thread of `pid`, by thread position.
fn credentials(pid: u32) -> Vec<String> {
    let mut tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort();
    tids.iter()
        .map(|tid| {
            let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            status
                .lines()
                .filter(|l| {
                    ["Uid:", "Gid:", "Groups:", "Cap", "NoNewPrivs:"]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}

fn app_pid(h: &Harness, name: &str) -> u32 {
    pid_of(
        &h.instance(name)
            .unwrap_or_else(|| panic!("no instance {name}")),
    )
}

fn uid_of(user: &str) -> u32 {
    let passwd = fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == user).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no user {user}"))
}

#[test]
fn redis_run_as_redis_is_restored_with_its_keys_still_as_redis() {
    let test = "redis_run_as_redis_is_restored_with_its_keys_still_as_redis";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli"]) else {
        return;
    };
    let redis = uid_of("redis");
    let dir = h.dir("r");
    std::os::unix::fs::chown(&dir, Some(redis), None).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    // The harness's work dir is root's alone: let redis reach its own.
    fs::set_permissions(dir.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    h.start(
        "r",
        "r",
        &dir,
        &["--user", "redis"],
        &[
            "redis-server",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    );
    h.wait_log("r", "Ready to accept connections");
    assert_eq!(redis_cli(&h, "r", &["SET", "who", "redis"]), "OK");
    let pid = app_pid(&h, "r");
    let before = credentials(pid);
    assert!(
        before[0].starts_with(&format!("Uid:\t{redis}\t{redis}\t{redis}\t{redis}")),
        "redis-server does not run as redis: {before:?}"
    );

    let image = h.dir("img").join("r.img");
    let ran = h.snapshot("r", &image, &[]);
    assert!(ran.success(), "{ran}");
    h.restore("r", &image, &[]);
    assert_eq!(redis_cli(&h, "r", &["GET", "who"]), "redis");
    let after = credentials(app_pid(&h, "r"));
    assert_eq!(after, before, "credentials changed across the restore");
}

#[test]
fn every_credential_of_a_process_survives_a_restore() {
    let test = "every_credential_of_a_process_survives_a_restore";
    let Some(mut h) = Harness::new(test, &["setpriv", "python3", "curl"]) else {
        return;
    };
    let dir = h.dir("w");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(dir.parent().unwrap(), fs::Permissions::from_mode(0o755)).unwrap();
    // nobody with extra groups, inheritable and ambient capabilities, a
    // smaller bounding set, locked securebits and no_new_privs.
    let command = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--groups=4,24",
        "--inh-caps=+net_bind_service,+net_raw",
        "--ambient-caps=+net_bind_service",
        "--bounding-set=-sys_admin,-sys_ptrace",
        "--securebits=+noroot,+noroot_locked",
        "--no-new-privs",
        "/usr/bin/python3",
        "-m",
        "http.server",
        "19601",
    ];
    h.start("c", "c", &dir, &[], &command);
    let url = "http://127.0.0.1:19601/";
    assert!(poll(READY, || h.curl("c", url).success()), "{}", h.log("c"));
    let before = credentials(app_pid(&h, "c"));
    assert!(
        before[0].contains("CapAmb:\t0000000000000400"),
        "{before:?}"
    );
    assert!(before[0].contains("NoNewPrivs:\t1"), "{before:?}");

    let image = h.dir("img").join("c.img");
    let ran = h.snapshot("c", &image, &[]);
    assert!(ran.success(), "{ran}");
    h.restore("c", &image, &[]);
    let after = credentials(app_pid(&h, "c"));
    assert_eq!(after, before, "credentials changed across the restore");
    let served = h.curl("c", url);
    assert!(served.success(), "{served}");
}
