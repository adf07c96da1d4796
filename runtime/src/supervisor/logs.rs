//! What a detached instance leaves behind in `RUN_DIR/logs/NAME/`: the
//! application's output (`app.log`, each line stamped with the time it
//! arrived, rotated to `app.log.1` at a size limit), its supervisor's own
//! messages (`supervisor.log`) and, once it has ended, how it ended
//! (`exit.json`). All of it stays until `appshot rm NAME` (or `run --rm`);
//! a new instance of the same name moves it to `previous/`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{FileOp, RuntimeError};

pub const APP_LOG: &str = "app.log";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
const EXIT_RECORD: &str = "exit.json";
/// Where `app.log` goes when it reaches its size limit (one generation:
/// at most twice the limit on disk).
const ROTATED: &str = "app.log.1";
/// An earlier instance's files, when the name was used again.
const PREVIOUS: &str = "previous";
/// The default size at which `app.log` is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 10 << 20;

/// `RUN_DIR/logs/NAME`.
pub fn dir(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("logs").join(name)
}

/// Makes instance `name`'s log directory in the registry's run directory
/// (`logs/` private, as the run directory is), with a previous instance's
/// files moved aside ([`start_anew`]). Not for a name in use: its logs
/// belong to the running instance.
pub fn make_dir(registry: &appshot_vpm::Registry, name: &str) -> Result<PathBuf, RuntimeError> {
    registry.private_subdir("logs")?;
    let log_dir = dir(registry.dir(), name);
    let created = std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&log_dir);
    match created {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(RuntimeError::file(FileOp::Create, &log_dir, e))
        }
        _ => {}
    }
    start_anew(registry.dir(), name)?;
    Ok(log_dir)
}

/// Opens `path` for appending, private to root, creating it.
pub fn append(path: &Path) -> Result<File, RuntimeError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map_err(|e| RuntimeError::file(FileOp::Open, path, e))
}

/// How an instance ended, written by its supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exited {
    pub name: String,
    pub aid: String,
    pub command: Vec<String>,
    pub created_unix: u64,
    pub exited_unix: u64,
    /// As a shell reports it: 128+N when killed by signal N.
    pub exit_code: i32,
    /// The signal's name when it was killed by one.
    pub signal: Option<String>,
    /// How often `run --restart` started it again before this end.
    #[serde(default)]
    pub restarts: u32,
}

impl Exited {
    pub fn new(name: &str, aid: &str, command: &[String], created_unix: u64, status: i32) -> Self {
        Exited {
            name: name.to_string(),
            aid: aid.to_string(),
            command: command.to_vec(),
            created_unix,
            exited_unix: now_unix(),
            exit_code: status,
            signal: signal_name(status),
            restarts: 0,
        }
    }
}

/// The name of the signal that killed a process whose `status` a shell
/// reports as 128+N.
pub fn signal_name(status: i32) -> Option<String> {
    (status > 128)
        .then(|| nix::sys::signal::Signal::try_from(status - 128).ok())
        .flatten()
        .map(|s| s.as_str().to_string())
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn record_exit(run_dir: &Path, exited: &Exited) -> Result<(), RuntimeError> {
    let path = dir(run_dir, &exited.name).join(EXIT_RECORD);
    let json = serde_json::to_vec_pretty(exited).expect("serialisable");
    std::fs::write(&path, json).map_err(|e| RuntimeError::file(FileOp::Write, &path, e))
}

/// Makes way for a new instance of `name`: what an earlier one left (its
/// logs and how it ended) moves to `previous/`, replacing what was there,
/// so the last crash stays readable after a restart under the same name.
pub fn start_anew(run_dir: &Path, name: &str) -> Result<(), RuntimeError> {
    let dir = dir(run_dir, name);
    let previous = dir.join(PREVIOUS);
    let files = [APP_LOG, ROTATED, SUPERVISOR_LOG, EXIT_RECORD];
    if !files.iter().any(|f| dir.join(f).exists()) {
        return Ok(());
    }
    match std::fs::remove_dir_all(&previous) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(RuntimeError::file(FileOp::Remove, &previous, e))
        }
        _ => {}
    }
    std::fs::create_dir(&previous).map_err(|e| RuntimeError::file(FileOp::Create, &previous, e))?;
    for f in files {
        match std::fs::rename(dir.join(f), previous.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::file(FileOp::Rename, &dir.join(f), e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every instance that has ended and not been removed, by name.
pub fn exited(run_dir: &Path) -> Vec<Exited> {
    let Ok(entries) = std::fs::read_dir(run_dir.join("logs")) else {
        return Vec::new();
    };
    let mut all: Vec<Exited> = entries
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join(EXIT_RECORD)).ok())
        .filter_map(|json| serde_json::from_slice(&json).ok())
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// `appshot rm NAME`: the logs and exit record of an instance that ended.
pub fn remove(run_dir: &Path, name: &str) -> Result<(), RuntimeError> {
    if appshot_vpm::is_alive(run_dir, name) {
        return Err(RuntimeError::StillRunning(name.to_string()));
    }
    let path = dir(run_dir, name);
    if !path.is_dir() {
        return Err(RuntimeError::NoLogs(name.to_string()));
    }
    std::fs::remove_dir_all(&path).map_err(|e| RuntimeError::file(FileOp::Remove, &path, e))
}

/// Copies what the application writes into `read` to `app.log`, a line at a
/// time with its arrival time in front, until every writer has closed its
/// end. Whatever was written is in the file when the thread is joined.
pub fn capture(log_dir: PathBuf, read: OwnedFd, max_bytes: u64) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let path = log_dir.join(APP_LOG);
        let Ok(mut out) = append(&path) else {
            return;
        };
        let mut size = out.metadata().map(|m| m.len()).unwrap_or(0);
        let mut reader = BufReader::new(File::from(read));
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if !line.ends_with(b"\n") {
                line.push(b'\n');
            }
            let stamp = format!("{} ", timestamp(SystemTime::now()));
            if size > 0 && size + (stamp.len() + line.len()) as u64 > max_bytes {
                let _ = std::fs::rename(&path, log_dir.join(ROTATED));
                match append(&path) {
                    Ok(f) => out = f,
                    Err(_) => return,
                }
                size = 0;
            }
            let _ = out.write_all(stamp.as_bytes());
            let _ = out.write_all(&line);
            size += (stamp.len() + line.len()) as u64;
        }
    })
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC), which sorts as text.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// A time in seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc(unix: u64) -> String {
    let stamp = timestamp(UNIX_EPOCH + Duration::from_secs(unix));
    format!("{}Z", &stamp[..19])
}

/// `--since`: a duration back from now (`30s`, `5m`, `2h`, `1d`) or a UTC
/// time `YYYY-MM-DDTHH:MM:SS`; returned as the timestamp prefix lines are
/// compared with.
pub fn parse_since(arg: &str) -> Result<String, String> {
    let unit = |c: char| match c {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86400),
        _ => None,
    };
    if let Some(last) = arg.chars().last().filter(|c| unit(*c).is_some()) {
        if let Ok(n) = arg[..arg.len() - 1].parse::<u64>() {
            let back = Duration::from_secs(n * unit(last).expect("a unit"));
            return Ok(timestamp(SystemTime::now() - back));
        }
    }
    let t = arg.trim_end_matches('Z');
    let shape = t.len() >= 10
        && t.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit() || (i > 19 && b == b'.'),
        });
    if shape {
        Ok(t.to_string())
    } else {
        Err(format!(
            "`{arg}`: give a duration (30s, 5m, 2h, 1d) or a UTC time YYYY-MM-DDTHH:MM:SS"
        ))
    }
}

/// The last lines of the supervisor's log and the application's, for a
/// failed start's message.
pub fn tail(log_dir: &Path) -> String {
    const LINES: usize = 20;
    let mut out = String::new();
    for file in [SUPERVISOR_LOG, APP_LOG] {
        let text = std::fs::read_to_string(log_dir.join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in &lines[lines.len().saturating_sub(LINES)..] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What `appshot logs` prints.
pub struct View {
    pub since: Option<String>,
    pub timestamps: bool,
    pub follow: bool,
}

/// Prints the application's output of instance `name`, running or ended;
/// with `follow`, goes on printing until the instance has ended.
pub fn print(run_dir: &Path, name: &str, view: &View) -> Result<(), RuntimeError> {
    let dir = dir(run_dir, name);
    if !dir.is_dir() {
        return Err(RuntimeError::NoLogs(name.to_string()));
    }
    let mut stdout = std::io::stdout().lock();
    let mut emit = |line: &str| {
        let (stamp, text) = line.split_once(' ').unwrap_or(("", line));
        if view.since.as_deref().is_some_and(|s| stamp < s) {
            return;
        }
        let out = if view.timestamps { line } else { text };
        // A closed pipe (`| head`) ends the output, not with an error.
        let _ = writeln!(stdout, "{out}");
    };
    if let Ok(old) = File::open(dir.join(ROTATED)) {
        for line in BufReader::new(old).lines().map_while(Result::ok) {
            emit(&line);
        }
    }
    let path = dir.join(APP_LOG);
    let mut file = open_current(&path)?;
    let mut pending = String::new();
    loop {
        let mut chunk = String::new();
        file.read_to_string(&mut chunk)
            .map_err(|e| RuntimeError::file(FileOp::Read, &path, e))?;
        pending.push_str(&chunk);
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            emit(line.trim_end_matches('\n'));
        }
        if !view.follow {
            return Ok(());
        }
        if !appshot_vpm::is_alive(run_dir, name) && chunk.is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        // Rotated meanwhile: the rest of the old file, then the new one.
        let inode = |m: std::fs::Metadata| m.ino();
        let current = std::fs::metadata(&path).map(inode).ok();
        if current.is_some() && current != file.metadata().map(inode).ok() {
            file.read_to_string(&mut pending)
                .map_err(|e| RuntimeError::file(FileOp::Read, &path, e))?;
            file = open_current(&path)?;
        }
    }
}

/// `app.log`, which is missing for a moment while it is rotated.
fn open_current(path: &Path) -> Result<File, RuntimeError> {
    let mut tries = 0;
    loop {
        match File::open(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return opened.map_err(|e| RuntimeError::file(FileOp::Open, path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_and_sort_as_text() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_812_567_123);
        assert_eq!(timestamp(t), "2026-11-27T20:49:27.123Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert!(timestamp(t) < timestamp(t + Duration::from_secs(1)));
    }

    #[test]
    fn since_takes_durations_and_times() {
        assert!(parse_since("5m").unwrap() < timestamp(SystemTime::now()));
        assert_eq!(
            parse_since("2026-11-27T18:00:00").unwrap(),
            "2026-11-27T18:00:00"
        );
        assert!(parse_since("yesterday").is_err());
        assert!(parse_since("5x").is_err());
    }
}
