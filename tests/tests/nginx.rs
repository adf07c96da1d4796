//! nginx, master and workers, with an unmodified `listen 9000;`.

mod common;

use std::fs;
use std::path::Path;

use common::{alive, children, cmdline, pid_of, poll, Harness, READY};

/// Everything nginx writes goes below `dir`, so instances share nothing.
fn write_config(dir: &Path, greeting: &str) -> String {
    fs::create_dir_all(dir.join("www")).unwrap();
    fs::write(dir.join("www/index.html"), greeting).unwrap();
    let d = dir.display();
    let config = format!(
        "worker_processes 2;
# Workers otherwise run as nobody, who cannot enter the 0700 temp dir.
user root;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 9000;
        root {d}/www;
        index index.html;
    }}
}}
"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, config).unwrap();
    path.to_string_lossy().into_owned()
}

fn workers(master: u32) -> Vec<u32> {
    children(master)
        .into_iter()
        .filter(|&p| cmdline(p).contains("worker process"))
        .collect()
}

#[test]
fn nginx_instances_serve_their_own_aid_and_stop_completely() {
    let Some(mut h) = Harness::new(
        "nginx_instances_serve_their_own_aid_and_stop_completely",
        &["nginx", "curl"],
    ) else {
        return;
    };
    let nginx = common::which("nginx").unwrap();
    let nginx = nginx.to_str().unwrap();
    let mut masters = Vec::new();
    for aid in ["na", "nb"] {
        let dir = h.dir(aid);
        let config = write_config(&dir, &format!("hello from nginx of {aid}\n"));
        let name = format!("nginx-{aid}");
        let error_log = format!("{}/error.log", dir.display());
        let prefix = format!("{}/", dir.display());
        h.start(
            &name,
            aid,
            &dir,
            &[],
            &[
                nginx,
                "-p",
                &prefix,
                "-e",
                &error_log,
                "-c",
                &config,
                "-g",
                "daemon off;",
            ],
        );
        let master = pid_of(&h.instance(&name).expect("listed"));
        assert!(
            cmdline(master).contains("nginx: master process"),
            "ps pid {master} should be the nginx master: {:?}",
            cmdline(master)
        );
        assert!(
            poll(READY, || workers(master).len() == 2),
            "nginx {aid} should run 2 workers, has {:?}; error.log:\n{}",
            workers(master),
            fs::read_to_string(&error_log).unwrap_or_default()
        );
        masters.push((name, master, workers(master)));
    }

    for aid in ["na", "nb"] {
        let got = h.curl(aid, "http://127.0.0.1:9000/");
        assert!(got.success(), "{got}");
        assert_eq!(got.stdout, format!("hello from nginx of {aid}\n"));
    }

    let (name, master, workers) = masters.remove(0);
    h.stop(&name);
    let mut all = workers.clone();
    all.push(master);
    assert!(
        poll(READY, || all.iter().all(|&p| !alive(p))),
        "after stop, nginx master {master} and workers {workers:?} must be gone; alive: {:?}",
        all.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
    );
    let gone = h.curl("na", "http://127.0.0.1:9000/");
    assert_eq!(gone.code, Some(7), "na has no instance any more: {gone}");
    let other = h.curl("nb", "http://127.0.0.1:9000/");
    assert_eq!(other.stdout, "hello from nginx of nb\n", "{other}");
}
