//! System V IPC of an instance: its own IPC namespace, and shared memory,
//! semaphores and message queues saved and made again with their ids.

mod common;

use common::{Harness, Ran};

const PORT: &str = "19650";

/// One command to the program listening on `port` of the instance of
/// `aid`, by a client under that AID; its answer without the newline.
fn ask_on(h: &Harness, aid: &str, port: &str, command: &str) -> String {
    let query = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n\
         s.sendall(b'{command}')\ns.shutdown(socket.SHUT_WR)\nprint(s.makefile().read(), end='')\n"
    );
    let ran: Ran = h.client(aid, &["python3", "-c", &query]);
    assert!(ran.success(), "{command} to port {port}: {ran}");
    ran.stdout.trim_end().to_string()
}

fn ask(h: &Harness, command: &str) -> String {
    ask_on(h, "k", PORT, command)
}

/// Whether the host's IPC namespace holds an object with `key` (hex).
fn host_has_key(key: i32) -> bool {
    ["shm", "sem", "msg"].iter().any(|t| {
        std::fs::read_to_string(format!("/proc/sysvipc/{t}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().next() == Some(&key.to_string()))
    })
}

#[test]
fn system_v_objects_come_back_with_their_ids_contents_and_queues() {
    let test = "system_v_objects_come_back_with_their_ids_contents_and_queues";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("sysvkeeper.c", "sysvkeeper");
    let dir = h.dir("k");
    h.start("k", "k", &dir, &[], &[bin.to_str().unwrap(), PORT]);
    h.wait_log("k", "sysvkeeper listening");
    // The objects are the instance's alone.
    assert!(
        !host_has_key(0x5eed),
        "the segment is in the host's namespace"
    );

    let before = ask(&h, "state");
    assert!(
        before.contains("shm=segment-pattern! tail=the-tail sem=1,2,3"),
        "{before}"
    );

    let image = h.dir("img").join("k.img");
    let ran = h.snapshot("k", &image, &[]);
    assert!(ran.success(), "{ran}");
    h.restore("k", &image, &[]);

    // Same ids, same attachment address, same bytes and semaphore values.
    assert_eq!(ask(&h, "state"), before);
    // The attachment is the segment itself, not a copy of its bytes.
    assert_eq!(ask(&h, "share"), "shared=via-second-attach");
    // Queued messages come back once, in order.
    assert_eq!(ask(&h, "consume"), "msgs=1:first,2:second");
    assert_eq!(ask(&h, "consume"), "msgs=");
    assert!(!host_has_key(0x5eed));
}

const MEMFD_PORT: &str = "19651";

fn ask_memfd(h: &Harness, command: &str) -> String {
    ask_on(h, "mf", MEMFD_PORT, command)
}

/// Writes `text` into the memfd by the parent's fd, then waits until the
/// child's copy of its mapping shows it in the POSIX shm object: the three
/// are one memory in both processes.
fn write_and_see_it_echoed(h: &Harness, text: &str) {
    assert_eq!(ask_memfd(h, &format!("write {text}")), "written");
    let padded = format!("{text:.<16}");
    let echoed = common::poll(std::time::Duration::from_secs(5), || {
        ask_memfd(h, "state").contains(&format!("echo={padded}"))
    });
    assert!(
        echoed,
        "the child never saw {text}: {}",
        ask_memfd(h, "state")
    );
}

#[test]
fn a_memfd_and_posix_shm_shared_by_parent_and_child_come_back_shared() {
    let test = "a_memfd_and_posix_shm_shared_by_parent_and_child_come_back_shared";
    let Some(mut h) = Harness::new(test, &["gcc", "python3"]) else {
        return;
    };
    let bin = h.compile("memfdkeeper.c", "memfdkeeper");
    let dir = h.dir("mf");
    let shm_name = format!("/appshot-test-{}", std::process::id());
    h.start(
        "mf",
        "mf",
        &dir,
        &[],
        &[bin.to_str().unwrap(), MEMFD_PORT, &shm_name],
    );
    h.wait_log("mf", "memfdkeeper listening");
    write_and_see_it_echoed(&h, "before");
    let before = ask_memfd(&h, "state");
    // F_SEAL_SHRINK is 2.
    assert!(
        before.contains("tail=tail shm=posix-shm-bytes! echo=before.......... seals=2 size=8192"),
        "{before}"
    );

    let image = h.dir("img").join("mf.img");
    let ran = h.snapshot("mf", &image, &[]);
    assert!(ran.success(), "{ran}");
    let inspect = h.appshot().args(["inspect"]).arg(&image).output().unwrap();
    assert!(
        String::from_utf8_lossy(&inspect.stdout).contains("memfd keeper-memfd"),
        "inspect names the memfd"
    );
    h.restore("mf", &image, &[]);

    assert_eq!(
        ask_memfd(&h, "state"),
        before,
        "the same bytes, seals and child"
    );
    write_and_see_it_echoed(&h, "after-restore");
    let _ = std::fs::remove_file(format!("/dev/shm{shm_name}"));
}

const FIFO_PORT: u16 = 19652;

/// A child that opened a FIFO for writing and wrote into it, a parent that
/// opened it for reading (a blocking open, which needs the writer) and has
/// not read yet; each connection: `read` answers what is queued or `empty`.
const FIFO_PROGRAM: &str = r#"
import os, select, socket, sys, time
port, fifo = int(sys.argv[1]), sys.argv[2]
os.mkfifo(fifo)
if os.fork() == 0:
    w = os.open(fifo, os.O_WRONLY)
    os.write(w, b"from-the-child;")
    while True:
        time.sleep(1)
r = os.open(fifo, os.O_RDONLY)
while not select.select([r], [], [], 5)[0]:
    pass
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
print("fifo program ready", flush=True)
while True:
    c, _ = srv.accept()
    c.recv(16)
    ready = select.select([r], [], [], 0.2)[0]
    c.sendall(os.read(r, 100) if ready else b"empty")
    c.close()
"#;

fn ask_fifo(h: &Harness) -> String {
    ask_on(h, "fi", &FIFO_PORT.to_string(), "read")
}

#[test]
fn a_fifo_between_parent_and_child_keeps_its_unread_bytes() {
    let test = "a_fifo_between_parent_and_child_keeps_its_unread_bytes";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("fi");
    let program = dir.join("fifo.py");
    std::fs::write(&program, FIFO_PROGRAM).unwrap();
    let fifo = dir.join("the.fifo");
    h.start(
        "fi",
        "fi",
        &dir,
        &[],
        &[
            "python3",
            program.to_str().unwrap(),
            &FIFO_PORT.to_string(),
            fifo.to_str().unwrap(),
        ],
    );
    h.wait_log("fi", "fifo program ready");

    let image = h.dir("img").join("fi.img");
    let ran = h.snapshot("fi", &image, &[]);
    assert!(ran.success(), "{ran}");
    // Restoring opens the parent's read end, which would block without a
    // writer: it must not.
    h.restore("fi", &image, &[]);
    assert_eq!(ask_fifo(&h), "from-the-child;", "the unread bytes, once");
    assert_eq!(ask_fifo(&h), "empty");
}
