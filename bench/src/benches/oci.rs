//! Containers under the OCI runtime's seccomp agent: connection setup rate
//! inside a runc container handed to `appshot oci-agent` by the profile of
//! `appshot oci-profile`, against the same container with no profile, in
//! the same run. The container (rootfs of read-only bind mounts of the
//! host's /usr and /etc, the host's network) runs the connrate server in
//! the background and the client in the foreground on one port: under the
//! agent the server's bind and every connect of the client are notified
//! and performed by the agent's multiplexer.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{Ctx, Outcome};
use crate::measure::{interleaved, Trial, Unit};
use crate::probes::{self, CONNRATE};
use crate::procs;

pub const TITLE: &str = "container connection setup (runc, oci-agent)";
const TIMEOUT: Duration = Duration::from_secs(120);
const AID: &str = "bench";

/// The agent, killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let probe = CONNRATE.build(ctx.work)?;
    let dir = ctx.work.join("oci");
    fs::create_dir_all(&dir)?;
    let socket = dir.join("agent.sock");
    let _ = fs::remove_file(&socket);
    let log = File::create(ctx.logs().join("oci-agent.log"))?;
    let _agent = Agent(
        ctx.appshot
            .command()
            .args(["oci-agent", "--listen"])
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting appshot oci-agent")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline {
            bail!("appshot oci-agent never created {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut profile = ctx.appshot.command();
    profile
        .args(["oci-profile", "--listener-path"])
        .arg(&socket)
        .args(["--aid", AID]);
    let profile: Value = serde_json::from_str(&procs::run(&mut profile, "oci-profile", TIMEOUT)?)
        .context("appshot oci-profile printed no JSON")?;

    let port = ctx.ports.take()?.to_string();
    let probe = probe.display().to_string();
    let script = format!(
        "{probe} server 127.0.0.1 {port} & sleep 0.3; exec {probe} client 127.0.0.1 {port} {}",
        ctx.plan.connections
    );
    let probe_dir = Path::new(&probe).parent().context("probe path")?;
    let plain = bundle(&dir.join("plain"), &script, probe_dir, None)?;
    let agent = bundle(&dir.join("agent"), &script, probe_dir, Some(&profile))?;
    let root = dir.join("runc");
    let runs = std::cell::Cell::new(0u32);
    let container = |bundle: &Path| -> anyhow::Result<f64> {
        runs.set(runs.get() + 1);
        let id = format!("bench-oci-{}", runs.get());
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&root)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id);
        let out = procs::run(&mut cmd, "runc run", TIMEOUT);
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["delete", "-f", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        probes::parse_value(&out?, "conns_per_s")
    };
    let trials = vec![
        Trial::new("native", || container(&plain)),
        Trial::new("appshot", || container(&agent)),
    ];
    let m = interleaved(TITLE, Unit::ConnsPerSec, ctx.plan, trials)?;
    let mut out = Outcome::default();
    out.add_against_native(
        "container connection setup",
        "runc container, connect + accept + close: under oci-agent / no profile",
        m,
    );
    Ok(out)
}

/// A bundle at `dir` running `script` with the probe's directory mounted
/// where it is on the host, and `seccomp` as its profile, if any.
fn bundle(
    dir: &Path,
    script: &str,
    probe_dir: &Path,
    seccomp: Option<&Value>,
) -> anyhow::Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    for d in ["usr", "etc", "proc", "dev", "sys", "tmp"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::create_dir_all(rootfs.join(probe_dir.strip_prefix("/")?))?;
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        let at = rootfs.join(link);
        if !at.exists() {
            std::os::unix::fs::symlink(target, at)?;
        }
    }
    let mut spec = Command::new("runc");
    spec.args(["spec", "--bundle"]).arg(dir);
    let _ = fs::remove_file(dir.join("config.json"));
    procs::run(&mut spec, "runc spec", TIMEOUT)?;
    let path = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&fs::read_to_string(&path)?)?;
    c["process"]["terminal"] = json!(false);
    c["process"]["args"] = json!(["sh", "-c", script]);
    c["root"] = json!({"path": "rootfs", "readonly": true});
    let mounts = c["mounts"].as_array_mut().context("runc spec has mounts")?;
    for (dest, src) in [
        (Path::new("/usr"), Path::new("/usr")),
        (Path::new("/etc"), Path::new("/etc")),
        (probe_dir, probe_dir),
    ] {
        mounts.push(
            json!({"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]}),
        );
    }
    let ns = c["linux"]["namespaces"]
        .as_array_mut()
        .context("runc spec has namespaces")?;
    ns.retain(|n| n["type"] != "network");
    if let Some(profile) = seccomp {
        c["linux"]["seccomp"] = profile.clone();
        c["annotations"] = json!({"appshot.aid": AID});
    }
    fs::write(&path, serde_json::to_string_pretty(&c)?)?;
    Ok(dir.to_path_buf())
}
