//! `appshot generate systemd`: a unit that runs an existing instance (or
//! the negotiation agent) as a systemd service, in the foreground.

use std::net::SocketAddr;
use std::path::Path;

use appshot_vpm::{InstanceRecord, Registry};

/// `appshot stop`'s default grace time: systemd waits as long after
/// SIGTERM before SIGKILL.
const STOP_GRACE_SECS: u64 = 10;

/// Why no unit was written.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error("no running instance `{0}` (see `appshot ps`); generate its unit while it runs")]
    NoInstance(String),
    #[error("locating the appshot binary")]
    Exe(#[source] std::io::Error),
    #[error(transparent)]
    Vpm(#[from] appshot_vpm::VpmError),
}

/// The unit for instance `name`, from its registry record.
pub fn instance_unit(run_dir: &Path, name: &str) -> Result<String, UnitError> {
    let registry = Registry::open(run_dir)?;
    let state = registry.read()?;
    let record = state
        .instances
        .get(name)
        .ok_or_else(|| UnitError::NoInstance(name.to_string()))?;
    let exe = exe()?;
    Ok(render_instance(&exe, run_dir, record))
}

fn render_instance(exe: &str, run_dir: &Path, r: &InstanceRecord) -> String {
    let mut args = vec![
        exe.to_string(),
        "run".into(),
        "--name".into(),
        r.name.clone(),
        "--aid".into(),
        r.aid.clone(),
    ];
    if let Some(config) = &r.config {
        args.push("--config".into());
        args.push(config.display().to_string());
    }
    for port in &r.multiplexed {
        args.push("--port".into());
        args.push(port.to_string());
    }
    if let Some(range) = &r.port_range {
        args.push("--port-range".into());
        args.push(range.clone());
    }
    if let Some(user) = &r.user {
        args.push("--user".into());
        args.push(user.clone());
    }
    args.push("--".into());
    args.extend(r.command.iter().cloned());
    let exec: Vec<String> = args.iter().map(|a| quote(a)).collect();
    let mut unit = format!(
        "# appshot generate systemd {name}: instance {name} (AID {aid}) in the\n\
         # foreground under its own supervisor, as `appshot run` without --detach.\n\
         # Written by appshot {version}.\n\
         [Unit]\n\
         Description=appshot instance {name} (AID {aid})\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n",
        name = r.name,
        aid = r.aid,
        version = crate::VERSION,
    );
    if run_dir != Path::new(crate::DEFAULT_RUN_DIR) {
        unit.push_str(&format!(
            "Environment={}\n",
            quote(&format!("APPSHOT_RUN_DIR={}", run_dir.display()))
        ));
    }
    unit.push_str(&format!("ExecStart={}\n", exec.join(" ")));
    unit.push_str(&service_tail());
    unit
}

/// The unit for `appshot vpm agent`.
pub fn agent_unit(
    listen: SocketAddr,
    key_file: Option<&Path>,
    run_dir: &Path,
) -> Result<String, UnitError> {
    let mut args = vec![
        exe()?,
        "vpm".into(),
        "agent".into(),
        "--listen".into(),
        listen.to_string(),
    ];
    if let Some(key) = key_file {
        args.push("--key-file".into());
        args.push(key.display().to_string());
    }
    let exec: Vec<String> = args.iter().map(|a| quote(a)).collect();
    let mut unit = format!(
        "# appshot generate systemd --agent: the cross-host negotiation agent.\n\
         # Written by appshot {version}.\n\
         [Unit]\n\
         Description=appshot negotiation agent on {listen}\n\
         After=network-online.target\n\
         Wants=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n",
        version = crate::VERSION,
    );
    if run_dir != Path::new(crate::DEFAULT_RUN_DIR) {
        unit.push_str(&format!(
            "Environment={}\n",
            quote(&format!("APPSHOT_RUN_DIR={}", run_dir.display()))
        ));
    }
    unit.push_str(&format!("ExecStart={}\n", exec.join(" ")));
    unit.push_str(&service_tail());
    Ok(unit)
}

/// What both units share: exit statuses, restarts, stopping.
fn service_tail() -> String {
    format!(
        "# The status after SIGTERM (128+15) is a clean stop.\n\
         SuccessExitStatus=143\n\
         # 125: appshot's own error (config, name in use); 126/127: the command\n\
         # cannot be executed or found. Restarting does not help.\n\
         RestartPreventExitStatus=125 126 127\n\
         Restart=on-failure\n\
         RestartSec=2\n\
         # As `appshot stop`: SIGTERM to the supervisor, which forwards it to the\n\
         # application; SIGKILL to everything after {STOP_GRACE_SECS}s.\n\
         KillMode=mixed\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec={STOP_GRACE_SECS}\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

fn exe() -> Result<String, UnitError> {
    let exe = std::env::current_exe().map_err(UnitError::Exe)?;
    Ok(exe.display().to_string())
}

/// One word of an `ExecStart=` line: as is when plain, else double-quoted
/// with C escapes; `%` and `$` doubled so systemd expands neither.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:=,+@-".contains(c));
    // A lone `;` would end the command.
    if word == ";" {
        return "\\;".into();
    }
    let escaped = word.replace('%', "%%").replace('$', "$$");
    if plain {
        return escaped;
    }
    let mut out = String::from("\"");
    for c in escaped.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> InstanceRecord {
        InstanceRecord {
            name: "web".into(),
            aid: "shop".into(),
            supervisor_pid: 1,
            pid: 2,
            command: vec!["sh".into(), "-c".into(), "echo \"$HOME\" 100%".into()],
            started_unix: 0,
            multiplexed: vec![9000, 9001],
            config: Some("/etc/appshot/web.toml".into()),
            user: Some("33:33".into()),
            port_range: Some("20000-29999".into()),
        }
    }

    #[test]
    fn the_unit_runs_the_recorded_instance_in_the_foreground() {
        let unit = render_instance(
            "/usr/local/bin/appshot",
            Path::new("/run/appshot"),
            &record(),
        );
        let exec = unit
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        assert_eq!(
            exec,
            "ExecStart=/usr/local/bin/appshot run --name web --aid shop --config /etc/appshot/web.toml \
             --port 9000 --port 9001 --port-range 20000-29999 --user 33:33 -- sh -c \"echo \\\"$$HOME\\\" 100%%\""
        );
        assert!(!exec.contains("--detach"));
        assert!(!unit.contains("APPSHOT_RUN_DIR"));
        for line in [
            "Type=simple",
            "SuccessExitStatus=143",
            "RestartPreventExitStatus=125 126 127",
            "Restart=on-failure",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=10",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing:\n{unit}");
        }
    }

    #[test]
    fn another_run_dir_is_passed_in_the_environment() {
        let unit = render_instance("/bin/appshot", Path::new("/tmp/run dir"), &record());
        assert!(
            unit.contains("Environment=\"APPSHOT_RUN_DIR=/tmp/run dir\"\n"),
            "{unit}"
        );
    }

    #[test]
    fn plain_words_stay_and_others_are_quoted() {
        assert_eq!(quote("--port"), "--port");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote(";"), "\\;");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("a\\b"), "\"a\\\\b\"");
    }
}
