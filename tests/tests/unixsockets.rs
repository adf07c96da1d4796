//! Unix sockets and shared open file descriptions across snapshot and
//! restore: socketpairs keep their queued bytes and message boundaries,
//! listeners their names and pending connections, dup'd fds one offset and
//! their own close-on-exec flags; a socket leading outside the instance
//! refuses the snapshot by fd and leaves the instance running.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

use common::{alive, pid_of, poll, script, Harness};

/// One line to a TCP server on 127.0.0.1:PORT under an AID: sends
/// argv[2], half-closes, prints the answer.
const QUERY: &str = "import socket, sys\n\
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n\
s.sendall(sys.argv[2].encode())\n\
s.shutdown(socket.SHUT_WR)\n\
print(s.makefile().read(), end='')\n";

fn ask(h: &Harness, aid: &str, port: u16, line: &str) -> String {
    let ran = h.client(aid, &["python3", "-c", QUERY, &port.to_string(), line]);
    assert!(
        ran.success(),
        "query {line:?} on port {port} under {aid}: {ran}"
    );
    ran.stdout.trim_end().to_string()
}

#[test]
fn unix_sockets_and_shared_descriptions_survive_snapshot_and_restore() {
    let test = "unix_sockets_and_shared_descriptions_survive_snapshot_and_restore";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("unixkeeper.c", "unixkeeper");
    let dir = h.dir("keeper");
    let bin = bin.to_str().expect("utf-8 path");
    h.start("ukeeper", "uk", &dir, &[], &[bin, "19800"]);
    h.wait_log("ukeeper", "unixkeeper listening on port 19800");
    assert_eq!(ask(&h, "uk", 19800, "ping"), "pong");
    let sock = dir.join("keeper.sock");
    let mode = |p: &std::path::Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&sock), 0o640, "unixkeeper set its socket file's mode");

    let image = h.dir("images").join("ukeeper.img");
    let ran = h.snapshot("ukeeper", &image, &[]);
    assert!(ran.success(), "snapshot of unixkeeper: {ran}");
    assert!(
        sock.exists(),
        "the dead original leaves its socket file behind, which restore must replace"
    );
    h.restore("ukeeper", &image, &[]);
    assert_eq!(
        ask(&h, "uk", 19800, "report"),
        "stream=ok seqpacket=ok dgram=ok pending=ok path=ok abstract=ok accepted=ok \
         bound=ok unbound=ok opts=ok dup=ok cloexec=1,0,1",
        "every queued byte and message read once in order, the pending connection \
         accepted, listeners accepting, one offset for the dup'd fds"
    );
    assert_eq!(
        mode(&sock),
        0o640,
        "the re-created socket file keeps its mode"
    );
}

#[test]
fn a_unix_socket_connected_outside_the_instance_refuses_the_snapshot() {
    let test = "a_unix_socket_connected_outside_the_instance_refuses_the_snapshot";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("outside");
    let path = dir.join("server.sock");
    let server = UnixListener::bind(&path).expect("binding the outside server");
    let accepted = std::thread::spawn(move || server.accept().map(|(s, _)| s));
    let program = "import socket, sys, time\n\
        s = socket.socket(socket.AF_UNIX)\n\
        s.connect(sys.argv[1])\n\
        print('connected fd', s.fileno(), flush=True)\n\
        while True:\n    time.sleep(0.05)\n";
    let path_s = path.to_str().expect("utf-8 path");
    h.start(
        "client",
        "uc",
        &dir,
        &[],
        &["python3", "-c", program, path_s],
    );
    let log = h.wait_log("client", "connected fd");
    let _peer = accepted.join().expect("accept thread").expect("accept");
    let fd: u32 = log
        .lines()
        .find_map(|l| l.split("connected fd ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .expect("fd number in the log");
    let app = pid_of(&h.instance("client").expect("client listed"));

    let images = h.dir("images");
    let ran = h.snapshot("client", &images.join("client.img"), &[]);
    assert!(
        !ran.success(),
        "a peer outside must refuse the snapshot: {ran}"
    );
    assert!(
        ran.stderr.contains(&format!("fd {fd}: unix stream socket"))
            && ran.stderr.contains("outside the instance")
            && ran.stderr.contains(path_s),
        "the refusal names fd {fd}, the object and its peer {path_s}: {ran}"
    );
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0, "no image");
    assert!(alive(app), "the refused instance runs on");
    assert!(h.instance("client").is_some(), "client still listed");
}

#[test]
fn python_asyncio_keeps_serving_after_restore() {
    let test = "python_asyncio_keeps_serving_after_restore";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("aio");
    // The selector event loop wakes itself through a socketpair.
    let program = "import asyncio\n\
        async def serve(r, w):\n    await r.read(100)\n    w.write(b'aio-ok\\n')\n    await w.drain()\n    w.close()\n\
        async def main():\n    srv = await asyncio.start_server(serve, '127.0.0.1', 19801)\n    print('serving', flush=True)\n    await srv.serve_forever()\n\
        asyncio.run(main())\n";
    h.start("aio", "ua", &dir, &[], &["python3", "-c", program]);
    h.wait_log("aio", "serving");
    assert_eq!(ask(&h, "ua", 19801, "x"), "aio-ok");
    let image = h.dir("images").join("aio.img");
    let ran = h.snapshot("aio", &image, &[]);
    assert!(ran.success(), "snapshot of asyncio: {ran}");
    h.restore("aio", &image, &[]);
    for _ in 0..3 {
        assert_eq!(ask(&h, "ua", 19801, "x"), "aio-ok");
    }
}

#[test]
fn unix_connections_split_between_parent_and_child_survive_snapshot_and_restore() {
    let test = "unix_connections_split_between_parent_and_child_survive_snapshot_and_restore";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("split");
    let program = script("splitpairs.py");
    let dir_s = dir.to_str().expect("utf-8 path");
    h.start("split", "us", &dir, &[], &["python3", &program, dir_s]);
    h.wait_log("split", "ready");

    let image = h.dir("images").join("split.img");
    let ran = h.snapshot("split", &image, &[]);
    assert!(
        ran.success(),
        "snapshot of a parent and child holding the two ends of connections: {ran}"
    );
    h.restore("split", &image, &[]);
    fs::write(dir.join("go"), "").unwrap();
    let read = |name: &str| fs::read_to_string(dir.join(name)).ok();
    assert!(
        poll(std::time::Duration::from_secs(20), || read("parent")
            .is_some()
            && read("child").is_some()),
        "both sides report: parent {:?}, child {:?}, log {:?}",
        read("parent"),
        read("child"),
        fs::read_to_string(h.log_path("split"))
    );
    assert_eq!(
        read("parent").unwrap(),
        "ok c1,c2 d1,d2 client-bytes child-after c3 d3 client-after pending-after",
        "the parent reads what the child queued before the snapshot exactly once, in order, \
         then each connection talks both ways (the pending one accepted after restore)"
    );
    assert_eq!(
        read("child").unwrap(),
        "ok p1,p2 q1,q2 server-bytes parent-after p3 q3 server-after accepted-after",
        "the child reads what the parent queued before the snapshot exactly once, in order, \
         then each connection talks both ways"
    );

    // The restored tree, its connections split again, snapshots and
    // restores again with what each side queued since.
    assert!(
        poll(std::time::Duration::from_secs(20), || read("parent-again")
            .is_some()
            && read("child-again").is_some()),
        "both sides queue again: {:?}",
        fs::read_to_string(h.log_path("split"))
    );
    let ran = h.snapshot("split", &image, &[]);
    assert!(
        ran.success(),
        "second snapshot, of the restored tree: {ran}"
    );
    h.restore("split", &image, &[]);
    fs::write(dir.join("go2"), "").unwrap();
    assert!(
        poll(std::time::Duration::from_secs(20), || read("parent2")
            .is_some()
            && read("child2").is_some()),
        "both sides report again: {:?}",
        fs::read_to_string(h.log_path("split"))
    );
    assert_eq!(read("parent2").unwrap(), "again-from-child m-child");
    assert_eq!(read("child2").unwrap(), "again-from-parent m-parent");
}

#[test]
fn a_datagram_socket_connected_one_way_to_another_process_refuses_the_snapshot() {
    let test = "a_datagram_socket_connected_one_way_to_another_process_refuses_the_snapshot";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("oneway");
    // The child binds a datagram socket; its parent connects to it, one
    // way: nothing connects back.
    let program = "import os, socket, time\n\
        if os.fork() == 0:\n    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n    s.bind('sink.sock')\n    open('bound', 'w').close()\n    while True:\n        time.sleep(0.05)\n\
        while not os.path.exists('bound'):\n    time.sleep(0.02)\n\
        t = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        t.connect('sink.sock')\n\
        print('connected fd', t.fileno(), flush=True)\n\
        while True:\n    time.sleep(0.05)\n";
    h.start("oneway", "uo", &dir, &[], &["python3", "-c", program]);
    let log = h.wait_log("oneway", "connected fd");
    let fd: u32 = log
        .lines()
        .find_map(|l| l.split("connected fd ").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .expect("fd number in the log");
    let app = pid_of(&h.instance("oneway").expect("oneway listed"));

    let images = h.dir("images");
    let ran = h.snapshot("oneway", &images.join("oneway.img"), &[]);
    assert!(
        !ran.success(),
        "a one-way connection to another process must refuse the snapshot: {ran}"
    );
    assert!(
        ran.stderr.contains(&format!(
            "fd {fd}: unix datagram socket connected one way to socket"
        )) && ran.stderr.contains("sink.sock")
            && ran.stderr.contains("held by pid"),
        "the refusal names fd {fd}, its peer sink.sock and the process holding it: {ran}"
    );
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0, "no image");
    assert!(alive(app), "the refused instance runs on");
}

#[test]
fn a_python_multiprocessing_pipe_to_a_forked_process_survives_snapshot_and_restore() {
    let test = "a_python_multiprocessing_pipe_to_a_forked_process_survives_snapshot_and_restore";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("mp");
    let program = script("mppipe.py");
    let dir_s = dir.to_str().expect("utf-8 path");
    h.start("mp", "um", &dir, &[], &["python3", &program, dir_s]);
    h.wait_log("mp", "ready");
    let image = h.dir("images").join("mp.img");
    let ran = h.snapshot("mp", &image, &[]);
    assert!(
        ran.success(),
        "snapshot of a multiprocessing parent and child: {ran}"
    );
    h.restore("mp", &image, &[]);
    fs::write(dir.join("go"), "").unwrap();
    let out = dir.join("out");
    assert!(
        poll(std::time::Duration::from_secs(20), || out.exists()),
        "the parent reports nothing: {:?}",
        fs::read_to_string(h.log_path("mp"))
    );
    assert_eq!(
        fs::read_to_string(&out).unwrap(),
        "from-child-before child-got:from-parent-before",
        "what each side sent before the snapshot arrives once, and the pipe talks both ways"
    );
}

/// A parent's client of a listener its child made after the fork, accepted
/// (`accept`) or still waiting in the backlog: refused by name.
fn a_parent_client_of_its_child_listener_is_refused(test: &str, accept: bool, why: &str) {
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("reverse");
    let program = "import os, socket, sys, time\n\
        if os.fork() == 0:\n    l = socket.socket(socket.AF_UNIX)\n    l.bind('child.sock')\n    l.listen(4)\n    open('listening', 'w').close()\n    if sys.argv[1] == '1':\n        s, _ = l.accept()\n    while True:\n        time.sleep(0.05)\n\
        while not os.path.exists('listening'):\n    time.sleep(0.02)\n\
        c = socket.socket(socket.AF_UNIX)\n\
        c.connect('child.sock')\n\
        time.sleep(0.3)\n\
        print('connected fd', c.fileno(), flush=True)\n\
        while True:\n    time.sleep(0.05)\n";
    let mode = if accept { "1" } else { "0" };
    h.start(
        "reverse",
        "ur",
        &dir,
        &[],
        &["python3", "-c", program, mode],
    );
    h.wait_log("reverse", "connected fd");
    let app = pid_of(&h.instance("reverse").expect("reverse listed"));
    let images = h.dir("images");
    let ran = h.snapshot("reverse", &images.join("reverse.img"), &[]);
    assert!(!ran.success(), "refused: {ran}");
    println!("refused: {}", ran.stderr.trim());
    assert!(
        ran.stderr.contains("unix stream socket")
            && ran.stderr.contains("child.sock")
            && ran.stderr.contains(why)
            && ran.stderr.contains("held by pid"),
        "the refusal names the socket, the listener child.sock and where its peer is: {ran}"
    );
    assert_eq!(fs::read_dir(&images).unwrap().count(), 0, "no image");
    assert!(alive(app), "the refused instance runs on");
}

#[test]
fn a_parent_client_accepted_by_its_child_listener_refuses_the_snapshot() {
    a_parent_client_of_its_child_listener_is_refused(
        "a_parent_client_accepted_by_its_child_listener_refuses_the_snapshot",
        true,
        "does not hold the listener that accepted it",
    );
}

#[test]
fn a_parent_client_pending_on_its_child_listener_refuses_the_snapshot() {
    a_parent_client_of_its_child_listener_is_refused(
        "a_parent_client_pending_on_its_child_listener_refuses_the_snapshot",
        false,
        "waits in the backlog of listener",
    );
}
