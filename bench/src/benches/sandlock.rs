//! sandlock, the peer of the notified-call and connection-setup rows: a
//! seccomp user-notification sandbox (PyPI `sandlock`) whose `port_remap`
//! rewrites binds and connects in its supervisor, as appshot's multiplexer
//! does. bench/run.sh installs it into a virtual environment and sets
//! `$SANDLOCK_PYTHON`; `bench/peers/sandlock_run.py` runs a probe in a
//! sandbox with ports remapped.

use anyhow::bail;

/// Where the runner script is, from the repository root (the bench's
/// working directory).
const RUNNER: &str = "bench/peers/sandlock_run.py";

pub struct Sandlock {
    python: String,
    pub version: String,
}

/// The installed sandlock, or why there is none. Under CI a missing peer
/// is an error.
pub fn usable() -> anyhow::Result<Result<Sandlock, String>> {
    let peer = match std::env::var("SANDLOCK_PYTHON") {
        Ok(python) if std::path::Path::new(RUNNER).is_file() => Ok(Sandlock {
            python,
            version: std::env::var("SANDLOCK_VERSION").unwrap_or_else(|_| "?".into()),
        }),
        Ok(_) => Err(format!(
            "{RUNNER} not found (run the bench from the repository root)"
        )),
        Err(_) => Err("sandlock not installed (bench/run.sh installs sandlock 0.9.0)".into()),
    };
    if let Err(why) = &peer {
        eprintln!("  WARNING: no sandlock figures: {why}");
        if super::in_ci() {
            bail!("CI=true and no sandlock peer: {why}");
        }
    }
    Ok(peer)
}

impl Sandlock {
    /// `command` run in a sandbox with port_remap.
    pub fn argv(&self, command: &[String]) -> Vec<String> {
        [self.python.clone(), RUNNER.to_string()]
            .into_iter()
            .chain(command.iter().cloned())
            .collect()
    }

    /// The configuration of a row comparing appshot with it.
    pub fn row_configuration(&self) -> String {
        format!(
            "peer: sandlock {} port_remap (ratio: appshot/sandlock)",
            self.version
        )
    }
}
