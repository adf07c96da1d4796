//! Instance life and death: a killed supervisor, and real ports running out.

mod common;

use std::fs;

use common::{alive, pid_of, poll, port_pairs, script, Harness, READY};

#[test]
fn killing_the_supervisor_takes_the_instance_with_it() {
    let Some(mut h) = Harness::new(
        "killing_the_supervisor_takes_the_instance_with_it",
        &["python3", "curl"],
    ) else {
        return;
    };
    let dir = h.dir("www");
    fs::write(dir.join("survivor.txt"), "e").unwrap();
    let command = ["python3", "-m", "http.server", "9400"];
    h.start("web-e", "e", &dir, &[], &command);
    h.wait_log("web-e", "port 9400");
    let row = h.instance("web-e").expect("web-e listed");
    let app = pid_of(&row);
    let supervisor = row["supervisor_pid"].as_u64().unwrap() as u32;
    assert!(alive(app) && alive(supervisor), "{row}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        poll(READY, || !alive(app)),
        "application {app} outlived its SIGKILLed supervisor {supervisor}"
    );
    assert!(
        poll(READY, || h.instance("web-e").is_none()),
        "ps still lists web-e after its supervisor died: {:#?}",
        h.ps()
    );

    // Name and port of the dead instance are free again.
    h.start("web-e", "e", &dir, &[], &command);
    h.wait_log("web-e", "port 9400");
    let got = h.curl("e", "http://127.0.0.1:9400/");
    assert!(got.success(), "{got}");
    assert!(got.stdout.contains("survivor.txt"), "{got}");
    let row = h.instance("web-e").expect("new web-e listed");
    assert_ne!(pid_of(&row), app, "{row}");
}

#[test]
fn exhausted_port_range_fails_bind_after_the_timeout_until_a_port_frees() {
    let Some(mut h) = Harness::new(
        "exhausted_port_range_fails_bind_after_the_timeout_until_a_port_frees",
        &["python3"],
    ) else {
        return;
    };
    let sockets = script("sockets.py");
    // The virtual port must be free on the host for instance p to get it
    // itself; the one range port lies outside every other test's ports.
    let (virt, spare, flags) = common::one_spare_port(9200..=9299, 30100..=30199, 300);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let dir = h.dir("cwd");
    let serve = |name: &'static str| ["python3", &sockets, "serve", name, &virt, "0.0.0.0"];
    let real_of = |h: &Harness, name: &str| {
        let row = h.instance(name).unwrap_or_else(|| panic!("{name} listed"));
        let pairs = port_pairs(&row);
        assert_eq!(pairs.len(), 1, "{row}");
        assert_eq!(pairs[0].virtual_port.to_string(), virt, "{row}");
        pairs[0].real
    };
    let listening = format!("LISTEN 0.0.0.0 {virt}");

    h.start("port-p", "p", &dir, &flags, &serve("port-p"));
    h.wait_log("port-p", &listening);
    assert_eq!(real_of(&h, "port-p").to_string(), virt);

    h.start("port-q", "q", &dir, &flags, &serve("port-q"));
    h.wait_log("port-q", &listening);
    assert_eq!(real_of(&h, "port-q"), spare);

    h.start("port-r", "r", &dir, &flags, &serve("port-r"));
    let log = h.wait_log("port-r", "BIND-FAILED");
    let failure = log.lines().find(|l| l.starts_with("BIND-FAILED")).unwrap();
    let waited: u64 = failure
        .strip_prefix("BIND-FAILED EADDRINUSE after ")
        .and_then(|rest| rest.strip_suffix(" ms"))
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("bind should fail with EADDRINUSE: {failure:?}"));
    assert!(
        (250..5000).contains(&waited),
        "bind should wait ~300 ms for a port, waited {waited} ms"
    );
    assert!(
        log.contains("no real port free") && log.contains("EADDRINUSE"),
        "the supervisor should log why the bind failed:\n{log}"
    );
    // The application exits on the failure, and its instance with it.
    assert!(
        poll(READY, || h.instance("port-r").is_none()),
        "{:#?}",
        h.ps()
    );

    h.stop("port-q");
    h.start("port-r2", "r", &dir, &flags, &serve("port-r2"));
    h.wait_log("port-r2", &listening);
    assert_eq!(real_of(&h, "port-r2"), spare);
    let client = h.client("r", &["python3", &sockets, "connect", &virt, "127.0.0.1"]);
    assert!(client.success(), "{client}");
    assert!(
        client
            .stdout
            .contains(&format!("REPLY port-r2 ACCEPTED 127.0.0.1 {virt}")),
        "{client}"
    );
}
