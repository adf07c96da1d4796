//! `--routing kernel`: connect, getsockname and getpeername decided by the
//! cgroup programs from the registry, with only bind notified. A client
//! reaches its own AID's instance and no other AID's real port, by connect
//! and by a TCP Fast Open send (which the notified filter refuses
//! outright); renamed sockets show virtual ports, IPv4 and IPv6.

mod common;

use common::{script, Harness, Ran};

const PORT: &str = "9730";

/// A TCP Fast Open send of "x" to HOST:PORT, then the reply's first line;
/// or the errno.
const PY_FASTOPEN: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
try:
    s.sendto(b"x", socket.MSG_FASTOPEN, (host, port))
except OSError as e:
    print("errno", e.errno)
    sys.exit(0)
print("REPLY", s.makefile().readline().strip())
"#;

/// A client run under `aid` with the kernel routing its connects.
fn routed_client(h: &Harness, aid: &str, command: &[&str]) -> Ran {
    let mut cmd = h.appshot();
    cmd.args([
        "run",
        "--routing",
        "kernel",
        "--aid",
        aid,
        "--port",
        PORT,
        "--",
    ])
    .args(command);
    common::run(&mut cmd, std::time::Duration::from_secs(30))
}

/// Sets `net.ipv4.tcp_fastopen` for the test's length: the client bit on.
struct FastOpen(String);

const FASTOPEN_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_fastopen";

impl FastOpen {
    fn client_on() -> FastOpen {
        let old = std::fs::read_to_string(FASTOPEN_SYSCTL).expect("reading tcp_fastopen");
        let value: u32 = old.trim().parse().expect("tcp_fastopen is a number");
        std::fs::write(FASTOPEN_SYSCTL, (value | 1).to_string()).expect("setting tcp_fastopen");
        FastOpen(old)
    }
}

impl Drop for FastOpen {
    fn drop(&mut self) {
        let _ = std::fs::write(FASTOPEN_SYSCTL, self.0.trim());
    }
}

#[test]
fn kernel_routed_clients_reach_their_own_aid_and_no_other_real_port() {
    let test = "kernel_routed_clients_reach_their_own_aid_and_no_other_real_port";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let ipv6 = common::ipv6_or_skip(test);
    let _fastopen = FastOpen::client_on();
    let sockets = script("sockets.py");
    let dir = h.dir("cwd");
    let kernel = ["--routing", "kernel", "--port", PORT];
    let mut hosts = vec!["127.0.0.1"];
    if ipv6 {
        hosts.push("::");
    }
    for (name, aid) in [("kr-a", "a"), ("kr-b", "b")] {
        let mut server = vec!["python3", &sockets, "serve", name, PORT];
        server.extend(&hosts);
        h.start(name, aid, &dir, &kernel, &server);
        h.wait_log(name, &format!("LISTEN {} {PORT}", hosts[hosts.len() - 1]));
    }
    // b's sockets overlap a's, which hold the fixed port: b's real ports
    // differ, and its instance renames them.
    let b_pairs = common::port_pairs(&h.instance("kr-b").expect("kr-b listed"));
    assert_eq!(b_pairs.len(), hosts.len(), "{b_pairs:?}");
    assert!(
        b_pairs.iter().all(|p| p.real.to_string() != PORT),
        "{b_pairs:?}"
    );
    // The socket every client address reaches.
    let last = hosts[hosts.len() - 1];
    let b_real = b_pairs
        .iter()
        .find(|p| p.address == last)
        .expect("b's last socket listed")
        .real
        .to_string();

    let mut clients = vec!["127.0.0.1"];
    if ipv6 {
        clients.push("::1");
    }
    for (aid, name) in [("a", "kr-a"), ("b", "kr-b")] {
        let mut connect = vec!["python3", &sockets, "connect", PORT];
        connect.extend(&clients);
        let got = routed_client(&h, aid, &connect);
        assert!(got.success(), "{got}");
        let expected: Vec<String> = clients
            .iter()
            .flat_map(|c| {
                [
                    format!("PEER {c} {PORT}"),
                    format!("REPLY {name} ACCEPTED {c} {PORT}"),
                ]
            })
            .collect();
        assert_eq!(got.stdout.lines().collect::<Vec<_>>(), expected, "{got}");
    }

    // Fast Open: routed as connect, where the notified filter refuses it.
    for (aid, name) in [("a", "kr-a"), ("b", "kr-b")] {
        let got = routed_client(&h, aid, &["python3", "-c", PY_FASTOPEN, "127.0.0.1", PORT]);
        assert_eq!(
            got.stdout.trim(),
            format!("REPLY {name} ACCEPTED 127.0.0.1 {PORT}"),
            "{got}"
        );
    }
    let refused = format!("errno {}", libc::ECONNREFUSED);
    for client in &clients {
        // Another AID's real port, straight: by connect and by Fast Open.
        let got = routed_client(&h, "a", &["python3", &sockets, "connect", &b_real, client]);
        assert!(!got.success(), "{got}");
        assert!(got.stderr.contains("Connection refused"), "{got}");
        let got = routed_client(&h, "a", &["python3", "-c", PY_FASTOPEN, client, &b_real]);
        assert_eq!(got.stdout.trim(), refused, "{got}");
        // An AID with no instance on the port.
        let got = routed_client(&h, "z", &["python3", &sockets, "connect", PORT, client]);
        assert!(got.stderr.contains("Connection refused"), "{got}");
        let got = routed_client(&h, "z", &["python3", "-c", PY_FASTOPEN, client, PORT]);
        assert_eq!(got.stdout.trim(), refused, "{got}");
    }
    // b's own real port is b's to reach; its socket there is `::` when
    // there is IPv6, which names an IPv4 peer's connection mapped.
    let got = routed_client(
        &h,
        "b",
        &["python3", "-c", PY_FASTOPEN, "127.0.0.1", &b_real],
    );
    let local = if ipv6 {
        "::ffff:127.0.0.1"
    } else {
        "127.0.0.1"
    };
    assert_eq!(
        got.stdout.trim(),
        format!("REPLY kr-b ACCEPTED {local} {PORT}"),
        "{got}"
    );

    // Restored, b's server takes back its translations, and the kernel's
    // routes follow them.
    let image = h.dir("images").join("kr-b.img");
    let ran = h.snapshot("kr-b", &image, &[]);
    assert!(ran.success(), "{ran}");
    let got = routed_client(
        &h,
        "b",
        &["python3", &sockets, "connect", PORT, "127.0.0.1"],
    );
    assert!(
        got.stderr.contains("Connection refused"),
        "b's instance is gone: {got}"
    );
    h.restore("kr-b", &image, &["--routing", "kernel"]);
    let got = routed_client(
        &h,
        "b",
        &["python3", &sockets, "connect", PORT, "127.0.0.1"],
    );
    assert_eq!(
        got.stdout.lines().collect::<Vec<_>>(),
        [
            format!("PEER 127.0.0.1 {PORT}"),
            format!("REPLY kr-b ACCEPTED 127.0.0.1 {PORT}"),
        ],
        "{got}"
    );
    let restored = common::port_pairs(&h.instance("kr-b").expect("kr-b listed again"));
    assert_eq!(restored.len(), hosts.len(), "{restored:?}");
    for p in &restored {
        let real = p.real.to_string();
        let got = routed_client(&h, "a", &["python3", "-c", PY_FASTOPEN, "127.0.0.1", &real]);
        assert_eq!(got.stdout.trim(), refused, "b's real port {real}: {got}");
    }
}

/// The maps change port by port as instances come and go, from the state
/// they were last made to hold; a record of that state that no longer
/// matches (a process killed between its commit and its change) makes the
/// next change rebuild them whole.
#[test]
fn kernel_routes_follow_instances_coming_and_going() {
    let test = "kernel_routes_follow_instances_coming_and_going";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let sockets = script("sockets.py");
    let dir = h.dir("cwd");
    let kernel = ["--routing", "kernel", "--port", PORT];
    let start = |h: &mut Harness, name: &str, aid: &str| {
        h.start(
            name,
            aid,
            &dir,
            &kernel,
            &["python3", &sockets, "serve", name, PORT, "127.0.0.1"],
        );
        h.wait_log(name, &format!("LISTEN 127.0.0.1 {PORT}"));
    };
    let connect = ["python3", &sockets, "connect", PORT, "127.0.0.1"];
    let reaches = |h: &Harness, aid: &str, name: &str| {
        let got = routed_client(h, aid, &connect);
        assert_eq!(
            got.stdout.lines().last(),
            Some(format!("REPLY {name} ACCEPTED 127.0.0.1 {PORT}").as_str()),
            "AID {aid} should reach {name}: {got}"
        );
    };
    let refused = |h: &Harness, aid: &str| {
        let got = routed_client(h, aid, &connect);
        assert!(
            got.stderr.contains("Connection refused"),
            "AID {aid} has no instance: {got}"
        );
    };
    let marker = h.run_dir().join("kernel-routes.synced");

    for (name, aid) in [("kc-a", "a"), ("kc-b", "b"), ("kc-c", "c")] {
        start(&mut h, name, aid);
    }
    assert!(marker.exists(), "the maps' state is recorded");
    for (name, aid) in [("kc-a", "a"), ("kc-b", "b"), ("kc-c", "c")] {
        reaches(&h, aid, name);
    }
    h.stop("kc-b");
    refused(&h, "b");
    reaches(&h, "a", "kc-a");
    reaches(&h, "c", "kc-c");

    // A record that names no state: the next change makes the maps anew.
    std::fs::write(&marker, "0\n").unwrap();
    start(&mut h, "kc-b2", "b");
    reaches(&h, "b", "kc-b2");
    reaches(&h, "a", "kc-a");
    h.stop("kc-a");
    refused(&h, "a");
    reaches(&h, "b", "kc-b2");
    reaches(&h, "c", "kc-c");
}
