//! Records of image temporaries being written, in `RUN_DIR/pending/`, so
//! that whatever a killed writer left behind is removed by the next appshot
//! command rather than by the next snapshot into the same directory.
//!
//! A record is named `PID-STARTTIME-NANOS` after its writer (the start time
//! tells a dead writer from a new process that reuses its PID) and holds
//! the temporary's path. It is written before the temporary exists and
//! removed after the temporary is renamed or removed.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use appshot_snapshot::image::format::is_temporary_name;
use appshot_vpm::Registry;
use tracing::{info, warn};

use crate::error::{FileOp, RuntimeError};

const DIR: &str = "pending";

/// The record of one temporary this process writes; dropping it removes
/// the record (the temporary is the writer's to rename or remove).
pub struct Pending {
    record: PathBuf,
}

impl Pending {
    pub fn begin(run_dir: &Path, temporary: &Path) -> Result<Pending, RuntimeError> {
        let dir = Registry::open(run_dir)?.private_subdir(DIR)?;
        let pid = std::process::id();
        let start = start_time(pid).ok_or_else(|| {
            RuntimeError::sys("reading /proc/self/stat", std::io::ErrorKind::InvalidData)
        })?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let record = dir.join(format!("{pid}-{start}-{nanos}"));
        std::fs::write(&record, temporary.as_os_str().as_encoded_bytes())
            .map_err(|e| RuntimeError::file(FileOp::Write, &record, e))?;
        Ok(Pending { record })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

/// The start time (clock ticks after boot) of process `pid`, if it lives:
/// a zombie (a killed writer nobody reaped yet) writes nothing more.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name start at field 3 (state); the
    // start time is field 22.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    if matches!(fields.first(), Some(&("Z" | "X" | "x"))) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Removes the temporaries (and records) of writers that are dead. Only a
/// regular file named as its recorded writer names its temporaries is
/// removed; anything else a record points at is left alone.
pub fn sweep(run_dir: &Path) {
    let dir = run_dir.join(DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let mut fields = name.to_str().unwrap_or("").split('-');
        let (Some(Ok(pid)), Some(Ok(start))) = (
            fields.next().map(str::parse::<u32>),
            fields.next().map(str::parse::<u64>),
        ) else {
            warn!(record = %entry.path().display(), "not an appshot record: left alone");
            continue;
        };
        if start_time(pid) == Some(start) {
            continue;
        }
        if let Ok(content) = std::fs::read(entry.path()) {
            remove_temporary(
                &PathBuf::from(String::from_utf8_lossy(&content).as_ref()),
                pid,
            );
        }
        let _ = std::fs::remove_file(entry.path());
    }
}

fn remove_temporary(temporary: &Path, pid: u32) {
    let named = temporary
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| is_temporary_name(n, pid));
    let Ok(meta) = std::fs::symlink_metadata(temporary) else {
        return;
    };
    if !named || !temporary.is_absolute() || !meta.file_type().is_file() {
        warn!(path = %temporary.display(), "recorded temporary is not an image temporary: left alone");
        return;
    }
    match std::fs::remove_file(temporary) {
        Ok(()) => {
            info!(path = %temporary.display(), pid, "removed the temporary of a dead snapshot writer")
        }
        Err(e) => warn!(path = %temporary.display(), "removing a dead writer's temporary: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_dead_writers_go_and_nothing_else() {
        let run = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let pending = run.path().join(DIR);
        std::fs::create_dir_all(&pending).unwrap();
        // No process has PID 0x7fffffff (above pid_max).
        let dead = 0x7fff_ffffu32;
        let record = |name: &str, target: &Path| {
            std::fs::write(pending.join(name), target.as_os_str().as_encoded_bytes()).unwrap();
        };
        let orphan = images.path().join(format!(".a.img.tmp.{dead}"));
        std::fs::write(&orphan, b"partial").unwrap();
        record(&format!("{dead}-1-1"), &orphan);
        // Dead writer, but not a temporary of its: kept.
        let image = images.path().join("b.img");
        std::fs::write(&image, b"image").unwrap();
        record(&format!("{dead}-1-2"), &image);
        // Named like one, but a directory: kept.
        let dir = images.path().join(format!(".c.img.tmp.{dead}"));
        std::fs::create_dir(&dir).unwrap();
        record(&format!("{dead}-1-3"), &dir);
        // A live writer's temporary: kept, and so is its record.
        let me = std::process::id();
        let live = images.path().join(format!(".d.img.tmp.{me}"));
        std::fs::write(&live, b"in flight").unwrap();
        let mine = format!("{me}-{}-4", start_time(me).unwrap());
        record(&mine, &live);

        sweep(run.path());
        assert!(!orphan.exists());
        assert!(image.exists() && dir.exists() && live.exists());
        let left: Vec<String> = std::fs::read_dir(&pending)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, vec![mine], "records of dead writers go");
    }
}
