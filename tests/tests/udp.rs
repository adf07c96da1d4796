//! UDP services on one fixed port, routed by AID in the kernel: dnsmasq and
//! memcached instances, echo servers on both families, clients by sendto
//! and on connected sockets.

mod common;

use common::{script, udp_answers as answers, Harness};

/// `py/udpecho.py` answering as `tag` on `bind`:`port` (a multiplexed
/// port), started as instance `name` of `aid`; returns once the server
/// printed the port getsockname gave it, which must be the virtual one.
fn start_echo(h: &mut Harness, name: &str, aid: &str, tag: &str, bind: &str, port: &str) {
    let cwd = h.dir(name);
    h.start(
        name,
        aid,
        &cwd,
        &["--port", port],
        &["python3", &script("udpecho.py"), tag, bind, port],
    );
    h.wait_log(name, &format!("bound {port}"));
}

/// The `ports --json` rows of `name` for `protocol`, as (virtual, real).
fn udp_ports(h: &Harness, name: &str) -> Vec<(u64, u64)> {
    h.translations(name)
        .iter()
        .filter(|r| r["protocol"] == "udp")
        .map(|r| {
            (
                r["virtual_port"].as_u64().unwrap(),
                r["real_port"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn three_dnsmasq_on_one_port_each_answer_their_own_aid() {
    let test = "three_dnsmasq_on_one_port_each_answer_their_own_aid";
    let Some(mut h) = Harness::new(test, &["dnsmasq", "python3"]) else {
        return;
    };
    let aids = ["a", "b", "c"];
    for (i, aid) in aids.iter().enumerate() {
        let cwd = h.dir(aid);
        let address = format!("--address=/svc.test/127.0.1.{}", i + 1);
        h.start(
            &format!("dns-{aid}"),
            aid,
            &cwd,
            &["--port", "5353"],
            &[
                "dnsmasq",
                "--no-daemon",
                "--port=5353",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--log-facility=-",
                &address,
            ],
        );
    }
    for aid in aids {
        h.wait_log(&format!("dns-{aid}"), "cleared cache");
        let ports = udp_ports(&h, &format!("dns-{aid}"));
        assert!(
            !ports.is_empty() && ports.iter().all(|&(v, _)| v == 5353),
            "{test}: dns-{aid} has no UDP translation of 5353: {ports:?}"
        );
    }
    let query = script("dnsquery.py");
    for (i, aid) in aids.iter().enumerate() {
        let ran = h.client(aid, &["python3", &query, "svc.test", "5353"]);
        assert!(ran.success(), "{test}: {ran}");
        assert_eq!(
            ran.stdout.trim(),
            format!("127.0.1.{} from 127.0.0.1:5353", i + 1),
            "{test}: AID {aid}"
        );
    }
    let ran = h.client("z", &["python3", &query, "svc.test", "5353"]);
    assert_eq!(ran.stdout.trim(), "no answer", "{test}: AID z: {ran}");
}

#[test]
fn two_memcached_over_udp_keep_each_aids_values() {
    let test = "two_memcached_over_udp_keep_each_aids_values";
    let Some(mut h) = Harness::new(test, &["memcached", "python3"]) else {
        return;
    };
    for aid in ["a", "b"] {
        let cwd = h.dir(aid);
        h.start(
            &format!("mc-{aid}"),
            aid,
            &cwd,
            &["--port", "11311"],
            &[
                "memcached",
                "-U",
                "11311",
                "-p",
                "11311",
                "-l",
                "127.0.0.1",
                "-u",
                "nobody",
            ],
        );
    }
    let mc = script("mcudp.py");
    for aid in ["a", "b"] {
        assert!(
            common::poll(common::READY, || udp_ports(&h, &format!("mc-{aid}")).len()
                == 1),
            "{test}: mc-{aid} never bound its UDP port"
        );
        let value = format!("value-of-{aid}");
        let ran = h.client(aid, &["python3", &mc, "set", "11311", "k", &value]);
        assert_eq!(ran.stdout.trim(), "STORED", "{test}: {ran}");
    }
    for aid in ["a", "b"] {
        let ran = h.client(aid, &["python3", &mc, "get", "11311", "k"]);
        assert_eq!(
            ran.stdout.trim(),
            format!("value-of-{aid}"),
            "{test}: {ran}"
        );
    }
    let ran = h.client("z", &["python3", &mc, "get", "11311", "k"]);
    assert_eq!(ran.stdout.trim(), "no answer", "{test}: {ran}");
}

#[test]
fn udp_clients_see_virtual_ports_and_other_aids_a_closed_port() {
    let test = "udp_clients_see_virtual_ports_and_other_aids_a_closed_port";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let echo = script("udpecho.py");
    let client = script("udpclient.py");
    let v6 = common::ipv6_or_skip(test);
    let bind = if v6 { "::" } else { "0.0.0.0" };
    for aid in ["a", "b"] {
        // getsockname in the server: the virtual port, whatever it holds.
        start_echo(&mut h, &format!("echo-{aid}"), aid, aid, bind, "9053");
    }
    let reals: Vec<u64> = ["a", "b"]
        .iter()
        .map(|aid| udp_ports(&h, &format!("echo-{aid}"))[0].1)
        .collect();
    assert_ne!(reals[0], reals[1], "{test}: one real port for two AIDs");
    let mut targets = vec!["127.0.0.1"];
    if v6 {
        targets.push("::1");
    }
    for target in targets {
        for aid in ["a", "b"] {
            let ran = h.client(aid, &["python3", &client, target, "9053"]);
            assert!(ran.success(), "{test}: {ran}");
            assert_eq!(
                answers(&ran.stdout),
                [
                    format!("unconnected {aid}:ping from port 9053"),
                    format!("connected {aid}:ping peer port 9053"),
                ],
                "{test}: AID {aid} to {target}"
            );
        }
        // As from a closed port: nothing for sendto, ECONNREFUSED on a
        // connected socket; never another AID's answer.
        let ran = h.client("z", &["python3", &client, target, "9053"]);
        assert_eq!(
            answers(&ran.stdout),
            ["unconnected no answer", "connected ECONNREFUSED"],
            "{test}: AID z to {target}: {ran}"
        );
        // Nor through the other AID's real port.
        let real_b = reals[1].to_string();
        let ran = h.client("a", &["python3", &client, target, &real_b]);
        assert_eq!(
            answers(&ran.stdout),
            ["unconnected no answer", "connected ECONNREFUSED"],
            "{test}: AID a to b's real port {real_b} on {target}: {ran}"
        );
    }
    // The ports are changed by the cgroup programs where the sockets name
    // them, not by rewriting packets: no NAT rule, and the programs'
    // links and maps pinned while instances serve UDP.
    let rules = nft_table();
    assert!(
        !rules
            .lines()
            .any(|r| r.contains("9053") && (r.contains("dnat") || r.contains("redirect"))),
        "{test}: packets rewritten:\n{rules}"
    );
    let pinned = pinned_route_sets();
    assert!(
        pinned
            .iter()
            .any(|d| d.join("sendmsg4").exists() && d.join("routes").exists()),
        "{test}: no programs pinned in {BPF_PINS}: {pinned:?}"
    );
    // A port no instance serves is the kernel's: a server outside appshot
    // answers every AID.
    let mut host = std::process::Command::new("python3")
        .args([&echo, "host", "127.0.0.1", "9054"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting a host UDP server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(host.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    let ran = h.client("z", &["python3", &client, "127.0.0.1", "9054"]);
    let _ = host.kill();
    let _ = host.wait();
    assert_eq!(
        answers(&ran.stdout),
        [
            "unconnected host:ping from port 9054",
            "connected host:ping peer port 9054"
        ],
        "{test}: a port no instance serves: {ran}"
    );
    for aid in ["a", "b"] {
        h.stop(&format!("echo-{aid}"));
    }
    let text = nft_table();
    assert!(
        !text.contains("udp dport 9053"),
        "{test}: UDP rules left after the instances stopped:\n{text}"
    );
    let left = pinned_route_sets();
    assert_eq!(
        left.len() + 1,
        pinned.len(),
        "{test}: the registry's programs stay attached after its last UDP socket: {left:?}"
    );
}

/// Where appshot pins each registry's programs.
const BPF_PINS: &str = "/sys/fs/bpf/appshot";

/// The pinned sets of programs and maps, one per registry.
fn pinned_route_sets() -> Vec<std::path::PathBuf> {
    std::fs::read_dir(BPF_PINS)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect()
}

fn nft_table() -> String {
    let table = std::process::Command::new("nft")
        .args(["list", "table", "inet", "appshot"])
        .output()
        .expect("running nft");
    String::from_utf8_lossy(&table.stdout).into_owned()
}

#[test]
fn a_restored_udp_server_and_its_clones_serve_their_own_aids() {
    let test = "a_restored_udp_server_and_its_clones_serve_their_own_aids";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let client = script("udpclient.py");
    for aid in ["a", "b"] {
        start_echo(&mut h, &format!("echo-{aid}"), aid, aid, "0.0.0.0", "9063");
    }
    let ask = |h: &Harness, aid: &str| {
        let ran = h.client(aid, &["python3", &client, "127.0.0.1", "9063"]);
        assert!(ran.success(), "{test}: {ran}");
        ran.stdout.lines().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(
        ask(&h, "b"),
        [
            "unconnected b#1:ping from port 9063",
            "connected b#2:ping peer port 9063"
        ]
    );
    let image = h.dir("images").join("echo-b.img");
    let ran = h.snapshot("echo-b", &image, &[]);
    assert!(ran.success(), "{test}: {ran}");
    assert!(
        udp_ports(&h, "echo-b").is_empty(),
        "{test}: translation kept"
    );
    h.restore("echo-b", &image, &[]);
    assert_eq!(
        udp_ports(&h, "echo-b").len(),
        1,
        "{test}: not re-registered"
    );
    // The restored process counts on: the same server, not a new one.
    assert_eq!(
        ask(&h, "b"),
        [
            "unconnected b#3:ping from port 9063",
            "connected b#4:ping peer port 9063"
        ]
    );
    assert_eq!(
        answers(&ask(&h, "a").join("\n")),
        [
            "unconnected a:ping from port 9063",
            "connected a:ping peer port 9063"
        ]
    );

    let template = h.dir("images").join("echo-b-template.img");
    let ran = h.snapshot("echo-b", &template, &["--template", "--leave-running"]);
    assert!(ran.success(), "{test}: {ran}");
    let clones: Vec<String> = ["c", "d", "e"]
        .iter()
        .map(|a| format!("clone-{a}"))
        .collect();
    for (name, aid) in clones.iter().zip(["c", "d", "e"]) {
        h.clone_template(
            std::slice::from_ref(name),
            &template,
            &["--aid", aid, "--name", name],
        );
        assert_eq!(
            udp_ports(&h, name).len(),
            1,
            "{test}: {name} has no translation"
        );
    }
    // Each clone starts from the template's count and counts its own
    // datagrams alone: each AID reached its own clone.
    for aid in ["c", "d", "e"] {
        assert_eq!(
            ask(&h, aid),
            [
                "unconnected b#5:ping from port 9063",
                "connected b#6:ping peer port 9063"
            ],
            "{test}: AID {aid}"
        );
    }
    assert_eq!(
        ask(&h, "b"),
        [
            "unconnected b#5:ping from port 9063",
            "connected b#6:ping peer port 9063"
        ]
    );
    assert_eq!(
        answers(&ask(&h, "z").join("\n")),
        ["unconnected no answer", "connected ECONNREFUSED"]
    );
}

#[test]
fn a_client_keeping_its_socket_follows_its_aids_instance_when_it_is_replaced() {
    let test = "a_client_keeping_its_socket_follows_its_aids_instance_when_it_is_replaced";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    // a holds the fixed port itself; b's instances get ports of the range.
    start_echo(&mut h, "echo-a", "a", "a", "0.0.0.0", "9083");
    start_echo(&mut h, "echo-b1", "b", "b1", "0.0.0.0", "9083");
    let mut client = h
        .appshot()
        .args(["run", "--aid", "b", "--port", "9083", "--"])
        .args(["python3", &script("udpkeep.py"), "127.0.0.1", "9083"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting the client");
    let mut input = client.stdin.take().unwrap();
    let mut output = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut ask = || {
        use std::io::{BufRead, Write};
        writeln!(input, "go").unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    assert_eq!(ask(), "b1#1:ping 9083", "{test}");
    h.stop("echo-b1");
    // Its AID has no instance: as from a closed port, not a's answer.
    assert_eq!(ask(), "no answer", "{test}: b without an instance");
    start_echo(&mut h, "echo-b2", "b", "b2", "0.0.0.0", "9083");
    // The same socket reaches the new instance at once: no verdict of the
    // kernel outlives the change (no conntrack flow keeps the old real
    // port or the refusal).
    assert_eq!(ask(), "b2#1:ping 9083", "{test}: after the replacement");
    let _ = client.kill();
    let _ = client.wait();
}
