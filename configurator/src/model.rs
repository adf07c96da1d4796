use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use appshot_sys::fd::OpenRegularError;
/// The configuration names ports and ranges in the multiplexer's own terms.
pub use appshot_vpm::{PortRange, Protocol};

use crate::clone::CloneRules;
use crate::error::{ConfigError, NameError};
use crate::remote::{Peer, SourceRule};

/// A validated application config; every field already holds a usable value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppConfig {
    pub aid: Option<String>,
    pub name: Option<String>,
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub allocation_timeout: Duration,
    pub port_range: PortRange,
    /// Empty means every TCP port below the ephemeral range is multiplexed.
    pub ports: Vec<PortSpec>,
    /// Which AID clients outside appshot reach, by their source address.
    pub source_rules: Vec<SourceRule>,
    /// The AID of sources no rule names; `None`: they are reset.
    pub default_aid: Option<String>,
    /// Hosts whose agents negotiate; empty: every non-local destination is
    /// asked.
    pub peers: Vec<Peer>,
    pub agent_port: Option<u16>,
    pub cluster_key_file: Option<PathBuf>,
    /// How long a client waits for an agent before connecting plainly.
    pub agent_timeout: Option<Duration>,
    /// What differs per clone of a template (`[clone]`).
    pub clone: CloneRules,
    /// Who the application runs as; `None`: as the supervisor (root).
    pub user: Option<UserSpec>,
    /// The program a host-wide config (in the apps directory) applies to.
    pub executable: Option<PathBuf>,
}

impl AppConfig {
    const DEFAULT_ALLOCATION_TIMEOUT: Duration = Duration::from_millis(2000);
    /// Ten minutes: beyond this a blocked bind looks like a hang, so a larger
    /// value is far more likely a unit mix-up (seconds vs ms) than intent.
    pub(crate) const MAX_ALLOCATION_TIMEOUT_MS: u64 = 600_000;
    /// An agent slower than this is better treated as absent: every
    /// outbound connect to its host would wait that long.
    pub(crate) const MAX_AGENT_TIMEOUT_MS: u64 = 10_000;

    /// A FIFO, directory or device is refused at once: reading a FIFO
    /// would wait for a writer forever.
    pub fn load(path: &Path) -> Result<AppConfig, ConfigError> {
        let read = |error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        };
        let mut file = appshot_sys::fd::open_regular(path).map_err(|e| match e {
            OpenRegularError::Io(error) => read(error),
            OpenRegularError::NotRegular(what) => ConfigError::NotRegularFile {
                path: path.to_path_buf(),
                what,
            },
        })?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(read)?;
        Self::parse(&text, path)
    }

    /// `origin` only labels error messages; nothing is read from it.
    pub fn parse(text: &str, origin: &Path) -> Result<AppConfig, ConfigError> {
        crate::parse::parse(text, origin)
    }
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            aid: None,
            name: None,
            command: Vec::new(),
            cwd: None,
            env: BTreeMap::new(),
            allocation_timeout: Self::DEFAULT_ALLOCATION_TIMEOUT,
            port_range: PortRange::default(),
            ports: Vec::new(),
            source_rules: Vec::new(),
            default_aid: None,
            peers: Vec::new(),
            agent_port: None,
            cluster_key_file: None,
            agent_timeout: None,
            clone: CloneRules::default(),
            user: None,
            executable: None,
        }
    }
}

/// `USER[:GROUP]`, each a name or a number, as `--user` and the config's
/// `user` give it; resolved against the host's user database when the
/// instance starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    pub user: String,
    pub group: Option<String>,
}

impl FromStr for UserSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let part = |p: &str, what: &str| {
            if p.is_empty() || p.contains([':', '\0']) || p.chars().any(char::is_whitespace) {
                Err(format!(
                    "user `{s}`: the {what} must be a name or number, like `redis` or `redis:redis` or `1000:1000`"
                ))
            } else {
                Ok(p.to_string())
            }
        };
        Ok(UserSpec {
            user: part(user, "user")?,
            group: group.map(|g| part(g, "group")).transpose()?,
        })
    }
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(g) => write!(f, "{}:{g}", self.user),
            None => f.write_str(&self.user),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// Checks an application id. The id names directories and appears in paths,
/// so it is held to a conservative, shell- and filesystem-safe alphabet.
pub fn validate_aid(aid: &str) -> Result<(), NameError> {
    validate_identifier("application id", aid)
}

/// Checks an instance name; same rules as the AID because it also becomes a
/// directory name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    validate_identifier("instance name", name)
}

fn validate_identifier(what: &'static str, value: &str) -> Result<(), NameError> {
    const MAX_LEN: usize = 64;
    if value.is_empty() {
        return Err(NameError::Empty { what });
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::Character {
            what,
            value: value.into(),
            bad,
            allowed: "letters, digits, '.', '_' and '-'",
        });
    }
    // Only ASCII is left, so the byte length is the character count.
    if value.len() > MAX_LEN {
        return Err(NameError::TooLong {
            what,
            value: value.into(),
            max: MAX_LEN,
        });
    }
    if value == "." || value == ".." {
        return Err(NameError::Dots {
            what,
            value: value.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for good in ["shop", "Shop_1.v2-x", &"a".repeat(64)] {
            assert_eq!(validate_aid(good), Ok(()), "{good}");
        }
        for bad in ["", "a/b", "a b", "é", ".", "..", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            validate_aid("a/b"),
            Err(NameError::Character { bad: '/', .. })
        ));
    }
}
