//! appshot as the seccomp agent of Debian's runc: three containers made
//! here from bind mounts of the host's /usr and /etc (no image), each
//! serving `python3 -m http.server 9000` on the host's network under AIDs
//! a, b and c, handed to `appshot oci-agent` through the profile of
//! `appshot oci-profile`.

mod common;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{poll, Harness, READY};
use serde_json::{json, Value};

/// Kills the agent and removes the containers, whatever the test did.
struct Cleanup {
    agent: Child,
    runc_root: PathBuf,
    ids: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = runc(&self.runc_root).args(["delete", "-f", id]).status();
        }
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

fn runc(root: &Path) -> Command {
    let mut cmd = Command::new("runc");
    cmd.arg("--root").arg(root).stdin(Stdio::null());
    cmd
}

/// A bundle for container `id`: `runc spec`'s config with a read-only
/// rootfs of bind mounts, the host's network, `/srv` holding a file that
/// names the AID, and the profile.
fn bundle(dir: &Path, id: &str, aid: &str, profile: &Value) -> PathBuf {
    let bundle = dir.join(id);
    let rootfs = bundle.join("rootfs");
    for d in ["usr", "etc", "proc", "dev", "sys", "tmp", "srv"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        std::os::unix::fs::symlink(target, rootfs.join(link)).unwrap();
    }
    let srv = bundle.join("srv");
    fs::create_dir_all(&srv).unwrap();
    fs::write(srv.join("who"), aid).unwrap();
    let spec = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(spec.success(), "runc spec");
    let path = bundle.join("config.json");
    let mut c: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    c["process"]["terminal"] = json!(false);
    c["process"]["args"] = json!(["python3", "-m", "http.server", "9000"]);
    c["process"]["cwd"] = json!("/srv");
    c["root"] = json!({"path": "rootfs", "readonly": true});
    let mounts = c["mounts"].as_array_mut().unwrap();
    for (dest, src) in [
        ("/usr", "/usr".into()),
        ("/etc", "/etc".into()),
        ("/srv", srv),
    ] {
        mounts.push(
            json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]}),
        );
    }
    let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| n["type"] != "network");
    c["linux"]["seccomp"] = profile.clone();
    c["annotations"] = json!({"appshot.aid": aid});
    fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    bundle
}

#[test]
fn runc_containers_on_port_9000_each_serve_their_own_aid() {
    let test = "runc_containers_on_port_9000_each_serve_their_own_aid";
    let Some(h) = Harness::new(test, &["runc", "python3", "curl"]) else {
        return;
    };
    let work = h.dir("oci");
    let socket = work.join("agent.sock");
    let agent_log = work.join("agent.log");
    let agent = h
        .appshot()
        .args(["oci-agent", "--listen"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let mut cleanup = Cleanup {
        agent,
        runc_root: work.join("runc"),
        ids: Vec::new(),
    };
    assert!(
        poll(READY, || socket.exists()),
        "agent socket never appeared"
    );

    let profile = common::run(
        h.appshot()
            .args(["oci-profile", "--listener-path"])
            .arg(&socket),
        Duration::from_secs(30),
    );
    assert!(profile.success(), "oci-profile: {profile}");
    let profile: Value = serde_json::from_str(&profile.stdout).unwrap();

    let aids = ["a", "b", "c"];
    for aid in aids {
        let id = format!("web-{aid}");
        let b = bundle(&work, &id, aid, &profile);
        let out = work.join(format!("{id}.out"));
        let status = runc(&cleanup.runc_root)
            .args(["run", "--detach", "--bundle"])
            .arg(&b)
            .arg(&id)
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&out).unwrap())
            .status()
            .unwrap();
        cleanup.ids.push(id.clone());
        assert!(
            status.success(),
            "runc run {id}: {status}: {}\nagent: {}",
            fs::read_to_string(&out).unwrap_or_default(),
            fs::read_to_string(&agent_log).unwrap_or_default()
        );
    }
    for aid in aids {
        let id = format!("web-{aid}");
        assert!(
            poll(READY, || !h.translations(&id).is_empty()),
            "{id} never bound port 9000; agent log:\n{}",
            fs::read_to_string(&agent_log).unwrap_or_default()
        );
    }

    // ps and ports list the three containers like instances.
    let ports = h.ports();
    for aid in aids {
        let row = ports
            .iter()
            .find(|r| r["instance"] == format!("web-{aid}"))
            .unwrap_or_else(|| panic!("no translation of web-{aid}: {ports:?}"));
        assert_eq!(row["aid"], aid);
        assert_eq!(row["virtual_port"], 9000);
    }
    let ps = h.ps();
    for aid in aids {
        let row = ps.iter().find(|r| r["name"] == format!("web-{aid}"));
        let row = row.unwrap_or_else(|| panic!("web-{aid} not in ps: {ps:?}"));
        assert_eq!(row["state"], "running", "{row}");
    }

    // Each AID reaches its own container; an AID with none is refused.
    for aid in aids {
        let got = h.curl(aid, "http://127.0.0.1:9000/who");
        assert!(got.success(), "curl under {aid}: {got}");
        assert_eq!(
            got.stdout, aid,
            "curl under {aid} reached another container"
        );
    }
    let z = h.curl("z", "http://127.0.0.1:9000/who");
    assert_eq!(z.code, Some(7), "AID z must be refused: {z}");

    // runc exec hands over the new process's listener too: it is served
    // by its container's multiplexer.
    let exec = runc(&cleanup.runc_root)
        .args(["exec", "web-c", "python3", "-c"])
        .arg("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1] > 0)")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&exec.stdout).trim(),
        "True",
        "runc exec web-c: {}",
        String::from_utf8_lossy(&exec.stderr)
    );

    // A container exits: its translations and its instance go.
    let status = runc(&cleanup.runc_root)
        .args(["kill", "web-b", "KILL"])
        .status()
        .unwrap();
    assert!(status.success(), "runc kill web-b");
    assert!(
        poll(READY, || h.translations("web-b").is_empty()
            && h.instance("web-b").is_none()),
        "web-b's translations outlived it: {:?}",
        h.ports()
    );
    let b = h.curl("b", "http://127.0.0.1:9000/who");
    assert_eq!(b.code, Some(7), "b has no container left: {b}");
    let a = h.curl("a", "http://127.0.0.1:9000/who");
    assert_eq!(a.stdout, "a", "a still served: {a}");

    // The agent killed with SIGKILL: what the README says happens. Its
    // containers' translations are reclaimed with its locks, and a new
    // process of such a container cannot reach the agent.
    let _ = cleanup.agent.kill();
    let _ = cleanup.agent.wait();
    assert!(
        poll(READY, || h.translations("web-a").is_empty()
            && h.translations("web-c").is_empty()),
        "a dead agent's translations stay: {:?}",
        h.ports()
    );
    let exec = runc(&cleanup.runc_root)
        .args(["exec", "web-a", "true"])
        .output()
        .unwrap();
    assert!(
        !exec.status.success() && String::from_utf8_lossy(&exec.stderr).contains("seccomp agent"),
        "runc exec with no agent: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    // The documented policy: restart the containers with the agent. A
    // restarted agent serves the container started again.
    fs::remove_file(&socket).unwrap();
    cleanup.agent = h
        .appshot()
        .args(["oci-agent", "--listen"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(work.join("agent2.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        poll(READY, || socket.exists()),
        "restarted agent socket never appeared"
    );
    let deleted = runc(&cleanup.runc_root)
        .args(["delete", "-f", "web-a"])
        .status()
        .unwrap();
    assert!(deleted.success(), "runc delete web-a");
    let b = work.join("web-a");
    let status = runc(&cleanup.runc_root)
        .args(["run", "--detach", "--bundle"])
        .arg(&b)
        .arg("web-a")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "runc run web-a again");
    assert!(
        poll(READY, || !h.translations("web-a").is_empty()),
        "web-a never bound under the restarted agent: {:?}",
        h.ports()
    );
    let a = h.curl("a", "http://127.0.0.1:9000/who");
    assert_eq!(a.stdout, "a", "a served again: {a}");
}
