//! `python3 -m http.server` instances sharing one fixed port.

mod common;

use std::collections::BTreeSet;
use std::fs;

use common::{pid_of, port_pairs, Harness};

#[test]
fn three_http_servers_on_port_9000_each_serve_their_own_aid() {
    let test = "three_http_servers_on_port_9000_each_serve_their_own_aid";
    let Some(mut h) = Harness::new(test, &["python3", "curl"]) else {
        return;
    };
    let mut urls = vec!["http://127.0.0.1:9000/"];
    if common::ipv6_or_skip(test) {
        urls.push("http://[::1]:9000/");
    }
    let aids = ["a", "b", "c"];
    for aid in aids {
        let dir = h.dir(&format!("www-{aid}"));
        fs::write(dir.join(format!("only-in-{aid}.txt")), aid).unwrap();
        let name = format!("web-{aid}");
        // Which family http.server binds by default follows getaddrinfo's
        // ordering on the host; `--bind ::` asks for the dual-stack listener
        // that both the IPv4 and the IPv6 requests below need.
        let command = ["python3", "-m", "http.server", "9000", "--bind", "::"];
        if aid == "c" {
            // One instance through a config file, so its `cwd` is exercised.
            let config = h.dir("config").join("web-c.toml");
            fs::write(
                &config,
                format!(
                    "aid = \"c\"\nname = \"web-c\"\ncwd = {:?}\ncommand = {:?}\n",
                    dir.to_str().unwrap(),
                    command
                ),
            )
            .unwrap();
            h.start_config(&name, &config);
        } else {
            h.start(&name, aid, &dir, &[], &command);
        }
    }
    for aid in aids {
        // http.server prints the port it got from getsockname.
        h.wait_log(&format!("web-{aid}"), "port 9000");
    }

    for aid in aids {
        for url in &urls {
            let got = h.curl(aid, url);
            assert!(got.success(), "curl {url} under {aid}: {got}");
            for other in aids {
                let file = format!("only-in-{other}.txt");
                assert_eq!(
                    got.stdout.contains(&file),
                    other == aid,
                    "curl {url} under AID {aid}: listing should show {file} iff it is {aid}'s:\n{}",
                    got.stdout
                );
            }
        }
    }

    let refused = h.curl("z", "http://127.0.0.1:9000/");
    assert_eq!(
        refused.code,
        Some(7),
        "AID z has no instance on 9000, curl must get ECONNREFUSED: {refused}"
    );

    let ps = h.ps();
    assert_eq!(ps.len(), 3, "ps: {ps:#?}");
    let mut reals = BTreeSet::new();
    for row in &ps {
        let pairs = port_pairs(row);
        assert_eq!(pairs.len(), 1, "one listening socket each: {row}");
        assert_eq!(pairs[0].virtual_port, 9000, "{row}");
        reals.insert(pairs[0].real);
    }
    assert_eq!(reals.len(), 3, "real ports must differ: {ps:#?}");

    let ports = h.ports();
    assert_eq!(ports.len(), 3, "ports: {ports:#?}");
    let owners: BTreeSet<&str> = ports.iter().filter_map(|t| t["aid"].as_str()).collect();
    assert_eq!(owners, BTreeSet::from(aids), "{ports:#?}");
    assert!(
        ports.iter().all(|t| t["virtual_port"] == 9000),
        "{ports:#?}"
    );
}

#[test]
fn children_of_the_application_stay_supervised() {
    let Some(mut h) = Harness::new(
        "children_of_the_application_stay_supervised",
        &["python3", "curl", "sh"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    fs::write(dir.join("served-by-child.txt"), "m").unwrap();
    h.start(
        "shell-m",
        "m",
        &dir,
        &[],
        &["sh", "-c", "python3 -m http.server 9300 & wait"],
    );
    h.wait_log("shell-m", "port 9300");

    let row = h.instance("shell-m").expect("shell-m listed");
    assert!(
        common::cmdline(pid_of(&row)).starts_with("sh "),
        "the application is the shell, python its child: {row}"
    );
    // The bind came from the shell's child, yet it is translated.
    let pairs = port_pairs(&row);
    assert_eq!(pairs.len(), 1, "{row}");
    assert_eq!(pairs[0].virtual_port, 9300, "{row}");

    let own = h.curl("m", "http://127.0.0.1:9300/");
    assert!(own.success(), "{own}");
    assert!(own.stdout.contains("served-by-child.txt"), "{own}");

    // An unsupervised child would hold the port natively, and AID n would
    // reach it.
    let other = h.curl("n", "http://127.0.0.1:9300/");
    assert_eq!(other.code, Some(7), "AID n must be refused: {other}");
}
