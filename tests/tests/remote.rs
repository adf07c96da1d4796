//! VPM across hosts and for outside clients. Each "host" is a network
//! namespace made here (`ip netns add` + veth pairs, addresses 10.200.x.y
//! only inside them) running the appshot CLI under `ip netns exec` with
//! its own run dir:
//!
//! ```text
//!   B 10.200.1.2 ──── 10.200.1.1 A 10.200.2.1 ──── C 10.200.2.2, .3
//! ```
//!
//! A serves (instances + agent); B is a cooperative client host (appshot
//! there too); C runs no appshot at all (outside clients).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{poll, run, which, Ran};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(60);
const READY: Duration = Duration::from_secs(15);
const A_B: &str = "10.200.1.1";
const B: &str = "10.200.1.2";
const A_C: &str = "10.200.2.1";
const C1: &str = "10.200.2.2";
const C2: &str = "10.200.2.3";

fn skip(test: &str, reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: {reason} (CI=true: a missing capability is a failure)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {reason}");
}

fn appshot_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("APPSHOT_BIN") {
        return PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug").join("appshot");
    assert!(
        bin.is_file(),
        "appshot binary not found at {}: run `cargo build -p appshot` first",
        bin.display()
    );
    bin
}

/// Runs `ip ARGS`, panicking with its output if it fails.
fn ip(args: &[&str]) {
    let ran = run(Command::new(which("ip").expect("ip")).args(args), TIMEOUT);
    assert!(ran.success(), "ip {}: {ran}", args.join(" "));
}

struct Host {
    ns: String,
    run_dir: TempDir,
}

/// Three namespaces, their processes and files; all gone on drop, also
/// when the test fails: every process in a namespace is killed, then the
/// namespace (with its nftables ruleset and addresses) is deleted.
struct Lab {
    test: String,
    bin: PathBuf,
    hosts: Vec<Host>,
    work: TempDir,
    agents: Vec<Child>,
    key: PathBuf,
    wrong_key: PathBuf,
}

impl Lab {
    fn new(test: &str, tag: &str) -> Option<Lab> {
        if !nix::unistd::geteuid().is_root() {
            skip(test, "needs root (network namespaces, nftables, seccomp)");
            return None;
        }
        for p in ["ip", "nft", "python3", "curl"] {
            if which(p).is_none() {
                skip(test, &format!("`{p}` is not installed"));
                return None;
            }
        }
        let work = tempfile::Builder::new()
            .prefix("appshot-remote-")
            .tempdir()
            .expect("work dir");
        let key = work.path().join("cluster.key");
        let wrong_key = work.path().join("wrong.key");
        for (path, byte) in [(&key, 0x5a_u8), (&wrong_key, 0xa5)] {
            // Random enough for a test; what matters is that they differ.
            let bytes: Vec<u8> = (0..32u8)
                .map(|i| i.wrapping_mul(37) ^ byte ^ (std::process::id() as u8))
                .collect();
            fs::write(path, bytes).unwrap();
        }
        let mut lab = Lab {
            test: test.into(),
            bin: appshot_bin(),
            hosts: Vec::new(),
            work,
            agents: Vec::new(),
            key,
            wrong_key,
        };
        let id = std::process::id() % 100_000;
        for h in ["a", "b", "c"] {
            let ns = format!("as{id}{tag}{h}");
            // A leftover of a crashed earlier run with the same pid.
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", &ns]);
            lab.hosts.push(Host {
                ns,
                run_dir: tempfile::Builder::new()
                    .prefix("appshot-run-")
                    .tempdir()
                    .expect("run dir"),
            });
        }
        let (a, b, c) = (lab.ns(0), lab.ns(1), lab.ns(2));
        ip(&[
            "link", "add", "vb", "netns", &a, "type", "veth", "peer", "name", "va", "netns", &b,
        ]);
        ip(&[
            "link", "add", "vc", "netns", &a, "type", "veth", "peer", "name", "va", "netns", &c,
        ]);
        for (ns, dev, addrs) in [
            (&a, "vb", vec![A_B]),
            (&a, "vc", vec![A_C]),
            (&b, "va", vec![B]),
            (&c, "va", vec![C1, C2]),
        ] {
            for addr in addrs {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        // B and C reach both of A's addresses.
        ip(&["-n", &b, "route", "add", "default", "via", A_B]);
        ip(&["-n", &c, "route", "add", "default", "via", A_C]);
        Some(lab)
    }

    fn ns(&self, host: usize) -> String {
        self.hosts[host].ns.clone()
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.work.path().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// A command run inside `host`'s namespace. `ip netns exec` gives it a
    /// mount namespace of its own with a fresh sysfs, where nothing is
    /// mounted on /sys/fs/cgroup: cgroup2 is mounted there first, as an
    /// operator running appshot that way must, so that instances get the
    /// cgroups their datagrams are routed by.
    fn in_ns(&self, host: usize, program: &Path) -> Command {
        let mut cmd = Command::new(which("ip").expect("ip"));
        cmd.args(["netns", "exec", &self.hosts[host].ns])
            .args([
                "sh",
                "-c",
                "mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$@\"",
                "sh",
            ])
            .arg(program);
        cmd.current_dir(self.work.path());
        cmd
    }

    /// `appshot` on `host`, with that host's run dir and the cluster key.
    fn appshot(&self, host: usize) -> Command {
        self.appshot_keyed(host, &self.key)
    }

    fn appshot_keyed(&self, host: usize, key: &Path) -> Command {
        let mut cmd = self.in_ns(host, &self.bin);
        cmd.env("APPSHOT_RUN_DIR", self.hosts[host].run_dir.path())
            .env("APPSHOT_CLUSTER_KEY_FILE", key)
            .env_remove("RUST_LOG")
            .env("PYTHONUNBUFFERED", "1");
        cmd
    }

    /// A detached `python3 -m http.server 9000` serving a directory that
    /// holds `only-in-NAME.txt`.
    fn web(&self, host: usize, name: &str, aid: &str, config: Option<&Path>) {
        let www = self.dir(&format!("www-{name}"));
        fs::write(www.join(format!("only-in-{name}.txt")), name).unwrap();
        let mut cmd = self.appshot(host);
        cmd.args(["run", "--aid", aid, "--name", name, "--detach"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["--", "python3", "-m", "http.server", "9000"])
            .current_dir(&www);
        let ran = run(&mut cmd, TIMEOUT);
        assert!(ran.success(), "{}: starting {name}: {ran}", self.test);
        self.wait_log(host, name, "port 9000");
    }

    fn log(&self, host: usize, name: &str) -> String {
        common::logs_in(&self.hosts[host].run_dir.path().join("logs").join(name))
    }

    fn wait_log(&self, host: usize, name: &str, needle: &str) -> String {
        let mut log = String::new();
        let found = poll(READY, || {
            log = self.log(host, name);
            log.contains(needle)
        });
        assert!(
            found,
            "{}: log of {name} lacks {needle:?}:\n{log}",
            self.test
        );
        log
    }

    fn agent_log_path(&self, host: usize) -> PathBuf {
        self.work.path().join(format!("agent-{host}.log"))
    }

    fn agent_log(&self, host: usize) -> String {
        fs::read_to_string(self.agent_log_path(host)).unwrap_or_default()
    }

    /// `appshot vpm agent` in the foreground of `host`, as a service would
    /// run it.
    fn agent(&mut self, host: usize, listen: &str) {
        let log = fs::File::create(self.agent_log_path(host)).unwrap();
        let child = self
            .appshot(host)
            .args(["vpm", "agent", "--listen", listen])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting the agent");
        self.agents.push(child);
        let ok = poll(READY, || self.agent_log(host).contains("agent listening"));
        assert!(
            ok,
            "{}: agent did not start:\n{}",
            self.test,
            self.agent_log(host)
        );
    }

    /// curl under appshot with `aid` on `host`.
    fn curl_as(&self, host: usize, aid: &str, url: &str, key: &Path) -> Ran {
        let mut cmd = self.appshot_keyed(host, key);
        cmd.args([
            "run",
            "--aid",
            aid,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "10",
            url,
        ]);
        run(&mut cmd, TIMEOUT)
    }

    /// Plain curl from `host` (no appshot), from source address `from`.
    fn curl_from(&self, host: usize, from: &str, url: &str) -> Ran {
        let mut cmd = self.in_ns(host, &which("curl").unwrap());
        cmd.args(["-sS", "--max-time", "10", "--interface", from, url]);
        run(&mut cmd, TIMEOUT)
    }

    fn json(&self, host: usize, args: &[&str]) -> Value {
        let ran = run(self.appshot(host).args(args), TIMEOUT);
        assert!(ran.success(), "{}: appshot {args:?}: {ran}", self.test);
        serde_json::from_str(&ran.stdout)
            .unwrap_or_else(|e| panic!("{}: appshot {args:?}: {e}: {ran}", self.test))
    }

    fn python(&self, host: usize, under_aid: Option<&str>, script: &str, args: &[&str]) -> Ran {
        let path = self.work.path().join(format!("script-{}.py", script.len()));
        fs::write(&path, script).unwrap();
        let mut cmd = match under_aid {
            Some(aid) => {
                let mut c = self.appshot(host);
                c.args(["run", "--aid", aid, "--", "python3"]);
                c
            }
            None => self.in_ns(host, &which("python3").unwrap()),
        };
        cmd.arg(&path).args(args);
        run(&mut cmd, TIMEOUT)
    }

    fn nft_ruleset(&self, host: usize) -> String {
        run(
            self.in_ns(host, &which("nft").unwrap())
                .args(["list", "ruleset"]),
            TIMEOUT,
        )
        .stdout
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, h) in self.hosts.iter().enumerate() {
                if let Ok(entries) = fs::read_dir(h.run_dir.path().join("logs")) {
                    for e in entries.flatten() {
                        let text = common::logs_in(&e.path());
                        eprintln!(
                            "--- {} host {i}: {} ---\n{text}",
                            self.test,
                            e.path().display()
                        );
                    }
                }
                eprintln!("--- agent {i} ---\n{}", self.agent_log(i));
            }
        }
        for a in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        for h in &self.hosts {
            // Supervisors, namespace inits, applications: all in here.
            for _ in 0..3 {
                let pids = Command::new("ip")
                    .args(["netns", "pids", &h.ns])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let pids: Vec<i32> = pids
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &h.ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn serves(ran: &Ran, name: &str) -> bool {
    ran.success() && ran.stdout.contains(&format!("only-in-{name}.txt"))
}

const PEERNAME: &str = r#"
import socket, sys, json, time
out = []
for i in range(int(sys.argv[2])):
    t = time.monotonic()
    s = socket.create_connection((sys.argv[1], 9000), timeout=5)
    out.append({"secs": time.monotonic() - t, "peer": s.getpeername()[1]})
    s.close()
print(json.dumps(out))
"#;

#[test]
fn cooperative_hosts_negotiate_by_aid_and_authenticate() {
    let test = "cooperative_hosts_negotiate_by_aid_and_authenticate";
    let Some(mut lab) = Lab::new(test, "co") else {
        return;
    };
    lab.web(0, "web-a", "a", None);
    lab.web(0, "web-b", "b", None);
    lab.agent(0, &format!("{A_B}:7946"));
    lab.agent(1, &format!("{B}:7946"));
    let url = format!("http://{A_B}:9000/");

    let started = Instant::now();
    let a = lab.curl_as(1, "a", &url, &lab.key);
    let b = lab.curl_as(1, "b", &url, &lab.key);
    assert!(
        serves(&a, "web-a") && !serves(&a, "web-b"),
        "AID a from B: {a}"
    );
    assert!(
        serves(&b, "web-b") && !serves(&b, "web-a"),
        "AID b from B: {b}"
    );
    let z = lab.curl_as(1, "z", &url, &lab.key);
    assert_eq!(
        z.code,
        Some(7),
        "AID z has no instance on A: ECONNREFUSED: {z}"
    );
    eprintln!("{test}: three cross-host curls in {:?}", started.elapsed());

    // The server sees B's real address.
    lab.wait_log(0, "web-b", &format!("{B} - - "));

    // getpeername shows the virtual port, not the negotiated real one.
    let peer = lab.python(1, Some("b"), PEERNAME, &[A_B, "1"]);
    assert!(peer.success(), "{peer}");
    let rows: Value = serde_json::from_str(peer.stdout.trim()).expect("client output");
    assert_eq!(
        rows[0]["peer"], 9000,
        "getpeername after negotiation: {peer}"
    );

    // Both sides show what was negotiated.
    let real_b = lab
        .json(0, &["ports", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["aid"] == "b")
        .expect("b's translation")["real_port"]
        .clone();
    assert_ne!(real_b, 9000);
    let mut agent_side = Value::Null;
    let shown = poll(READY, || {
        agent_side = lab.json(0, &["ports", "--remote", "--json"]);
        agent_side["negotiations"].as_array().is_some_and(|n| {
            n.iter()
                .any(|r| r["aid"] == "b" && r["answer"] == "ack" && r["real_port"] == real_b)
                && n.iter()
                    .any(|r| r["aid"] == "z" && r["answer"] == "refused")
        })
    });
    assert!(shown, "A's ports --remote: {agent_side:#}");
    let client_side = lab.json(1, &["ports", "--remote", "--json"]);
    assert!(
        client_side["negotiations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["side"] == "client" && r["aid"] == "a" && r["answer"] == "ack"),
        "B's ports --remote: {client_side:#}"
    );
    let text = run(lab.appshot(1).args(["ports"]), TIMEOUT);
    assert!(
        text.stdout.contains("recent cross-host negotiations"),
        "{text}"
    );

    // A wrong cluster key: refused whatever it asks, and A's agent says why.
    for aid in ["a", "z"] {
        let bad = lab.curl_as(1, aid, &url, &lab.wrong_key);
        assert_eq!(bad.code, Some(7), "wrong key, AID {aid}: {bad}");
    }
    let log = lab.agent_log(0);
    assert!(log.contains("bad MAC"), "A's agent log: {log}");

    // No agent on an address (10.200.2.1:7946 is dropped): after the
    // short timeout the connect goes through plainly, and the negative
    // answer is cached so the next connects are not slowed.
    let drop_rule = "add table inet droptest\n\
        add chain inet droptest in { type filter hook input priority -10 ; }\n\
        add rule inet droptest in ip daddr 10.200.2.1 tcp dport 7946 drop\n";
    let mut nft = lab.in_ns(0, &which("nft").unwrap());
    nft.args(["-f", "-"]).stdin(Stdio::piped());
    let mut child = nft.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), drop_rule.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let timed = lab.python(1, Some("b"), PEERNAME, &[A_C, "3"]);
    assert!(timed.success(), "plain connect without an agent: {timed}");
    let rows: Value = serde_json::from_str(timed.stdout.trim()).expect("client output");
    let secs: Vec<f64> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["secs"].as_f64().unwrap())
        .collect();
    assert!(
        secs[0] >= 0.25 && secs[0] < 2.0,
        "first connect waits for the agent timeout: {secs:?}"
    );
    assert!(
        secs[1] < 0.2 && secs[2] < 0.2,
        "later connects use the cached answer: {secs:?}"
    );
}

#[test]
fn outside_clients_follow_source_rules_and_stale_rules_are_reclaimed() {
    let test = "outside_clients_follow_source_rules_and_stale_rules_are_reclaimed";
    let Some(mut lab) = Lab::new(test, "sr") else {
        return;
    };
    let config = lab.dir("config").join("web.toml");
    fs::write(
        &config,
        format!("default_aid = \"a\"\n\n[[source_rules]]\nsource = \"{C1}\"\naid = \"b\"\n"),
    )
    .unwrap();
    lab.web(0, "web-a", "a", Some(&config));
    lab.web(0, "web-b", "b", Some(&config));
    let url = format!("http://{A_C}:9000/");

    let from_c1 = lab.curl_from(2, C1, &url);
    assert!(
        serves(&from_c1, "web-b"),
        "C1 has a rule naming b: {from_c1}"
    );
    lab.wait_log(0, "web-b", &format!("{C1} - - "));
    let from_c2 = lab.curl_from(2, C2, &url);
    assert!(
        serves(&from_c2, "web-a"),
        "C2 has no rule: the default a: {from_c2}"
    );
    lab.wait_log(0, "web-a", &format!("{C2} - - "));
    assert!(!lab.log(0, "web-a").contains(&format!("{C1} - - ")));

    // The fixed port is no instance's real port under source rules, and
    // cooperative clients still reach their own AID past the rules.
    let ports = lab.json(0, &["ports", "--json"]);
    assert!(
        ports
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["real_port"] != 9000),
        "{ports:#}"
    );
    lab.agent(0, &format!("{A_B}:7946"));
    let coop = lab.curl_as(1, "b", &format!("http://{A_B}:9000/"), &lab.key);
    assert!(
        serves(&coop, "web-b"),
        "negotiated b from B (whose source defaults to a): {coop}"
    );

    let remote = lab.json(0, &["ports", "--remote", "--json"]);
    let rules = remote["source_rules"].as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["source"] == format!("{C1}/32") && r["aid"] == "b" && r["owner"] == "web-b"),
        "{remote:#}"
    );
    assert!(rules
        .iter()
        .any(|r| r["aid"] == "a" && r["source"].as_str().unwrap().contains("default")));

    // SIGKILL web-b's supervisor: its chains outlive it until the next
    // registry transaction reclaims them; then C1 is reset (its rule names
    // an AID without an instance), not handed to the default.
    let ps = lab.json(0, &["ps", "--json"]);
    let sup = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "web-b")
        .unwrap()["supervisor_pid"]
        .as_u64()
        .unwrap();
    kill(Pid::from_raw(sup as i32), Signal::SIGKILL).unwrap();
    assert!(
        poll(READY, || !Path::new(&format!("/proc/{sup}")).exists()
            || fs::read_to_string(format!("/proc/{sup}/stat"))
                .is_ok_and(|s| s.contains(") Z"))),
        "supervisor {sup} did not die"
    );
    assert!(lab.nft_ruleset(0).contains("/web-b/src"));
    let ps = lab.json(0, &["ps", "--json"]);
    assert!(
        ps.as_array().unwrap().iter().all(|r| r["name"] != "web-b"),
        "{ps:#}"
    );
    let ruleset = lab.nft_ruleset(0);
    assert!(
        !ruleset.contains("/web-b/"),
        "web-b's chains were not reclaimed:\n{ruleset}"
    );
    assert!(ruleset.contains("/web-a/dflt"), "{ruleset}");
    let reset = lab.curl_from(2, C1, &url);
    assert_eq!(
        reset.code,
        Some(7),
        "C1's AID is gone: reset, not the default: {reset}"
    );
    let still = lab.curl_from(2, C2, &url);
    assert!(serves(&still, "web-a"), "{still}");

    // Without a default AID, unmatched sources are reset.
    lab.json(0, &["ps", "--json"]);
    let strict = lab.dir("config").join("strict.toml");
    fs::write(
        &strict,
        format!("[[source_rules]]\nsource = \"{C1}\"\naid = \"b\"\n"),
    )
    .unwrap();
    let ran = run(lab.appshot(0).args(["stop", "-t", "2", "web-a"]), TIMEOUT);
    assert!(ran.success(), "{ran}");
    assert!(
        !lab.nft_ruleset(0).contains("/web-a/"),
        "stop removes the chains"
    );
    lab.web(0, "web-b2", "b", Some(&strict));
    let ok = lab.curl_from(2, C1, &url);
    assert!(serves(&ok, "web-b2"), "{ok}");
    let unmatched = lab.curl_from(2, C2, &url);
    assert_eq!(
        unmatched.code,
        Some(7),
        "no rule, no default: reset: {unmatched}"
    );
}

#[test]
fn outside_udp_clients_follow_source_rules() {
    let test = "outside_udp_clients_follow_source_rules";
    let Some(lab) = Lab::new(test, "su") else {
        return;
    };
    let config = lab.dir("config").join("echo.toml");
    fs::write(
        &config,
        format!("default_aid = \"a\"\n\n[[source_rules]]\nsource = \"{C1}\"\naid = \"b\"\n"),
    )
    .unwrap();
    let echo = common::script("udpecho.py");
    for aid in ["a", "b"] {
        let name = format!("echo-{aid}");
        let mut cmd = lab.appshot(0);
        cmd.args(["run", "--aid", aid, "--name", &name, "--detach", "--config"])
            .arg(&config)
            .args([
                "--port", "9053", "--", "python3", &echo, aid, "0.0.0.0", "9053",
            ]);
        let ran = run(&mut cmd, TIMEOUT);
        assert!(ran.success(), "{test}: starting {name}: {ran}");
        lab.wait_log(0, &name, "bound 9053");
    }
    // Host C runs no appshot: the rules alone route its datagrams, and the
    // answers come back from the virtual port.
    let client = common::script("udpclient.py");
    let ask_from = |source: &str| {
        let mut cmd = lab.in_ns(2, &which("python3").unwrap());
        cmd.args([client.as_str(), A_C, "9053", source]);
        let ran = run(&mut cmd, TIMEOUT);
        assert!(ran.success(), "{test}: {ran}");
        common::udp_answers(&ran.stdout)
    };
    assert_eq!(
        ask_from(C1),
        [
            "unconnected b:ping from port 9053",
            "connected b:ping peer port 9053"
        ],
        "{test}: C1's rule names b"
    );
    assert_eq!(
        ask_from(C2),
        [
            "unconnected a:ping from port 9053",
            "connected a:ping peer port 9053"
        ],
        "{test}: C2 has no rule: the default a"
    );
    let remote = lab.json(0, &["ports", "--remote", "--json"]);
    assert!(
        remote["source_rules"].as_array().unwrap().iter().any(|r| {
            r["protocol"] == "udp" && r["source"] == format!("{C1}/32") && r["aid"] == "b"
        }),
        "{remote:#}"
    );
    // Without b's instance, C1 meets a closed port, not the default.
    let ran = run(lab.appshot(0).args(["stop", "-t", "2", "echo-b"]), TIMEOUT);
    assert!(ran.success(), "{ran}");
    assert_eq!(
        ask_from(C1),
        ["unconnected no answer", "connected ECONNREFUSED"],
        "{test}: C1's AID is gone"
    );
}

#[test]
fn connected_udp_sockets_negotiate_by_aid() {
    let test = "connected_udp_sockets_negotiate_by_aid";
    let Some(mut lab) = Lab::new(test, "un") else {
        return;
    };
    let echo = common::script("udpecho.py");
    for aid in ["a", "b"] {
        let name = format!("echo-{aid}");
        let mut cmd = lab.appshot(0);
        cmd.args(["run", "--aid", aid, "--name", &name, "--detach"])
            .args([
                "--port", "9053", "--", "python3", &echo, aid, "0.0.0.0", "9053",
            ]);
        let ran = run(&mut cmd, TIMEOUT);
        assert!(ran.success(), "{test}: starting {name}: {ran}");
        lab.wait_log(0, &name, "bound 9053");
    }
    lab.agent(0, &format!("{A_B}:7946"));
    let client = common::script("udpclient.py");
    // The second line is the connected socket's: its connect was
    // negotiated with A's agent. (The first, a sendto, is not: it goes to
    // A's port 9053 as addressed.)
    let connected = |aid: &str| {
        let mut cmd = lab.appshot(1);
        cmd.args(["run", "--aid", aid, "--", "python3", &client, A_B, "9053"]);
        let ran = run(&mut cmd, TIMEOUT);
        assert!(ran.success(), "{test}: {ran}");
        ran.stdout.lines().nth(1).unwrap_or_default().to_string()
    };
    let b = connected("b");
    assert!(
        b.starts_with("connected b#") && b.ends_with(":ping peer port 9053"),
        "{test}: AID b from host B: {b}"
    );
    assert_eq!(
        connected("z"),
        "connected ECONNREFUSED",
        "{test}: AID z from host B"
    );
    let agent = lab.agent_log(0);
    assert!(
        agent.contains("aid=b") && agent.contains("aid=z"),
        "{test}: the agent did not answer both:\n{agent}"
    );
}

#[test]
fn a_new_instance_under_a_killed_ones_name_starts_without_its_entries() {
    let test = "a_new_instance_under_a_killed_ones_name_starts_without_its_entries";
    let Some(lab) = Lab::new(test, "nr") else {
        return;
    };
    let config = lab.dir("config").join("web.toml");
    fs::write(
        &config,
        format!("default_aid = \"x1\"\n\n[[source_rules]]\nsource = \"{C1}\"\naid = \"x1\"\n"),
    )
    .unwrap();
    lab.web(0, "web-x", "x1", Some(&config));
    let mine = |v: &Value| v.as_array().unwrap().clone();
    let ports = mine(&lab.json(0, &["ports", "--json"]));
    assert!(
        ports
            .iter()
            .any(|t| t["instance"] == "web-x" && t["aid"] == "x1"),
        "{ports:#?}"
    );
    assert!(lab.nft_ruleset(0).contains("/web-x/src"));
    let ps = mine(&lab.json(0, &["ps", "--json"]));
    let sup = ps.iter().find(|r| r["name"] == "web-x").unwrap()["supervisor_pid"]
        .as_u64()
        .unwrap();

    // SIGKILL the supervisor and, before anything else touches the
    // registry (`ps` and `ports` would reclaim), start another instance
    // under the same name and another AID: the name is alive again, so
    // only the new supervisor can remove what the dead one left.
    kill(Pid::from_raw(sup as i32), Signal::SIGKILL).unwrap();
    assert!(
        poll(READY, || !Path::new(&format!("/proc/{sup}")).exists()
            || fs::read_to_string(format!("/proc/{sup}/stat"))
                .is_ok_and(|s| s.contains(") Z"))),
        "supervisor {sup} did not die"
    );
    let ran = run(
        lab.appshot(0).args([
            "run", "--aid", "x2", "--name", "web-x", "--detach", "--", "sleep", "60",
        ]),
        TIMEOUT,
    );
    assert!(ran.success(), "{ran}");

    let ruleset = lab.nft_ruleset(0);
    assert!(
        !ruleset.contains("/web-x/"),
        "the dead web-x's source rules survived its successor's start:\n{ruleset}"
    );
    let ports = mine(&lab.json(0, &["ports", "--json"]));
    assert!(
        ports.iter().all(|t| t["instance"] != "web-x"),
        "the dead web-x's translations survived its successor's start: {ports:#?}"
    );
    let remote = lab.json(0, &["ports", "--remote", "--json"]);
    assert_eq!(remote["source_rules"], Value::Array(vec![]), "{remote:#}");
    let ps = mine(&lab.json(0, &["ps", "--json"]));
    let row = ps
        .iter()
        .find(|r| r["name"] == "web-x")
        .expect("web-x listed");
    assert_eq!(row["aid"], "x2", "{row}");
    let ran = run(lab.appshot(0).args(["stop", "-t", "2", "web-x"]), TIMEOUT);
    assert!(ran.success(), "{ran}");
}

/// Speaks the protocol independently of the Rust code (stdlib hmac), and
/// throws malformed, truncated, replayed, stale, oversized and idle
/// connections at the agent before one valid request.
const FUZZ: &str = r#"
import socket, struct, hmac, hashlib, os, time, sys, json, random
host, port, keyfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
key = open(keyfile, "rb").read()
rng = random.Random(7)

def frame(kind, body, k=key):
    hdr = b"AVPM" + bytes([1, kind]) + struct.pack(">H", len(body))
    return hdr + body + hmac.new(k, hdr + body, hashlib.sha256).digest()

def request(aid="a", vport=9000, ts=None, nonce=None):
    nonce = nonce or os.urandom(16)
    ts = int(time.time() * 1000) if ts is None else ts
    body = nonce + struct.pack(">Q", ts) + bytes([6, 4]) + socket.inet_aton(host)
    body += struct.pack(">H", vport) + bytes([len(aid)]) + aid.encode()
    return nonce, frame(1, body)

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf

def exchange(data, timeout=5, eof=False):
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(data)
        if eof:
            s.shutdown(socket.SHUT_WR)
        hdr = recv_exact(s, 8)
        if hdr is None:
            return ("closed", None)
        n = struct.unpack(">H", hdr[6:8])[0]
        rest = recv_exact(s, n + 32)
        if hdr[5] == 0xEE:
            return ("deny", None)
        body, tag = rest[:n], rest[n:]
        if not hmac.compare_digest(tag, hmac.new(key, hdr + body, hashlib.sha256).digest()):
            return ("badtag", None)
        return ("response", (body[:16].hex(), body[24], struct.unpack(">H", body[25:27])[0]))
    except socket.timeout:
        return ("timeout", None)
    except OSError:
        # Reset, or shut down under our feet: the agent closed on us.
        return ("closed", None)
    finally:
        s.close()

if sys.argv[4] == "valid":
    print(json.dumps({"valid": exchange(request()[1])}))
    sys.exit(0)
marker = sys.argv[4]
out = {}
nonce, good = request()
out["valid"] = exchange(good)
out["valid_nonce_echoed"] = out["valid"][1] is not None and out["valid"][1][0] == nonce.hex()
out["replayed"] = exchange(good)[0]
out["stale"] = exchange(request(ts=int(time.time() * 1000) - 120000)[1])[0]
out["bad_mac"] = exchange(request()[1][:-1] + b"\x00")[0]
out["wrong_key"] = exchange(frame(1, request()[1][8:-32], k=b"x" * 32))[0]
out["oversized"] = exchange(b"AVPM\x01\x01\xff\xff" + b"\x00" * 64)[0]
out["bad_magic"] = exchange(b"GET / HTTP/1.0\r\n\r\n")[0]
out["future_version"] = exchange(b"AVPM\x09\x01\x00\x00" + b"\x00" * 32)[0]
out["truncated"] = exchange(good[:20], timeout=6)[0]
kinds = {}
for i in range(300):
    _, f = request()
    choice = rng.randrange(4)
    if choice == 0:
        data = bytearray(f); data[rng.randrange(len(data))] ^= 1 << rng.randrange(8); data = bytes(data)
    elif choice == 1:
        data = f[:rng.randrange(len(f))]
    elif choice == 2:
        data = f + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    else:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    r = exchange(data, timeout=6, eof=True)[0]
    # A valid frame with bytes after it is served, then the rest refused.
    kind = ["flipped", "truncated", "appended", "random"][choice] + ":" + r
    kinds[kind] = kinds.get(kind, 0) + 1
out["fuzz"] = kinds
# Idle connections beyond the per-peer limit: held open, sending nothing.
idle = []
for i in range(80):
    try:
        idle.append(socket.create_connection((host, port), timeout=5))
    except OSError:
        pass
out["idle_opened"] = len(idle)
open(marker, "w").close()
time.sleep(1.5)
for s in idle:
    s.close()
out["after"] = exchange(request()[1])
print(json.dumps(out))
"#;

#[test]
fn the_agent_survives_hostile_peers() {
    let test = "the_agent_survives_hostile_peers";
    let Some(mut lab) = Lab::new(test, "fz") else {
        return;
    };
    lab.web(0, "web-a", "a", None);
    lab.agent(0, "0.0.0.0:7946");
    let key = lab.key.to_string_lossy().into_owned();
    // While B's hostile script holds its idle connections, C (a different
    // peer) is served: the per-peer limit keeps one host from starving
    // the others.
    let fuzz_path = lab.work.path().join("fuzz.py");
    fs::write(&fuzz_path, FUZZ).unwrap();
    let marker = lab.work.path().join("idle-held");
    let mut hostile = lab.in_ns(1, &which("python3").unwrap());
    hostile
        .arg(&fuzz_path)
        .args([A_B, "7946", &key, marker.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = hostile.spawn().unwrap();
    poll(TIMEOUT, || {
        marker.exists() || child.try_wait().is_ok_and(|s| s.is_some())
    });
    if !marker.exists() {
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        panic!(
            "the hostile script never got to its idle phase: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut other = lab.in_ns(2, &which("python3").unwrap());
    other.arg(&fuzz_path).args([A_C, "7946", &key, "valid"]);
    let served = run(&mut other, TIMEOUT);
    assert!(
        served.stdout.contains("\"response\""),
        "another peer is served while B holds its idle connections: {served}"
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fuzz script: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{test}: fuzz script took {:?}", started.elapsed());
    let r: Value = serde_json::from_str(stdout.trim()).expect("fuzz output");
    let real_a = lab.json(0, &["ports", "--json"]).as_array().unwrap()[0]["real_port"].clone();
    assert_eq!(r["valid"][0], "response", "{r:#}");
    assert_eq!(r["valid"][1][1], 0, "ack: {r:#}");
    assert_eq!(r["valid"][1][2], real_a, "{r:#}");
    assert_eq!(r["valid_nonce_echoed"], true);
    for case in [
        "replayed",
        "stale",
        "bad_mac",
        "wrong_key",
        "future_version",
    ] {
        assert_eq!(r[case], "deny", "{case}: {r:#}");
    }
    for case in ["oversized", "bad_magic", "truncated"] {
        assert!(r[case] == "deny" || r[case] == "closed", "{case}: {r:#}");
    }
    let fuzz = r["fuzz"].as_object().unwrap();
    for kind in fuzz.keys() {
        let served = kind.ends_with(":response") && !kind.starts_with("appended");
        assert!(!served, "a mutated frame was served ({kind}): {r:#}");
        assert!(
            !kind.ends_with(":badtag") && !kind.ends_with(":timeout"),
            "{kind}: {r:#}"
        );
    }
    let total: u64 = fuzz.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, 300, "{r:#}");
    assert_eq!(
        r["after"][0], "response",
        "valid request after the abuse: {r:#}"
    );

    // And through the real client, from another host.
    let ok = lab.curl_as(1, "a", &format!("http://{A_B}:9000/"), &lab.key);
    assert!(serves(&ok, "web-a"), "{ok}");
    let log = lab.agent_log(0);
    for why in [
        "bad MAC",
        "replayed nonce",
        "stale timestamp",
        "malformed frame",
        "too many connections",
    ] {
        assert!(log.contains(why), "agent log lacks {why:?}:\n{log}");
    }
}
