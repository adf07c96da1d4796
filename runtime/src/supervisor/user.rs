//! `--user USER[:GROUP]`: who an application runs as, resolved against the
//! host's user database the way `docker run --user` and `podman run
//! --user` resolve it.

use std::path::PathBuf;

use appshot_configurator::UserSpec;
use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;

/// Numeric identity the application takes on before it starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's groups in /etc/group).
    pub groups: Vec<u32>,
    /// The user's home directory, for HOME.
    pub home: Option<PathBuf>,
}

impl RunAs {
    /// `uid:gid:g1,g2,…`, how the namespace init receives it.
    pub fn to_arg(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    pub fn from_arg(arg: &str) -> Option<RunAs> {
        let mut parts = arg.splitn(3, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let groups = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(RunAs {
            uid,
            gid,
            groups,
            home: None,
        })
    }
}

/// A name must exist; a number may lack an entry (then its group is 0 and
/// it has no supplementary groups, as with docker and podman).
pub fn resolve(spec: &UserSpec) -> Result<RunAs, RuntimeError> {
    let bad = |why: String| RuntimeError::User {
        user: spec.to_string(),
        why,
    };
    let lookup = |r: nix::Result<Option<User>>| r.map_err(|e| bad(format!("user database: {e}")));
    let entry = match spec.user.parse::<u32>() {
        Ok(uid) => lookup(User::from_uid(Uid::from_raw(uid)))?,
        Err(_) => Some(
            lookup(User::from_name(&spec.user))?
                .ok_or_else(|| bad(format!("no user named `{}`", spec.user)))?,
        ),
    };
    let uid = match &entry {
        Some(u) => u.uid.as_raw(),
        None => spec.user.parse().expect("numeric when it has no entry"),
    };
    let gid = match &spec.group {
        None => entry.as_ref().map_or(0, |u| u.gid.as_raw()),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .map_err(|e| bad(format!("group database: {e}")))?
                .ok_or_else(|| bad(format!("no group named `{g}`")))?
                .gid
                .as_raw(),
        },
    };
    let groups = match &entry {
        Some(u) => {
            let name = std::ffi::CString::new(u.name.as_str())
                .map_err(|_| bad("user name with a NUL byte".into()))?;
            getgrouplist(&name, Gid::from_raw(gid))
                .map_err(|e| bad(format!("groups of `{}`: {e}", u.name)))?
                .into_iter()
                .map(Gid::as_raw)
                .collect()
        }
        None => vec![gid],
    };
    Ok(RunAs {
        uid,
        gid,
        groups,
        home: entry.map(|u| u.dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> UserSpec {
        s.parse().unwrap()
    }

    #[test]
    fn root_by_name_and_by_number() {
        let r = resolve(&spec("root")).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        assert_eq!(r.home.as_deref(), Some(std::path::Path::new("/root")));
        assert_eq!(resolve(&spec("0")).unwrap().uid, 0);
    }

    #[test]
    fn a_number_without_an_entry_gets_group_zero_or_the_one_named() {
        let r = resolve(&spec("4242424")).unwrap();
        assert_eq!((r.uid, r.gid, r.groups.clone()), (4_242_424, 0, vec![0]));
        assert_eq!(resolve(&spec("4242424:77")).unwrap().gid, 77);
    }

    #[test]
    fn unknown_names_are_refused_by_name() {
        let e = resolve(&spec("no-such-user-here")).unwrap_err().to_string();
        assert!(e.contains("no user named `no-such-user-here`"), "{e}");
        let e = resolve(&spec("root:no-such-group"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no group named `no-such-group`"), "{e}");
    }

    #[test]
    fn the_init_argument_round_trips() {
        let r = RunAs {
            uid: 100,
            gid: 101,
            groups: vec![101, 5],
            home: None,
        };
        assert_eq!(RunAs::from_arg(&r.to_arg()), Some(r));
        let none = RunAs {
            groups: Vec::new(),
            ..RunAs::from_arg("1:2:").unwrap()
        };
        assert_eq!(RunAs::from_arg("1:2:"), Some(none));
        assert_eq!(RunAs::from_arg("1:x:"), None);
    }
}
