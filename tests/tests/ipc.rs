//! System V IPC of an instance: its own IPC namespace, and shared memory,
//! semaphores and message queues saved and made again with their ids.

mod common;

use common::{Harness, Ran};

const PORT: &str = "19650";

/// One sysvkeeper command under AID k, its answer without the newline.
fn ask(h: &Harness, command: &str) -> String {
    let query = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {PORT}), timeout=10)\n\
         s.sendall(b'{command}')\ns.shutdown(socket.SHUT_WR)\nprint(s.makefile().read(), end='')\n"
    );
    let ran: Ran = h.client("k", &["python3", "-c", &query]);
    assert!(ran.success(), "sysvkeeper {command}: {ran}");
    ran.stdout.trim_end().to_string()
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
