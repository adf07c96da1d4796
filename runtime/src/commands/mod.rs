//! `appshot ps`, `appshot ports` and `appshot stop`: views of the host-wide
//! registry and requests to an instance's control socket.

pub mod apps;
pub mod systemd;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use appshot_vpm::{is_alive, InstanceRecord, Registry, RegistryState, Translation};
use serde::Serialize;

use crate::error::RuntimeError;
use crate::supervisor::control::{self, Request};
use crate::supervisor::logs;
use crate::supervisor::status::{self, Published, State};

#[derive(Serialize)]
struct PsRow {
    name: String,
    aid: String,
    /// None once the instance has ended.
    pid: Option<u32>,
    supervisor_pid: Option<u32>,
    /// `running`, `frozen` (held by a snapshot), `restoring`, `restarting`,
    /// `stopping`, `unresponsive` or `exited`.
    state: String,
    command: Vec<String>,
    ports: Vec<PortView>,
    created_unix: u64,
    exited_unix: Option<u64>,
    /// As a shell reports it (128+N when killed by signal N).
    exit_code: Option<i32>,
    signal: Option<String>,
    /// How often `run --restart` started it again (unknown for an
    /// instance whose supervisor publishes no state).
    restarts: Option<u32>,
}

/// A translation as `ps --json` (each row's `ports`) and `ports --json`
/// show it: the one vocabulary of both.
#[derive(Serialize)]
struct PortView {
    protocol: String,
    /// The address the application bound (may be unspecified).
    address: String,
    virtual_port: u16,
    real_port: u16,
    aid: String,
    instance: String,
}

impl From<&Translation> for PortView {
    fn from(t: &Translation) -> Self {
        PortView {
            protocol: t.protocol.to_string(),
            address: t.addr.to_string(),
            virtual_port: t.virtual_port,
            real_port: t.real_port,
            aid: t.aid.clone(),
            instance: t.owner.clone(),
        }
    }
}

fn state(run_dir: &Path) -> Result<RegistryState, RuntimeError> {
    // A read, not a transaction, unless it meets instances whose
    // supervisor died: then they are reclaimed before anyone sees them.
    let registry = Registry::open(run_dir)?;
    Ok(registry.read_reclaiming()?)
}

/// The names of the running instances.
pub fn running(run_dir: &Path) -> Result<Vec<String>, RuntimeError> {
    Ok(state(run_dir)?.instances.into_keys().collect())
}

/// How many supervisors `ps` asks at once, of those that publish no state
/// (started by an older appshot): each answer waits for its supervisor to
/// be scheduled.
const PS_REQUESTS_AT_ONCE: usize = 32;

/// What `ps` knows of a listed instance: what its supervisor published, or
/// for one that publishes nothing, what it answers.
enum Seen {
    Published(Published),
    Answered(String),
}

/// Each instance's state, in the order given: read from the files their
/// supervisors publish, without waking them; only supervisors that publish
/// none are asked, over their control sockets.
fn states(run_dir: &Path, records: &[&InstanceRecord]) -> Vec<Seen> {
    let dir = |name: &str| run_dir.join("instances").join(name);
    let mut seen: Vec<Option<Seen>> = records
        .iter()
        .map(|r| status::read(&dir(&r.name), r.supervisor_pid).map(Seen::Published))
        .collect();
    let unpublished: Vec<(usize, &str)> = seen
        .iter()
        .zip(records)
        .enumerate()
        .filter(|(_, (s, _))| s.is_none())
        .map(|(i, (_, r))| (i, r.name.as_str()))
        .collect();
    let ask = |name: &str| -> String {
        control::request(&dir(name), &Request::Status)
            .map(|r| r.state)
            .unwrap_or_else(|_| "unresponsive".into())
    };
    let chunk = unpublished.len().div_ceil(PS_REQUESTS_AT_ONCE).max(1);
    let answers: Vec<(usize, String)> = std::thread::scope(|scope| {
        let askers: Vec<_> = unpublished
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(i, name)| (i, ask(name)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        askers
            .into_iter()
            .flat_map(|asker| asker.join().expect("ps status thread"))
            .collect()
    });
    for (i, answer) in answers {
        seen[i] = Some(Seen::Answered(answer));
    }
    seen.into_iter()
        .map(|s| s.unwrap_or_else(|| Seen::Answered("unresponsive".into())))
        .collect()
}

/// A listed instance's row. One whose application exited and is not
/// restarted (its supervisor is ending) reads as ended instances do, with
/// its exit status, its pids still shown.
fn live_row(record: &InstanceRecord, seen: Seen, ports: Vec<PortView>) -> PsRow {
    let mut row = PsRow {
        name: record.name.clone(),
        aid: record.aid.clone(),
        pid: Some(record.pid),
        supervisor_pid: Some(record.supervisor_pid),
        state: String::new(),
        command: record.command.clone(),
        ports,
        created_unix: record.started_unix,
        exited_unix: None,
        exit_code: None,
        signal: None,
        restarts: None,
    };
    match seen {
        Seen::Answered(state) => row.state = state,
        Seen::Published(p) => {
            row.state = p.state.as_str().into();
            row.restarts = Some(p.restarts);
            if let (State::Exited, Some(exit)) = (p.state, p.last_exit) {
                row.exited_unix = Some(exit.unix);
                row.exit_code = Some(exit.code);
                row.signal = logs::signal_name(exit.code);
            }
        }
    }
    row
}

pub fn ps(run_dir: &Path, json: bool, all: bool) -> Result<String, RuntimeError> {
    let st = state(run_dir)?;
    let records: Vec<&InstanceRecord> = st.instances.values().collect();
    let seen = states(run_dir, &records);
    // Grouped once: a scan of every translation per instance is a million
    // comparisons at 1,000 instances.
    let mut ports: BTreeMap<&str, Vec<PortView>> = BTreeMap::new();
    for t in &st.translations {
        ports.entry(&t.owner).or_default().push(PortView::from(t));
    }
    let mut rows: Vec<PsRow> = records
        .iter()
        .zip(seen)
        .map(|(record, seen)| {
            let own = ports.remove(record.name.as_str()).unwrap_or_default();
            live_row(record, seen, own)
        })
        .collect();
    if all {
        // A name that runs again is listed once, running.
        let ended = logs::exited(run_dir)
            .into_iter()
            .filter(|e| !st.instances.contains_key(&e.name));
        rows.extend(ended.map(|e| PsRow {
            name: e.name,
            aid: e.aid,
            pid: None,
            supervisor_pid: None,
            state: "exited".into(),
            command: e.command,
            ports: Vec::new(),
            created_unix: e.created_unix,
            exited_unix: Some(e.exited_unix),
            exit_code: Some(e.exit_code),
            signal: e.signal,
            restarts: Some(e.restarts),
        }));
    }
    if json {
        return Ok(serde_json::to_string_pretty(&rows).expect("serialisable"));
    }
    let now = logs::now_unix();
    let mut table = vec![[
        "NAME", "AID", "PID", "STATE", "CREATED", "UPTIME", "PORTS", "COMMAND",
    ]
    .map(String::from)
    .to_vec()];
    for r in &rows {
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|p| format!("{}/{}->{}", p.protocol, p.virtual_port, p.real_port))
            .collect();
        let (state, uptime) = match (r.exited_unix, r.exit_code) {
            (Some(at), Some(code)) => {
                let how = match &r.signal {
                    Some(sig) => format!("exited ({code}, {sig}) {} ago", age(now, at)),
                    None => format!("exited ({code}) {} ago", age(now, at)),
                };
                match r.restarts {
                    Some(n) if n > 0 => (format!("{how}, {n} restarts"), "-".to_string()),
                    _ => (how, "-".to_string()),
                }
            }
            _ => (r.state.clone(), age(now, r.created_unix)),
        };
        table.push(vec![
            r.name.clone(),
            r.aid.clone(),
            r.pid.map_or("-".into(), |p| p.to_string()),
            state,
            format!("{} ago", age(now, r.created_unix)),
            uptime,
            if ports.is_empty() {
                "-".into()
            } else {
                ports.join(",")
            },
            // One row per instance: an argument with line breaks (a
            // `python3 -c` program) shows them escaped.
            r.command.join(" ").replace('\n', "\\n"),
        ]);
    }
    Ok(render(&table))
}

/// `now - then` the way an operator reads it: 42s, 5m, 3h, 2d.
fn age(now: u64, then: u64) -> String {
    let secs = now.saturating_sub(then);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// The translation table, then the source rules and the recent cross-host
/// negotiations when there are any. `--json` alone keeps printing the
/// translation array (scripts rely on it); with `remote` it prints
/// `{"source_rules": [...], "negotiations": [...]}`.
pub fn ports(run_dir: &Path, json: bool, remote_only: bool) -> Result<String, RuntimeError> {
    let mut st = state(run_dir)?;
    st.translations.sort_by(|a, b| {
        (a.virtual_port, &a.aid, &a.owner).cmp(&(b.virtual_port, &b.aid, &b.owner))
    });
    st.source_rules.sort_by(|a, b| {
        (a.virtual_port, a.protocol, &a.owner, &a.source).cmp(&(
            b.virtual_port,
            b.protocol,
            &b.owner,
            &b.source,
        ))
    });
    let negotiations = crate::net::remote::read_records(run_dir);
    if json {
        if remote_only {
            let view = serde_json::json!({
                "source_rules": st.source_rules,
                "negotiations": negotiations,
            });
            return Ok(serde_json::to_string_pretty(&view).expect("serialisable") + "\n");
        }
        let views: Vec<PortView> = st.translations.iter().map(PortView::from).collect();
        return Ok(serde_json::to_string_pretty(&views).expect("serialisable"));
    }
    let mut out = String::new();
    if !remote_only {
        let mut table = vec![["PROTO", "ADDRESS", "VIRTUAL", "REAL", "AID", "INSTANCE"]
            .map(String::from)
            .to_vec()];
        for t in &st.translations {
            table.push(vec![
                t.protocol.to_string(),
                t.addr.to_string(),
                t.virtual_port.to_string(),
                t.real_port.to_string(),
                t.aid.clone(),
                t.owner.clone(),
            ]);
        }
        out.push_str(&render(&table));
    }
    if !st.source_rules.is_empty() {
        let mut table = vec![[
            "PROTO", "SOURCE", "SPORT", "VIRTUAL", "TO", "AID", "INSTANCE",
        ]
        .map(String::from)
        .to_vec()];
        for r in &st.source_rules {
            table.push(vec![
                r.protocol.to_string(),
                r.source.clone(),
                r.source_port.map_or("*".into(), |p| p.to_string()),
                r.virtual_port.to_string(),
                r.real_port.map_or("reset".into(), |p| p.to_string()),
                r.aid.clone(),
                r.owner.clone(),
            ]);
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str("source rules (outside clients, nftables):\n");
        out.push_str(&render(&table));
    }
    if !negotiations.is_empty() {
        let now = crate::net::remote::now_ms();
        let mut table = vec![[
            "SIDE", "PEER", "DEST", "VIRTUAL", "AID", "ANSWER", "REAL", "COUNT", "AGO", "INSTANCE",
        ]
        .map(String::from)
        .to_vec()];
        for n in &negotiations {
            table.push(vec![
                n.side.clone(),
                n.peer.clone(),
                n.dest.clone(),
                n.virtual_port.to_string(),
                n.aid.clone(),
                n.answer.clone(),
                n.real_port.map_or("-".into(), |p| p.to_string()),
                n.count.to_string(),
                format!("{}s", now.saturating_sub(n.last_unix_ms) / 1000),
                n.instance.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str("recent cross-host negotiations:\n");
        out.push_str(&render(&table));
    }
    Ok(out)
}

/// How long `stop` waits for a supervisor to end after its grace period
/// (and so its SIGKILL).
const STOP_AFTER_SIGKILL: Duration = Duration::from_secs(5);

/// Asks the instance to stop (SIGTERM, SIGKILL after `grace`) and waits
/// until its supervisor is gone.
pub fn stop(run_dir: &Path, name: &str, grace: Duration) -> Result<(), RuntimeError> {
    if !is_alive(run_dir, name) {
        return Err(RuntimeError::NoInstance(name.to_string()));
    }
    let dir = run_dir.join("instances").join(name);
    let reply = control::request(
        &dir,
        &Request::Stop {
            grace_secs: grace.as_secs(),
        },
    )?;
    if !reply.ok {
        return Err(RuntimeError::Control {
            path: dir,
            message: reply.message,
        });
    }
    let deadline = Instant::now() + grace + STOP_AFTER_SIGKILL;
    while is_alive(run_dir, name) {
        if Instant::now() > deadline {
            return Err(RuntimeError::StopTimedOut {
                name: name.to_string(),
                after: STOP_AFTER_SIGKILL,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `appshot templates`: one line per template with a running holder.
pub fn templates(run_dir: &Path) -> String {
    let mut table = vec![["NAME", "IMAGE", "PID", "RSS", "PSS", "CLONES", "SHELLS"]
        .map(String::from)
        .to_vec()];
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    for t in crate::supervisor::templates::listed(run_dir) {
        table.push(vec![
            t.name,
            t.image.display().to_string(),
            t.pid.to_string(),
            mib(t.rss_kib),
            mib(t.pss_kib),
            t.clones.to_string(),
            format!("{}/{}", t.shells, t.pool_size),
        ]);
    }
    render(&table)
}

pub(crate) fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == cols {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Refuses `command` up front, naming what is missing, when this process
/// lacks the capabilities an instance needs; otherwise the first failing
/// system call (`unshare`: "Operation not permitted") would say it.
pub fn require_privileges(command: &str) -> Result<(), RuntimeError> {
    const NEEDED: &[(u32, &str)] = &[(21, "CAP_SYS_ADMIN"), (19, "CAP_SYS_PTRACE")];
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| RuntimeError::sys("reading /proc/self/status", e))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(bit, _)| effective & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(RuntimeError::NotPrivileged {
        command: command.to_string(),
        missing: missing.join(" and "),
    })
}
