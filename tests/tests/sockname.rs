//! getsockname and getpeername report virtual ports, IPv4 and IPv6.

mod common;

use common::{port_pairs, script, Harness};

#[test]
fn socket_names_show_the_virtual_port() {
    let test = "socket_names_show_the_virtual_port";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let ipv6 = common::ipv6_or_skip(test);
    let sockets = script("sockets.py");
    let dir = h.dir("cwd");
    // AID o claims 9100 on 127.0.0.1 first, so s's sockets, which overlap
    // it (`::` is dual-stack), must be moved to other real ports.
    h.start(
        "names-o",
        "o",
        &dir,
        &[],
        &["python3", &sockets, "serve", "names-o", "9100", "127.0.0.1"],
    );
    h.wait_log("names-o", "LISTEN 127.0.0.1 9100");
    let mut server = vec!["python3", &sockets, "serve", "names-s", "9100", "127.0.0.1"];
    let mut client = vec!["python3", &sockets, "connect", "9100", "127.0.0.1"];
    let mut expected = vec![
        "PEER 127.0.0.1 9100",
        "REPLY names-s ACCEPTED 127.0.0.1 9100",
    ];
    if ipv6 {
        server.push("::");
        client.push("::1");
        expected.extend(["PEER ::1 9100", "REPLY names-s ACCEPTED ::1 9100"]);
    }
    h.start("names-s", "s", &dir, &[], &server);
    let last = if ipv6 {
        "LISTEN :: 9100"
    } else {
        "LISTEN 127.0.0.1 9100"
    };
    let log = h.wait_log("names-s", last);
    assert!(log.contains("LISTEN 127.0.0.1 9100"), "{log}");

    let row = h.instance("names-s").expect("names-s listed");
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), server.len() - 5, "{row}");
    for p in &pairs {
        assert_eq!(p.virtual_port, 9100, "{row}");
        assert_ne!(
            p.real, 9100,
            "9100 belongs to AID o, so s's {} socket must have another real port: {row}",
            p.address
        );
    }

    let got = h.client("s", &client);
    assert!(got.success(), "{got}");
    assert_eq!(got.stdout.lines().collect::<Vec<_>>(), expected, "{got}");

    let other = h.client("o", &["python3", &sockets, "connect", "9100", "127.0.0.1"]);
    assert!(other.success(), "{other}");
    assert!(
        other
            .stdout
            .contains("REPLY names-o ACCEPTED 127.0.0.1 9100"),
        "{other}"
    );
}
