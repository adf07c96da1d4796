//! What an instance is doing, as `ps` shows it, published by its
//! supervisor in `instances/NAME/state`: replaced whole (written beside,
//! then renamed over) at every change, so that `ps` reads the states of
//! 1,000 instances without waking 1,000 supervisors (asking each over its
//! control socket took 207–258 ms on 2 busy CPUs).
//!
//! Whether the supervisor is alive is not the file's to say: a supervisor
//! killed by SIGKILL leaves it behind, saying what it last said, and the
//! registry's liveness lock (which the kernel drops with the process) takes
//! the instance out of every listing. The file is believed only beside a
//! registry record of the same supervisor.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tracing::warn;

pub const STATE_FILE: &str = "state";
const STAGING_FILE: &str = "state.tmp";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Restored or cloned, its processes not released yet.
    Restoring,
    Running,
    /// Held by a snapshot.
    Frozen,
    /// Asked to end (stop, a signal, a snapshot that stops it): no restart
    /// follows, and its supervisor ends.
    Stopping,
    /// The application exited; its restart policy starts it again.
    Restarting,
    /// The application exited and is not restarted; its supervisor is
    /// ending.
    Exited,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Restoring => "restoring",
            State::Running => "running",
            State::Frozen => "frozen",
            State::Stopping => "stopping",
            State::Restarting => "restarting",
            State::Exited => "exited",
        }
    }
}

/// How the application last ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// As a shell reports it: 128+N when killed by signal N.
    pub code: i32,
    pub unix: u64,
}

/// The file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub state: State,
    /// The supervisor that wrote it: a file left by a dead supervisor of
    /// the same name is not the live one's.
    pub supervisor_pid: u32,
    /// How often `run --restart` started the application again.
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
}

/// Where the application is in its life, apart from what is asked of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Restoring,
    Running,
    /// Exited; `restart`: its policy starts it again.
    Ended {
        restart: bool,
    },
}

/// What the supervisor's threads have set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flags {
    phase: Phase,
    frozen: bool,
    stopping: bool,
    restarts: u32,
    last_exit: Option<LastExit>,
}

impl Flags {
    /// A snapshot's freeze hides the rest; being asked to end outranks how
    /// the application is (it is not restarted, whatever its policy).
    fn state(&self) -> State {
        if self.frozen {
            State::Frozen
        } else if self.stopping {
            State::Stopping
        } else {
            match self.phase {
                Phase::Restoring => State::Restoring,
                Phase::Running => State::Running,
                Phase::Ended { restart: true } => State::Restarting,
                Phase::Ended { restart: false } => State::Exited,
            }
        }
    }
}

/// The supervisor's side: every change goes to the file before the call
/// returns, under one lock, so the file always ends with the last change.
pub struct Status {
    path: PathBuf,
    staging: PathBuf,
    supervisor_pid: u32,
    flags: Mutex<Flags>,
}

impl Status {
    /// Publishes `phase` in the instance directory `dir` at once, replacing
    /// whatever a dead supervisor of the same name left there.
    pub fn new(dir: &Path, phase: Phase) -> Status {
        let status = Status {
            path: dir.join(STATE_FILE),
            staging: dir.join(STAGING_FILE),
            supervisor_pid: std::process::id(),
            flags: Mutex::new(Flags {
                phase,
                frozen: false,
                stopping: false,
                restarts: 0,
                last_exit: None,
            }),
        };
        status.publish(&status.locked());
        status
    }

    fn locked(&self) -> MutexGuard<'_, Flags> {
        // Flags are plain values, sound whatever a panicking holder did.
        self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, change: impl FnOnce(&mut Flags)) {
        let mut flags = self.locked();
        let before = *flags;
        change(&mut flags);
        if *flags != before {
            self.publish(&flags);
        }
    }

    pub fn state(&self) -> State {
        self.locked().state()
    }

    pub fn stopping(&self) -> bool {
        self.locked().stopping
    }

    /// Whether the application has exited (and not been started again).
    pub fn ended(&self) -> bool {
        matches!(self.locked().phase, Phase::Ended { .. })
    }

    pub fn set_frozen(&self, frozen: bool) {
        self.update(|f| f.frozen = frozen);
    }

    pub fn set_stopping(&self) {
        self.update(|f| f.stopping = true);
    }

    /// The application exited with `code`; `restart`: its policy, as far
    /// as it is known now, starts it again.
    pub fn ended_with(&self, code: i32, restart: bool) {
        self.update(|f| {
            f.phase = Phase::Ended { restart };
            f.last_exit = Some(LastExit {
                code,
                unix: super::logs::now_unix(),
            });
        });
    }

    /// A restored instance's processes were released.
    pub fn released(&self) {
        self.update(|f| f.phase = Phase::Running);
    }

    /// The application was started again.
    pub fn restarted(&self) {
        self.update(|f| {
            f.phase = Phase::Running;
            f.restarts += 1;
        });
    }

    /// Writes the file; a failure is logged and leaves the previous file
    /// (`ps` then shows the state before): the instance itself is fine.
    fn publish(&self, flags: &Flags) {
        let published = Published {
            state: flags.state(),
            supervisor_pid: self.supervisor_pid,
            restarts: flags.restarts,
            last_exit: flags.last_exit,
        };
        let mut bytes = serde_json::to_vec(&published).expect("serialisable");
        bytes.push(b'\n');
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.staging)
            .and_then(|mut f| f.write_all(&bytes))
            .and_then(|()| std::fs::rename(&self.staging, &self.path));
        if let Err(e) = written {
            warn!(path = %self.path.display(), state = published.state.as_str(), "publishing the instance's state: {e}");
        }
    }
}

/// The state published in instance directory `dir` by `supervisor_pid`;
/// `None` if there is none, or it is another supervisor's (one of an
/// older version publishes none: ask it).
pub fn read(dir: &Path, supervisor_pid: u32) -> Option<Published> {
    let bytes = std::fs::read(dir.join(STATE_FILE)).ok()?;
    serde_json::from_slice::<Published>(&bytes)
        .ok()
        .filter(|p| p.supervisor_pid == supervisor_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(phase: Phase, frozen: bool, stopping: bool) -> Flags {
        Flags {
            phase,
            frozen,
            stopping,
            restarts: 0,
            last_exit: None,
        }
    }

    #[test]
    fn a_freeze_then_a_stop_outrank_how_the_application_is() {
        let ended = Phase::Ended { restart: false };
        let restarting = Phase::Ended { restart: true };
        assert_eq!(flags(Phase::Running, false, false).state(), State::Running);
        assert_eq!(
            flags(Phase::Restoring, false, false).state(),
            State::Restoring
        );
        assert_eq!(flags(restarting, false, false).state(), State::Restarting);
        assert_eq!(flags(ended, false, false).state(), State::Exited);
        // Stopped while it runs, or while it waits for a restart that a
        // stop cancels, or after it exited on its own.
        for phase in [Phase::Running, restarting, ended] {
            assert_eq!(flags(phase, false, true).state(), State::Stopping);
        }
        assert_eq!(flags(Phase::Running, true, false).state(), State::Frozen);
        assert_eq!(flags(Phase::Running, true, true).state(), State::Frozen);
    }

    #[test]
    fn every_change_is_in_the_file_and_only_its_writer_is_believed() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let seen = || read(dir.path(), me).expect("published");
        // What a dead supervisor of the name left is replaced at once.
        std::fs::write(dir.path().join(STATE_FILE), "{\"state\":\"frozen\"").unwrap();
        let status = Status::new(dir.path(), Phase::Restoring);
        assert_eq!(seen().state, State::Restoring);
        status.released();
        assert_eq!(seen().state, State::Running);
        status.set_frozen(true);
        assert_eq!(seen().state, State::Frozen);
        status.set_frozen(false);
        status.ended_with(3, true);
        assert_eq!(seen().state, State::Restarting);
        assert!(status.ended());
        status.restarted();
        let again = seen();
        assert_eq!((again.state, again.restarts), (State::Running, 1));
        assert_eq!(again.last_exit.map(|e| e.code), Some(3));
        assert!(!status.ended());
        status.ended_with(137, false);
        assert_eq!(seen().state, State::Exited);
        status.set_stopping();
        assert_eq!(seen().state, State::Stopping);
        assert!(!dir.path().join(STAGING_FILE).exists());
        // Another supervisor's file (the registry names another pid).
        assert_eq!(read(dir.path(), me + 1), None);
        assert_eq!(read(&dir.path().join("nowhere"), me), None);
    }
}
