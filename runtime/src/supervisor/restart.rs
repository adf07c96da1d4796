//! `run --restart`: when the instance's supervisor starts the application
//! again after it exits, and how long it waits first.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The first wait before a restart; it doubles with each restart.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between two restarts.
const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Policy {
    /// Never restarted.
    #[default]
    No,
    /// Restarted when it exits with a status other than 0, at most `max`
    /// times (`None`: without limit).
    OnFailure { max: Option<u32> },
    /// Restarted whenever it exits, whatever its status.
    Always,
}

impl Policy {
    /// After the application exited with `status`, having been restarted
    /// `restarts` times: how long to wait before starting it again, or
    /// `None` not to. `appshot stop` and a stopping snapshot are never
    /// followed by a restart; the caller checks those.
    pub fn delay(&self, status: i32, restarts: u32) -> Option<Duration> {
        let again = match self {
            Policy::No => false,
            Policy::OnFailure { max } => status != 0 && max.is_none_or(|m| restarts < m),
            Policy::Always => true,
        };
        again.then(|| {
            FIRST_DELAY
                .saturating_mul(1 << restarts.min(16))
                .min(MAX_DELAY)
        })
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected no, on-failure, on-failure:N or always");
        match s.split_once(':') {
            None => match s {
                "no" => Ok(Policy::No),
                "on-failure" => Ok(Policy::OnFailure { max: None }),
                "always" => Ok(Policy::Always),
                _ => Err(bad()),
            },
            Some(("on-failure", n)) => n
                .parse()
                .map(|max| Policy::OnFailure { max: Some(max) })
                .map_err(|_| bad()),
            Some(_) => Err(bad()),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::No => write!(f, "no"),
            Policy::OnFailure { max: None } => write!(f, "on-failure"),
            Policy::OnFailure { max: Some(n) } => write!(f, "on-failure:{n}"),
            Policy::Always => write!(f, "always"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_print_as_given() {
        for s in ["no", "on-failure", "on-failure:3", "always"] {
            assert_eq!(s.parse::<Policy>().unwrap().to_string(), s);
        }
        for s in ["sometimes", "on-failure:", "on-failure:x", "always:2"] {
            assert!(s.parse::<Policy>().is_err(), "{s}");
        }
    }

    #[test]
    fn on_failure_stops_after_its_count_and_the_wait_doubles() {
        let p: Policy = "on-failure:3".parse().unwrap();
        assert_eq!(p.delay(0, 0), None);
        assert_eq!(p.delay(1, 0), Some(Duration::from_millis(100)));
        assert_eq!(p.delay(1, 2), Some(Duration::from_millis(400)));
        assert_eq!(p.delay(1, 3), None);
        assert_eq!(Policy::Always.delay(0, 40), Some(MAX_DELAY));
        assert_eq!(Policy::No.delay(1, 0), None);
    }
}
