//! The seccomp profile (`linux.seccomp` of an OCI config) a runtime loads
//! for a container appshot serves: the same decisions as the filter of
//! `appshot run` (`crate::seccomp::filter`), expressed as OCI rules: notify for
//! bind, connect, getsockname, getpeername and `MSG_FASTOPEN` sends,
//! io_uring denied with ENOSYS, SCTP INET sockets refused, x86_64 only,
//! and `listenerPath` naming the agent.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

use crate::error::{FileOp, RuntimeError};
use crate::seccomp::filter::{DENIED_ENOSYS, FASTOPEN_SENDS, IPPROTO_SCTP, NOTIFIED};

fn oci(e: oci_spec::OciSpecError) -> RuntimeError {
    RuntimeError::Oci(format!("building the seccomp profile: {e}"))
}

fn masked(index: usize, mask: u64, value: u64) -> Result<LinuxSeccompArg, RuntimeError> {
    LinuxSeccompArgBuilder::default()
        .index(index)
        .value(mask)
        .value_two(value)
        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
        .build()
        .map_err(oci)
}

fn rule(
    names: &[&str],
    action: LinuxSeccompAction,
    errno: Option<i32>,
    args: Vec<LinuxSeccompArg>,
) -> Result<LinuxSyscall, RuntimeError> {
    let mut b = LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .action(action);
    if let Some(e) = errno {
        b = b.errno_ret(e as u32);
    }
    if !args.is_empty() {
        b = b.args(args);
    }
    b.build().map_err(oci)
}

/// Keys of the Docker/containers profile format whose conditions the OCI
/// format cannot carry: a rule read without them would apply
/// unconditionally, so a base that has them is refused.
const FOREIGN_KEYS: &[&str] = &["archMap", "includes", "excludes"];

/// Reads a base profile: an OCI `linux.seccomp` object, or a whole
/// `config.json` (its `linux.seccomp` is taken).
pub fn read_base(path: &Path) -> Result<LinuxSeccomp, RuntimeError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| RuntimeError::file(FileOp::Read, path, e))?;
    let bad = |why: String| RuntimeError::Oci(format!("{}: {why}", path.display()));
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(seccomp) = value.pointer("/linux/seccomp") {
        value = seccomp.clone();
    } else if value.get("ociVersion").is_some() {
        return Err(bad("a config.json without linux.seccomp".into()));
    }
    fn foreign(v: &serde_json::Value) -> Option<&'static str> {
        match v {
            serde_json::Value::Object(m) => FOREIGN_KEYS
                .iter()
                .find(|k| m.contains_key(**k))
                .copied()
                .or_else(|| m.values().find_map(foreign)),
            serde_json::Value::Array(a) => a.iter().find_map(foreign),
            _ => None,
        }
    }
    if let Some(key) = foreign(&value) {
        return Err(bad(format!(
            "`{key}` belongs to the Docker/containers profile format, which the OCI format cannot express; give the OCI form (e.g. linux.seccomp of the config.json your engine generates)"
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// The profile: `base` (default: allow everything) with appshot's rules.
/// Rules of the base that name a syscall appshot decides lose that name;
/// a `MSG_FASTOPEN` send is notified and other sends keep the action the
/// base gave them. `metadata` becomes `listenerMetadata` (e.g.
/// `appshot.aid=a`).
pub fn build(
    base: Option<LinuxSeccomp>,
    listener_path: &Path,
    metadata: Option<&str>,
) -> Result<LinuxSeccomp, RuntimeError> {
    let base = match base {
        Some(b) => b,
        None => LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .build()
            .map_err(oci)?,
    };
    let default = base.default_action();
    let sends: Vec<&str> = FASTOPEN_SENDS.iter().map(|(n, _)| *n).collect();
    let ours = |n: &str| NOTIFIED.contains(&n) || DENIED_ENOSYS.contains(&n) || sends.contains(&n);
    let mut syscalls = Vec::new();
    let mut send_action = std::collections::HashMap::new();
    let mut names_socket = false;
    for mut r in base.syscalls().clone().unwrap_or_default() {
        for n in r.names() {
            if sends.contains(&n.as_str()) && r.args().as_ref().is_none_or(|a| a.is_empty()) {
                send_action.entry(n.clone()).or_insert(r.action());
            }
            names_socket |= n == "socket";
        }
        let kept: Vec<String> = r.names().iter().filter(|n| !ours(n)).cloned().collect();
        if kept.is_empty() {
            continue;
        }
        r.set_names(kept);
        syscalls.push(r);
    }
    let notify = LinuxSeccompAction::ScmpActNotify;
    syscalls.push(rule(NOTIFIED, notify, None, vec![])?);
    let fastopen = libc::MSG_FASTOPEN as u64;
    for (name, flags_arg) in FASTOPEN_SENDS {
        let arg = *flags_arg as usize;
        syscalls.push(rule(
            &[name],
            notify,
            None,
            vec![masked(arg, fastopen, fastopen)?],
        )?);
        // Under a base that does not allow by default, the other sends
        // keep what the base said of them.
        let others = send_action.get(*name).copied().unwrap_or(default);
        if others != default {
            syscalls.push(rule(
                &[name],
                others,
                None,
                vec![masked(arg, fastopen, 0)?],
            )?);
        }
    }
    syscalls.push(rule(
        DENIED_ENOSYS,
        LinuxSeccompAction::ScmpActErrno,
        Some(libc::ENOSYS),
        vec![],
    )?);
    // As in `appshot run`: SCTP moves addresses through setsockopt, out
    // of the multiplexer's sight. Left out when the base has its own rule
    // for `socket`, which libseccomp would not combine with these.
    if !names_socket {
        for domain in [libc::AF_INET, libc::AF_INET6] {
            let dom = masked(0, 0xffff_ffff, domain as u64)?;
            syscalls.push(rule(
                &["socket"],
                LinuxSeccompAction::ScmpActErrno,
                Some(libc::EPROTONOSUPPORT),
                vec![dom, masked(2, 0xffff_ffff, IPPROTO_SCTP)?],
            )?);
            syscalls.push(rule(
                &["socket"],
                LinuxSeccompAction::ScmpActErrno,
                Some(libc::ESOCKTNOSUPPORT),
                vec![dom, masked(1, 0xf, libc::SOCK_SEQPACKET as u64)?],
            )?);
        }
    }
    let mut profile = base;
    profile.set_architectures(Some(vec![Arch::ScmpArchX86_64]));
    profile.set_listener_path(Some(PathBuf::from(listener_path)));
    profile.set_listener_metadata(metadata.map(str::to_owned));
    profile.set_syscalls(Some(syscalls));
    Ok(profile)
}

/// The profile as pretty JSON.
pub fn render(profile: &LinuxSeccomp) -> String {
    serde_json::to_string_pretty(profile).expect("serialisable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actions_of<'a>(p: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        p.syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|r| r.names().iter().any(|n| n == name))
            .collect()
    }

    #[test]
    fn the_default_profile_allows_and_notifies_the_socket_calls() {
        let p = build(None, Path::new("/run/x.sock"), Some("appshot.aid=a")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&render(&p)).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(
            json["architectures"],
            serde_json::json!(["SCMP_ARCH_X86_64"])
        );
        assert_eq!(json["listenerPath"], "/run/x.sock");
        assert_eq!(json["listenerMetadata"], "appshot.aid=a");
        for n in NOTIFIED {
            let rules = actions_of(&p, n);
            assert_eq!(rules.len(), 1, "{n}");
            assert_eq!(rules[0].action(), LinuxSeccompAction::ScmpActNotify);
        }
        let sendto = actions_of(&p, "sendto");
        assert_eq!(sendto.len(), 1, "only MSG_FASTOPEN sends notify");
        let arg = sendto[0].args().as_ref().unwrap()[0];
        assert_eq!(
            (arg.index(), arg.value(), arg.value_two()),
            (3, 0x2000_0000, Some(0x2000_0000))
        );
        let uring = actions_of(&p, "io_uring_setup");
        assert_eq!(uring[0].errno_ret(), Some(libc::ENOSYS as u32));
    }

    #[test]
    fn a_deny_by_default_base_keeps_its_rules_and_its_sends() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("config.json");
        std::fs::write(
            &base,
            r#"{"ociVersion":"1.0.2","linux":{"seccomp":{"defaultAction":"SCMP_ACT_ERRNO",
            "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
            "syscalls":[{"names":["read","bind","sendto","socket"],"action":"SCMP_ACT_ALLOW"}]}}}"#,
        )
        .unwrap();
        let p = build(Some(read_base(&base).unwrap()), Path::new("/a"), None).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(
            p.architectures().as_ref().unwrap(),
            &vec![Arch::ScmpArchX86_64]
        );
        let read = actions_of(&p, "read");
        assert_eq!(
            read[0].names(),
            &vec!["read".to_string(), "socket".to_string()]
        );
        assert_eq!(
            actions_of(&p, "bind")[0].action(),
            LinuxSeccompAction::ScmpActNotify
        );
        let sendto = actions_of(&p, "sendto");
        assert_eq!(sendto.len(), 2);
        assert_eq!(sendto[1].action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(sendto[1].args().as_ref().unwrap()[0].value_two(), Some(0));
        assert_eq!(
            actions_of(&p, "socket").len(),
            1,
            "no SCTP rules beside the base's"
        );
    }

    #[test]
    fn a_docker_format_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("seccomp.json");
        std::fs::write(
            &base,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ALLOW","includes":{"caps":["CAP_SYS_ADMIN"]}}]}"#,
        )
        .unwrap();
        let e = read_base(&base).unwrap_err().to_string();
        assert!(e.contains("`includes`"), "{e}");
    }
}
