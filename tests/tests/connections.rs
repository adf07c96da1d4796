//! Live TCP connections across snapshot and restore: an unmodified
//! redis-server with a Python client outside appshot that keeps one
//! connection and sends `INCR` every 10 ms, checking every answer.
//!
//! Each test runs in a network namespace of its own (the test's thread
//! and everything it starts), so the kernel's counters and the nftables
//! rules it sees are its alone.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{info_field, poll, port_pairs, start_redis, Harness, READY};

/// Connects to HOST:PORT and sends INCR on one connection every
/// 10 ms until STOP exists; every answer must be the one before plus one.
/// Prints each answer (flushed) and `ok FIRST LAST` at the end; any error
/// prints `ERROR …` and exits 1.
const CLIENT: &str = r#"
import os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port))
s.settimeout(60)
first = last = None
buf = b""
try:
    while not os.path.exists(stop):
        s.sendall(b"*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n")
        while b"\r\n" not in buf:
            more = s.recv(4096)
            if not more:
                raise Exception("EOF")
            buf += more
        line, buf = buf.split(b"\r\n", 1)
        if not line.startswith(b":"):
            raise Exception("answer %r" % line)
        n = int(line[1:])
        if last is not None and n != last + 1:
            raise Exception("after %d came %d" % (last, n))
        if first is None:
            first = n
        last = n
        print(n, flush=True)
        time.sleep(0.01)
except Exception as e:
    print("ERROR", repr(e), flush=True)
    sys.exit(1)
print("ok", first, last, flush=True)
"#;

/// Moves the calling test thread (and so everything it starts) into a
/// new network namespace with loopback up.
fn own_network() {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let ran = common::run(Command::new("ip").args(["link", "set", "lo", "up"]), READY);
    assert!(ran.success(), "ip link set lo up: {ran}");
}

/// The network lock's chains left in appshot's table.
fn lock_chains() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "table", "inet", "appshot"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("/lock/"))
        .map(String::from)
        .collect()
}

struct Client {
    child: Child,
    out: PathBuf,
    stop: PathBuf,
}

impl Client {
    fn start(h: &Harness, name: &str, port: u16) -> Client {
        Client::start_in(h, name, None, "127.0.0.1", port)
    }

    /// The client in network namespace `netns` (by `ip netns exec`),
    /// connecting to `host`.
    fn start_in(h: &Harness, name: &str, netns: Option<&str>, host: &str, port: u16) -> Client {
        let dir = h.dir(&format!("client-{name}"));
        let script = dir.join("client.py");
        fs::write(&script, CLIENT).unwrap();
        let out = dir.join("out");
        let stop = dir.join("stop");
        let mut cmd = match netns {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", n, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let child = cmd
            .arg(&script)
            .arg(host)
            .arg(port.to_string())
            .arg(&stop)
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the client");
        let c = Client { child, out, stop };
        c.wait_answers(20);
        c
    }

    fn answers(&self) -> Vec<String> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Waits until `more` answers beyond those seen now have come.
    fn wait_answers(&self, more: usize) -> usize {
        let from = self.answers().len();
        let mut lines = Vec::new();
        let ok = poll(Duration::from_secs(30), || {
            lines = self.answers();
            lines.len() >= from + more || lines.iter().any(|l| l.starts_with("ERROR"))
        });
        assert!(
            ok && !lines.iter().any(|l| l.starts_with("ERROR")),
            "client: {} answers, wanted {} more than {from}: {:?}",
            lines.len(),
            more,
            lines.last()
        );
        lines.len()
    }

    /// Stops the client; its last answer, after asserting it never saw
    /// an error.
    fn finish(mut self) -> u64 {
        fs::write(&self.stop, "").unwrap();
        let status = self.child.wait().unwrap();
        let lines = self.answers();
        let last = lines.last().cloned().unwrap_or_default();
        assert!(status.success(), "client failed: {last}");
        let fields: Vec<&str> = last.split_whitespace().collect();
        assert_eq!(fields.first(), Some(&"ok"), "client: {last}");
        fields[2].parse().unwrap()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real port instance `name` listens on for virtual port `port`.
fn real_port(h: &Harness, name: &str, port: u16) -> u16 {
    let row = h
        .instance(name)
        .unwrap_or_else(|| panic!("{name} not running"));
    port_pairs(&row)
        .into_iter()
        .find(|p| p.virtual_port == port)
        .unwrap_or_else(|| panic!("{name} has no real port for {port}: {row}"))
        .real
}

/// Counters that move when a reset is sent or a connection aborted.
fn reset_counters() -> Option<String> {
    let out = Command::new("nstat")
        .args([
            "-az",
            "TcpOutRsts",
            "TcpExtTCPAbortOnData",
            "TcpExtTCPAbortOnClose",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut values: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{}={}", f.first()?, f.get(1)?))
        })
        .collect();
    values.sort();
    Some(values.join(" "))
}

fn redis_counter(h: &Harness, aid: &str, port: &str) -> u64 {
    let out = redis_cli_port(h, aid, port, &["GET", "n"]);
    out.parse()
        .unwrap_or_else(|_| panic!("GET n under {aid}: {out:?}"))
}

fn redis_cli_port(h: &Harness, aid: &str, port: &str, args: &[&str]) -> String {
    let mut command = vec!["redis-cli", "-p", port];
    command.extend_from_slice(args);
    let ran = h.client(aid, &command);
    assert!(
        ran.success() && !ran.stdout.contains("Could not connect"),
        "redis-cli {args:?} under {aid}: {ran}"
    );
    ran.stdout.trim().to_string()
}

fn image(h: &Harness, name: &str) -> PathBuf {
    h.dir("images").join(format!("{name}.img"))
}

fn described_connections(h: &Harness, image: &Path) -> Vec<String> {
    h.inspect(image)["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["kind"].as_str())
        .filter(|k| k.starts_with("tcp established"))
        .map(String::from)
        .collect()
}

#[test]
fn a_redis_client_goes_on_across_stop_and_restore() {
    let test = "a_redis_client_goes_on_across_stop_and_restore";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli", "python3", "nft", "ip"])
    else {
        return;
    };
    own_network();
    start_redis(&mut h, "conn-a", "conna", &["--port", "19950"]);
    let real = real_port(&h, "conn-a", 19950);
    let client = Client::start(&h, "a", real);
    let before = reset_counters();

    let img = image(&h, "conn-a");
    let ran = h.snapshot("conn-a", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    assert!(h.instance("conn-a").is_none(), "conn-a still runs");
    assert_eq!(lock_chains().len(), 2, "no network lock held for the image");
    let conns = described_connections(&h, &img);
    assert_eq!(conns.len(), 1, "{conns:?}");
    assert!(
        conns[0].contains(&format!("(real 127.0.0.1:{real} -> 127.0.0.1:")),
        "{conns:?}"
    );
    let stopped_at = client.answers().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        client.answers().len(),
        stopped_at,
        "answers came while the instance was stopped"
    );

    h.restore("conn-a", &img, &[]);
    assert_eq!(real_port(&h, "conn-a", 19950), real, "real port changed");
    client.wait_answers(100);
    let last = client.finish();
    assert_eq!(
        redis_counter(&h, "conna", "19950"),
        last,
        "lost or doubled INCR"
    );
    if let Some(before) = before {
        assert_eq!(reset_counters(), Some(before), "resets or aborts counted");
    }
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
}

#[test]
fn a_live_copy_closes_its_connection_and_the_original_goes_on() {
    let test = "a_live_copy_closes_its_connection_and_the_original_goes_on";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli", "python3", "nft", "ip"])
    else {
        return;
    };
    own_network();
    start_redis(&mut h, "conn-b", "connb", &["--port", "19951"]);
    let real = real_port(&h, "conn-b", 19951);
    let client = Client::start(&h, "b", real);

    let img = image(&h, "conn-b");
    let ran = h.snapshot("conn-b", &img, &["--leave-running"]);
    assert!(ran.success(), "snapshot --leave-running: {ran}");
    client.wait_answers(50);

    h.restore(
        "conn-b-copy",
        &img,
        &["--name", "conn-b-copy", "--aid", "connc"],
    );
    assert_ne!(real_port(&h, "conn-b-copy", 19951), real);
    // The copy dropped its copy of the client: redis-cli is its only one.
    let mut clients = String::new();
    let closed = poll(READY, || {
        let info = redis_cli_port(&h, "connc", "19951", &["INFO", "clients"]);
        clients = info_field(&info, "connected_clients");
        clients == "1"
    });
    assert!(closed, "the copy still has {clients} clients");
    // It serves its own AID, with the counter as it was at the snapshot.
    let copied = redis_counter(&h, "connc", "19951");
    client.wait_answers(100);
    let last = client.finish();
    assert!(copied < last, "copy {copied}, original {last}");
    assert_eq!(redis_counter(&h, "connb", "19951"), last);
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
}

#[test]
fn a_taken_real_port_refuses_the_restore_and_tcp_close_drops_the_connection() {
    let test = "a_taken_real_port_refuses_the_restore_and_tcp_close_drops_the_connection";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli", "python3", "nft", "ip"])
    else {
        return;
    };
    own_network();
    start_redis(&mut h, "conn-d", "connd", &["--port", "19952"]);
    let real = real_port(&h, "conn-d", 19952);
    let client = Client::start(&h, "d", real);
    let img = image(&h, "conn-d");
    let ran = h.snapshot("conn-d", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");

    // Someone else takes the real port meanwhile.
    let squatter = std::net::TcpListener::bind(("0.0.0.0", real)).expect("taking the real port");
    let ran = h.try_restore("conn-d", &img, &[]);
    assert!(!ran.success(), "restored on a taken port: {ran}");
    assert!(
        ran.stderr.contains(&format!("real port {real}")),
        "refusal does not name the port: {ran}"
    );
    assert_eq!(
        lock_chains().len(),
        2,
        "the lock went with a refused restore"
    );

    h.restore("conn-d", &img, &["--tcp-close"]);
    assert_ne!(real_port(&h, "conn-d", 19952), real);
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
    // redis dropped the reset connection; the client's next
    // retransmission meets the squatter's port and is reset.
    let mut clients = String::new();
    let dropped = poll(READY, || {
        let info = redis_cli_port(&h, "connd", "19952", &["INFO", "clients"]);
        clients = info_field(&info, "connected_clients");
        clients == "1"
    });
    assert!(dropped, "the restore still has {clients} clients");
    // A client whose request was acknowledged before the dump has nothing
    // to retransmit and no reset to meet: its own 60 s timeout ends it.
    let failed = poll(Duration::from_secs(75), || {
        client.answers().iter().any(|l| l.starts_with("ERROR"))
    });
    assert!(
        failed,
        "the client never saw its connection go: {:?}",
        client.answers().last()
    );
    drop(squatter);
}

/// Echoes each datagram to 127.0.0.1:19953 with the peer port of a second,
/// connected socket and its SO_BROADCAST and SO_REUSEADDR.
const UDP_ECHO: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 19953))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
c.connect(("127.0.0.1", 19954))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(100)
    s.sendto(b"%s %d %d %d" % (data, c.getpeername()[1],
             c.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST),
             s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)), addr)
"#;

fn udp_ask(what: &str) -> String {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.send_to(what.as_bytes(), "127.0.0.1:19953").unwrap();
    let mut buf = [0u8; 200];
    let (n, _) = s.recv_from(&mut buf).expect("no UDP answer");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn udp_sockets_come_back_bound_and_connected_with_their_options() {
    let test = "udp_sockets_come_back_bound_and_connected_with_their_options";
    let Some(mut h) = Harness::new(test, &["python3", "ip"]) else {
        return;
    };
    own_network();
    let dir = h.dir("udp");
    fs::write(dir.join("echo.py"), UDP_ECHO).unwrap();
    h.start("udp-e", "udpe", &dir, &[], &["python3", "echo.py"]);
    h.wait_log("udp-e", "ready");
    assert_eq!(udp_ask("before"), "before 19954 1 1");

    let img = image(&h, "udp-e");
    let ran = h.snapshot("udp-e", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    let kinds: Vec<String> = h.inspect(&img)["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["kind"].as_str().map(String::from))
        .filter(|k| k.starts_with("udp"))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert_eq!(kinds[0], "udp 127.0.0.1:19953");
    assert!(kinds[1].ends_with("-> 127.0.0.1:19954"), "{kinds:?}");

    h.restore("udp-e", &img, &[]);
    assert_eq!(udp_ask("after"), "after 19954 1 1");
}

#[test]
fn clones_of_a_template_taken_with_a_client_connected_serve_their_own_aids() {
    let test = "clones_of_a_template_taken_with_a_client_connected_serve_their_own_aids";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli", "python3", "nft", "ip"])
    else {
        return;
    };
    own_network();
    start_redis(&mut h, "conn-t", "connt", &["--port", "19955"]);
    let client = Client::start(&h, "t", real_port(&h, "conn-t", 19955));
    let img = image(&h, "conn-t");
    let ran = h.snapshot("conn-t", &img, &["--template"]);
    assert!(ran.success(), "snapshot --template: {ran}");
    // A template never owns its connections: nothing stays locked.
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
    let at_template = client.answers().len();

    let names: Vec<String> = (1..=3).map(|i| format!("tc-{i}")).collect();
    h.clone_template(&names, &img, &["--aid", "tc", "--count", "3"]);
    for aid in &names {
        let mut clients = String::new();
        let closed = poll(READY, || {
            let info = redis_cli_port(&h, aid, "19955", &["INFO", "clients"]);
            clients = info_field(&info, "connected_clients");
            clients == "1"
        });
        assert!(closed, "clone {aid} still has {clients} clients");
        let n = redis_counter(&h, aid, "19955");
        assert!(n + 1 >= at_template as u64, "clone {aid}: n = {n}");
        assert_eq!(redis_cli_port(&h, aid, "19955", &["SET", "who", aid]), "OK");
        assert_eq!(redis_cli_port(&h, aid, "19955", &["GET", "who"]), *aid);
    }
    // The original's client lost its server with the template's instance.
    // A client whose request was acknowledged before the dump has nothing
    // to retransmit and no reset to meet: its own 60 s timeout ends it.
    let failed = poll(Duration::from_secs(75), || {
        client.answers().iter().any(|l| l.starts_with("ERROR"))
    });
    assert!(failed, "the client went on: {:?}", client.answers().last());
}

/// A network namespace reached over a veth pair from the test's own:
/// 10.199.0.1 here, 10.199.0.2 there. Deleted on drop.
struct Remote {
    name: String,
}

impl Remote {
    fn new() -> Remote {
        let name = format!("appshot-conn-{}", std::process::id());
        let ip = |args: &[&str]| {
            let ran = common::run(Command::new("ip").args(args), READY);
            assert!(ran.success(), "ip {args:?}: {ran}");
        };
        ip(&["netns", "add", &name]);
        let remote = Remote { name };
        let n = remote.name.as_str();
        ip(&[
            "link", "add", "vconn0", "type", "veth", "peer", "name", "vconn1", "netns", n,
        ]);
        ip(&["addr", "add", "10.199.0.1/24", "dev", "vconn0"]);
        ip(&["link", "set", "vconn0", "up"]);
        for args in [
            &["addr", "add", "10.199.0.2/24", "dev", "vconn1"][..],
            &["link", "set", "vconn1", "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["netns", "exec", n, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        }
        remote
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn a_client_over_veth_goes_on_across_stop_and_restore() {
    let test = "a_client_over_veth_goes_on_across_stop_and_restore";
    let Some(mut h) = Harness::new(test, &["redis-server", "redis-cli", "python3", "nft", "ip"])
    else {
        return;
    };
    own_network();
    let remote = Remote::new();
    start_redis(
        &mut h,
        "conn-v",
        "connv",
        &["--port", "19956", "--protected-mode", "no"],
    );
    let real = real_port(&h, "conn-v", 19956);
    let client = Client::start_in(&h, "v", Some(&remote.name), "10.199.0.1", real);
    let before = reset_counters();

    let img = image(&h, "conn-v");
    let ran = h.snapshot("conn-v", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    let conns = described_connections(&h, &img);
    assert!(
        conns.len() == 1 && conns[0].contains(&format!("(real 10.199.0.1:{real} -> 10.199.0.2:")),
        "{conns:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    h.restore("conn-v", &img, &[]);
    client.wait_answers(100);
    let last = client.finish();
    assert_eq!(
        redis_counter(&h, "connv", "19956"),
        last,
        "lost or doubled INCR"
    );
    if let Some(before) = before {
        assert_eq!(reset_counters(), Some(before), "resets or aborts counted");
    }
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
}

/// tcpkeeper's pattern: the byte at offset `i` of a stream.
fn pattern(i: u64) -> u8 {
    ((i.wrapping_mul(2654435761) >> 13) ^ (i >> 9)) as u8
}

/// The number after `word ` on a line of `log`.
fn logged(log: &str, word: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.strip_prefix(word)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

#[test]
fn every_queued_byte_of_a_c_program_arrives_once_across_stop_and_restore() {
    use nix::sys::socket::{self as ns, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::io::{ErrorKind, Read, Write};
    use std::net::{Shutdown, TcpStream};

    let test = "every_queued_byte_of_a_c_program_arrives_once_across_stop_and_restore";
    let Some(mut h) = Harness::new(test, &["gcc", "nft", "ip"]) else {
        return;
    };
    own_network();
    let bin = h.compile("tcpkeeper.c", "tcpkeeper");
    let dir = h.dir("keeper");
    const MORE: u64 = 300_000;
    let more = MORE.to_string();
    h.start(
        "tcp-k",
        "tcpk",
        &dir,
        &[],
        &[bin.to_str().unwrap(), "19957", &more],
    );
    h.wait_log("tcp-k", "tcpkeeper listening on port 19957");
    let real = real_port(&h, "tcp-k", 19957);

    // A peer with a small receive buffer that reads nothing before the
    // restore: the keeper's send queue keeps a tail it could not send.
    let fd = ns::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    ns::setsockopt(&fd, sockopt::RcvBuf, &4096).unwrap();
    ns::connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(127, 0, 0, 1, real),
    )
    .expect("connecting to the keeper");
    let mut peer = TcpStream::from(fd);
    let log = h.wait_log("tcp-k", "sent ");
    let keeper_sent = logged(&log, "sent").expect("sent N");
    // The peer writes until the keeper's receive queue and its own send
    // queue are full.
    peer.set_nonblocking(true).unwrap();
    let mut sent = 0u64;
    let mut idle = 0;
    while idle < 30 {
        let chunk: Vec<u8> = (sent..sent + 65536).map(pattern).collect();
        match peer.write(&chunk) {
            Ok(n) => {
                sent += n as u64;
                idle = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                idle += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("peer write: {e}"),
        }
    }

    let img = image(&h, "tcp-k");
    let ran = h.snapshot("tcp-k", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    let conns = described_connections(&h, &img);
    assert_eq!(conns.len(), 1, "{conns:?}");
    // "…, N bytes to send (U unsent), R unread"
    let numbers: Vec<u64> = conns[0]
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .rev()
        .take(3)
        .collect();
    let (unread, unsent, to_send) = (numbers[0], numbers[1], numbers[2]);
    // Unread by the keeper, never sent by it, and (what it sent before the
    // peer's window closed) unread by the peer.
    assert!(
        unread > 0 && unsent > 0 && to_send >= unsent && keeper_sent > to_send,
        "not queued every way (the keeper sent {keeper_sent}): {conns:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    h.restore("tcp-k", &img, &[]);

    fs::write(dir.join("go"), "").unwrap();
    peer.set_nonblocking(false).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    peer.set_write_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut reader = peer.try_clone().unwrap();
    let read = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = reader.read(&mut buf).expect("peer read");
            if n == 0 {
                return Ok(got);
            }
            for b in &buf[..n] {
                if *b != pattern(got) ^ 0x5a {
                    return Err(format!("byte {got}: {b} != {}", pattern(got) ^ 0x5a));
                }
                got += 1;
            }
        }
    });
    let end = sent + MORE;
    while sent < end {
        let chunk: Vec<u8> = (sent..end.min(sent + 65536)).map(pattern).collect();
        peer.write_all(&chunk).expect("peer write after restore");
        sent += chunk.len() as u64;
    }
    peer.shutdown(Shutdown::Write).unwrap();
    let got = read.join().unwrap().expect("the keeper's bytes, in order");
    assert_eq!(got, keeper_sent + MORE, "the keeper's bytes, once each");
    let log = h.wait_log("tcp-k", "wrote ");
    assert!(
        log.contains(&format!("read {sent} ok")),
        "the peer's {sent} bytes, once each in order: {log}"
    );
}

/// Accepts two connections on 127.0.0.1:19958: the first it does not read
/// before the file `go` exists; on the second it sends `bye` and shuts its
/// writing side. Then it reads the first to EOF and answers on it, reads
/// the second to EOF, and prints what each brought.
const HALF: &str = r#"
import os, socket, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 19958))
l.listen(4)
print("listening", flush=True)
a, _ = l.accept()
b, _ = l.accept()
b.sendall(b"bye")
b.shutdown(socket.SHUT_WR)
print("accepted", flush=True)
while not os.path.exists("go"):
    time.sleep(0.05)
def drain(s):
    data = b""
    while True:
        more = s.recv(100)
        if not more:
            return data
        data += more
got_a = drain(a)
a.sendall(b"still here")
a.close()
got_b = drain(b)
print("a read %r, b read %r" % (got_a, got_b), flush=True)
"#;

#[test]
fn half_closed_connections_keep_their_open_half_across_stop_and_restore() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    let test = "half_closed_connections_keep_their_open_half_across_stop_and_restore";
    let Some(mut h) = Harness::new(test, &["python3", "nft", "ip"]) else {
        return;
    };
    own_network();
    let dir = h.dir("half");
    fs::write(dir.join("half.py"), HALF).unwrap();
    h.start("tcp-h", "tcph", &dir, &[], &["python3", "half.py"]);
    h.wait_log("tcp-h", "listening");
    let real = real_port(&h, "tcp-h", 19958);
    let mut a = TcpStream::connect(("127.0.0.1", real)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut b = TcpStream::connect(("127.0.0.1", real)).unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    h.wait_log("tcp-h", "accepted");
    // The instance's end of a: CLOSE_WAIT, with "hello" unread before the FIN.
    a.write_all(b"hello").unwrap();
    a.shutdown(Shutdown::Write).unwrap();
    // Its end of b: FIN_WAIT2, once its FIN is read and acknowledged here.
    let mut got = Vec::new();
    b.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    std::thread::sleep(Duration::from_millis(300));
    let before = reset_counters();

    let img = image(&h, "tcp-h");
    let ran = h.snapshot("tcp-h", &img, &[]);
    assert!(ran.success(), "snapshot: {ran}");
    let kinds: Vec<String> = h.inspect(&img)["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["kind"].as_str().map(String::from))
        .filter(|k| k.starts_with("tcp half-closed"))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(
        kinds
            .iter()
            .any(|k| k.contains("(peer shut)") && k.ends_with("5 unread"))
            && kinds.iter().any(|k| k.contains("(shut for writing)")),
        "{kinds:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    h.restore("tcp-h", &img, &[]);
    fs::write(dir.join("go"), "").unwrap();

    // a: the instance read "hello" and EOF, and still writes.
    let mut got = Vec::new();
    a.read_to_end(&mut got).expect("reading a");
    assert_eq!(got, b"still here");
    // b: the instance still reads.
    b.write_all(b"more").expect("writing b");
    b.shutdown(Shutdown::Write).unwrap();
    let log = h.wait_log("tcp-h", "a read ");
    assert!(
        log.contains("a read b'hello', b read b'more'"),
        "each open half carried its bytes: {log}"
    );
    if let Some(before) = before {
        assert_eq!(reset_counters(), Some(before), "resets or aborts counted");
    }
    assert_eq!(lock_chains(), Vec::<String>::new(), "network lock left");
}
