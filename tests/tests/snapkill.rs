//! Control sockets refuse supervised applications, which are root like
//! any operator: an application cannot stop another instance.

mod common;

use std::time::Duration;

use common::{alive, pid_of, Harness};

/// A supervised client (root, like its supervisor) that sends a stop
/// request to another instance's control socket and prints the answer.
const EVIL: &str = "import socket, sys\n\
s = socket.socket(socket.AF_UNIX)\n\
s.settimeout(10)\n\
s.connect(sys.argv[1])\n\
s.sendall(b'{\"op\":\"stop\",\"grace_secs\":0}\\n')\n\
print('answer:', s.recv(4096).decode())\n";

#[test]
fn a_supervised_client_cannot_stop_another_instance() {
    let test = "a_supervised_client_cannot_stop_another_instance";
    let Some(mut h) = Harness::new(test, &["python3"]) else {
        return;
    };
    let dir = h.dir("good");
    h.start(
        "good",
        "good",
        &dir,
        &[],
        &[
            "python3",
            "-c",
            "import time; print('up', flush=True); time.sleep(600)",
        ],
    );
    h.wait_log("good", "up");
    let app = pid_of(&h.instance("good").expect("good listed"));
    let socket = h.control_socket("good");
    let ran = h.client("evil", &["python3", "-c", EVIL, socket.to_str().unwrap()]);
    assert!(
        !ran.stdout.contains("\"ok\":true"),
        "the supervised client's stop was accepted: {ran}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive(app) && h.instance("good").is_some(),
        "good was stopped by another instance's application: {ran}"
    );
    let log = h.wait_log("good", "peer refused");
    assert!(log.contains("pid"), "the refusal names the pid: {log}");
    // An operator's request still works.
    h.stop("good");
    assert!(!alive(app), "good stops on request from the CLI");
}
