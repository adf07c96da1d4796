//! A registry lost while instances run: every AID still reaches only its
//! own instance, and `ps` and `ports` show them all again.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use common::{poll, Harness};

const PORT: u16 = 19500;
const AIDS: [&str; 3] = ["a", "b", "c"];

fn start_three(h: &mut Harness) {
    let port = PORT.to_string();
    for aid in AIDS {
        let dir = h.dir(&format!("www-{aid}"));
        fs::write(dir.join(format!("only-in-{aid}.txt")), aid).unwrap();
        let command = ["python3", "-m", "http.server", &port, "--bind", "127.0.0.1"];
        h.start(&format!("web-{aid}"), aid, &dir, &[], &command);
    }
    for aid in AIDS {
        h.wait_log(&format!("web-{aid}"), &format!("port {PORT}"));
    }
}

/// Clients of a, b and c reach their own instance, and z none.
fn assert_isolated(h: &Harness, damage: &str) {
    let url = format!("http://127.0.0.1:{PORT}/");
    for aid in AIDS {
        let got = h.curl(aid, &url);
        assert!(got.success(), "after {damage}: curl under {aid}: {got}");
        for other in AIDS {
            assert_eq!(
                got.stdout.contains(&format!("only-in-{other}.txt")),
                other == aid,
                "after {damage}: AID {aid} must reach web-{aid} and no other:\n{}",
                got.stdout
            );
        }
    }
    let refused = h.curl("z", &url);
    assert_eq!(
        refused.code,
        Some(7),
        "after {damage}: AID z has no instance, curl must get ECONNREFUSED: {refused}"
    );
}

/// `ps` and `ports` list the three instances again, within a bound.
fn assert_listed_again(h: &Harness, damage: &str) {
    let want: BTreeSet<String> = AIDS.iter().map(|a| format!("web-{a}")).collect();
    let names = |rows: Vec<serde_json::Value>, key: &str| -> BTreeSet<String> {
        rows.iter()
            .filter_map(|r| r[key].as_str().map(str::to_owned))
            .collect()
    };
    let mut seen = (BTreeSet::new(), BTreeSet::new());
    let listed = poll(Duration::from_secs(10), || {
        seen = (names(h.ps(), "name"), names(h.ports(), "instance"));
        seen.0 == want && seen.1 == want
    });
    assert!(
        listed,
        "after {damage}: ps and ports show {seen:?}, not {want:?}"
    );
}

#[test]
fn a_lost_registry_fails_closed_and_is_rebuilt() {
    let Some(mut h) = Harness::new(
        "a_lost_registry_fails_closed_and_is_rebuilt",
        &["python3", "curl"],
    ) else {
        return;
    };
    start_three(&mut h);
    assert_isolated(&h, "start");
    let registry = h.run_dir().join("registry.db");

    // Its WAL and shared memory stay, as `rm registry.db` leaves them.
    fs::remove_file(&registry).unwrap();
    assert_isolated(&h, "deleting registry.db");
    assert_listed_again(&h, "deleting registry.db");

    for file in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        match fs::remove_file(h.run_dir().join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("removing {file}: {e}"),
            _ => {}
        }
    }
    fs::write(&registry, b"").unwrap();
    assert_isolated(&h, "replacing registry.db by an empty file");
    assert_listed_again(&h, "replacing registry.db by an empty file");
}
