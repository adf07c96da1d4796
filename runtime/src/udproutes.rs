//! Datagrams routed by AID in the kernel. A supervisor sees no datagram
//! (sendto and recvfrom are not notified), so the registry's UDP
//! translations become nftables rules, rebuilt whenever they change:
//!
//! - `…/udp/nat`, nat output: a datagram from a socket of AID A's cgroup
//!   (`cgroup`) to a local address and a virtual port V that an instance
//!   of A serves goes to that instance's real port. Conntrack keeps the
//!   mapping for the flow, so replies come back from the virtual port (what
//!   `recvfrom` shows), and a connected socket's peer stays virtual.
//! - `…/udp/mark`, filter output before NAT: a datagram from any supervised
//!   socket to a local V that no instance of its AID serves is marked; the
//!   AIDs that are served return first.
//! - `…/udp/rej`, filter input: marked datagrams are rejected with ICMP
//!   port unreachable, exactly what a closed port answers: a connected
//!   socket gets ECONNREFUSED, an unconnected one nothing. They never reach
//!   another AID's instance, even one that holds V itself.
//!
//! Processes outside appshot's cgroups (the host, containers of the OCI
//! agent) are not matched and reach V as they would without appshot. The
//! plan is pure and unit-tested; applying it runs `nft -f -`, under the
//! registry lock, from the registry's UDP change hook.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use appshot_vpm::{Protocol, RegistryState, Translation};
use tracing::{debug, warn};

use crate::cgroup;
use crate::sourcerules::{nft, registry_tag, TABLE};

/// The conntrack mark of refused flows ("apsu").
const REFUSED: u32 = 0x6170_7375;
/// Before NAT (-100), after conntrack (-200), which the mark needs.
const MARK_PRIORITY: i32 = -150;

/// The chain names of the registry at `registry_dir`.
pub fn chains(registry_dir: &Path) -> [String; 3] {
    let tag = registry_tag(registry_dir);
    ["nat", "mark", "rej"].map(|kind| format!("as_{tag}/udp/{kind}"))
}

/// The rules of each chain.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub nat: Vec<String>,
    pub mark: Vec<String>,
    pub reject: Vec<String>,
}

/// Which destinations a translation's socket receives: its own address,
/// or every local one for a wildcard. `::` takes IPv4 too (a dual-stack
/// socket) unless its instance has an IPv4 socket of its own on the port,
/// as servers that bind both families do, with IPV6_V6ONLY on the second.
fn destination(addr: IpAddr, has_v4_sibling: bool) -> String {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => "meta nfproto ipv4 fib daddr type local".into(),
        IpAddr::V6(a) if a.is_unspecified() && has_v4_sibling => {
            "meta nfproto ipv6 fib daddr type local".into()
        }
        IpAddr::V6(a) if a.is_unspecified() => "fib daddr type local".into(),
        IpAddr::V4(a) => format!("ip daddr {a}"),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => format!("ip daddr {v4}"),
            None => format!("ip6 daddr {a}"),
        },
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Where the NAT sends a datagram for `t`: the destination address kept
/// (a wildcard's: the loopback address of its family, which a wildcard
/// socket receives), the port made real.
fn target(t: &Translation) -> String {
    match t.addr {
        a if a.is_unspecified() => format!("redirect to :{}", t.real_port),
        IpAddr::V4(a) => format!("dnat ip to {a}:{}", t.real_port),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => format!("dnat ip to {v4}:{}", t.real_port),
            None => format!("dnat ip6 to [{a}]:{}", t.real_port),
        },
    }
}

/// The rules for the registry's UDP translations; `root` is the cgroup2
/// mount, `tag` the registry's.
pub fn plan(state: &RegistryState, root: &Path, tag: &str) -> Plan {
    let mut udp: Vec<&Translation> = state
        .translations
        .iter()
        .filter(|t| t.protocol == Protocol::Udp)
        .collect();
    // The kernel takes the first NAT rule that matches: a specific address
    // before a wildcard (as the kernel's own socket lookup prefers), then a
    // stable order within an AID's group.
    udp.sort_by_key(|t| {
        (
            t.virtual_port,
            t.addr.is_unspecified(),
            t.aid.clone(),
            t.real_port,
        )
    });
    let mut out = Plan::default();
    if udp.is_empty() {
        return out;
    }
    // A flow's verdict is its first datagram's (the mark is the flow's):
    // the datagrams after it, and every other packet the host sends once
    // its connection is set up, skip the rest.
    out.mark.push("ct state != new return".into());
    let mut seen = BTreeSet::new();
    for t in &udp {
        let from = format!(
            "socket cgroupv2 level {} \"{}\"",
            cgroup::AID_LEVEL,
            cgroup::nft_path(root, tag, &t.aid)
        );
        let has_v4_sibling = udp.iter().any(|o| {
            o.owner == t.owner
                && o.virtual_port == t.virtual_port
                && matches!(canonical(o.addr), IpAddr::V4(_))
        });
        let to = destination(t.addr, has_v4_sibling);
        let v = t.virtual_port;
        // A socket that holds the virtual port itself needs no rewrite, but
        // its datagrams must not meet a later rule (the first NAT rule that
        // matches decides).
        let verdict = if t.real_port == v {
            "accept".to_string()
        } else {
            target(t)
        };
        // The cheapest test first: every packet of the host passes here.
        out.nat.push(format!("udp dport {v} {to} {from} {verdict}"));
        let allow = format!("udp dport {v} {to} {from} return");
        if seen.insert(allow.clone()) {
            out.mark.push(allow);
        }
    }
    let ports: BTreeSet<u16> = udp.iter().map(|t| t.virtual_port).collect();
    let scope = format!(
        "socket cgroupv2 level {} \"{}\"",
        cgroup::SCOPE_LEVEL,
        cgroup::nft_scope(root, tag)
    );
    for v in ports {
        out.mark.push(format!(
            "udp dport {v} fib daddr type local {scope} ct mark set {REFUSED:#x}"
        ));
    }
    out.reject
        .push(format!("ct mark {REFUSED:#x} ct direction original reject"));
    out
}

/// The `nft -f` script that replaces the chains with `plan`, or removes
/// them when it is empty.
pub fn script(chains: &[String; 3], plan: &Plan) -> String {
    let mut s = format!("add table {TABLE}\n");
    let specs = [
        "type nat hook output priority -100".to_string(),
        format!("type filter hook output priority {MARK_PRIORITY}"),
        format!("type filter hook input priority {MARK_PRIORITY}"),
    ];
    let rules = [&plan.nat, &plan.mark, &plan.reject];
    let empty = rules.iter().all(|r| r.is_empty());
    for ((chain, spec), rules) in chains.iter().zip(&specs).zip(rules) {
        let _ = writeln!(
            s,
            "add chain {TABLE} {chain} {{ {spec} ; policy accept ; }}"
        );
        if empty {
            // nft 1.0.6 has no `destroy`: added first, the deletion is
            // always valid.
            let _ = writeln!(s, "delete chain {TABLE} {chain}");
            continue;
        }
        let _ = writeln!(s, "flush chain {TABLE} {chain}");
        for rule in rules {
            let _ = writeln!(s, "add rule {TABLE} {chain} {rule}");
        }
    }
    s
}

/// The registry's UDP change hook: the kernel's rules follow the committed
/// state, and flows that the change made wrong are forgotten.
pub fn refresh(registry_dir: &Path, before: &RegistryState, state: &RegistryState) {
    let Some(root) = cgroup::root() else {
        return;
    };
    let tag = registry_tag(registry_dir);
    // nftables resolves a cgroup path when the rule is loaded: every AID
    // named must have its directory.
    let aids: BTreeSet<&str> = state
        .translations
        .iter()
        .filter(|t| t.protocol == Protocol::Udp)
        .map(|t| t.aid.as_str())
        .collect();
    for aid in aids {
        if let Err(e) = cgroup::ensure_aid_dir(root, &tag, aid) {
            warn!(%aid, "UDP routes not installed: creating the AID's cgroup: {e}");
            return;
        }
    }
    let plan = plan(state, root, &tag);
    match nft(&script(&chains(registry_dir), &plan)) {
        Ok(()) => debug!(rules = plan.nat.len(), "UDP routes installed"),
        Err(e) => {
            warn!("UDP routes not installed, datagrams to virtual ports are not routed: {e}");
            return;
        }
    }
    for flows in stale_flows(before, state) {
        forget(&flows);
    }
}

/// Conntrack flows, by what selects them (`conntrack -D` arguments).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flows {
    /// Sent to virtual port `virtual_port` and answered from real port
    /// `real_port`, which no longer serves it.
    ToRealPort { virtual_port: u16, real_port: u16 },
    /// Sent to `virtual_port` and refused, when an instance came.
    Refused { virtual_port: u16 },
    /// Sent to `virtual_port` and passed through unchanged, when an
    /// instance came that now holds another real port for it.
    PassedThrough { virtual_port: u16 },
}

/// The flows a change from `before` to `after` made wrong. Conntrack keeps
/// a flow's first verdict (NAT or refusal) while the flow lasts, 30 s to
/// 120 s after its last datagram: a client that sends on from one socket
/// would go on reaching a port nobody serves, or being refused, after the
/// instance it should reach changed. Flows still right are left alone: a
/// forgotten flow's answer in flight would come back from the real port.
pub fn stale_flows(before: &RegistryState, after: &RegistryState) -> BTreeSet<Flows> {
    let udp = |s: &RegistryState| -> BTreeSet<(u16, u16)> {
        s.translations
            .iter()
            .filter(|t| t.protocol == Protocol::Udp)
            .map(|t| (t.virtual_port, t.real_port))
            .collect()
    };
    let (old, new) = (udp(before), udp(after));
    let mut out = BTreeSet::new();
    for &(virtual_port, real_port) in old.difference(&new) {
        out.insert(Flows::ToRealPort {
            virtual_port,
            real_port,
        });
    }
    for &(virtual_port, _) in new.difference(&old) {
        out.insert(Flows::Refused { virtual_port });
        if !new.contains(&(virtual_port, virtual_port)) {
            out.insert(Flows::PassedThrough { virtual_port });
        }
    }
    out
}

impl Flows {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["-D".to_string(), "-p".into(), "udp".into()];
        let (v, more) = match *self {
            Flows::ToRealPort {
                virtual_port,
                real_port,
            } => (
                virtual_port,
                vec!["--reply-port-src".into(), real_port.to_string()],
            ),
            Flows::Refused { virtual_port } => {
                (virtual_port, vec!["--mark".into(), REFUSED.to_string()])
            }
            Flows::PassedThrough { virtual_port } => (
                virtual_port,
                vec!["--reply-port-src".into(), virtual_port.to_string()],
            ),
        };
        a.extend(["--orig-port-dst".into(), v.to_string()]);
        a.extend(more);
        a
    }
}

/// Deletes `flows` from conntrack with the `conntrack` tool (conntrack-tools);
/// without it, they expire on their own, which the log says once.
fn forget(flows: &Flows) {
    let out = std::process::Command::new("conntrack")
        .args(flows.args())
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        // Exit status 1 with "0 flow entries have been deleted": none.
        Ok(o) if o.status.success() || o.status.code() == Some(1) => {
            debug!(?flows, "{}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(o) => warn!(
            ?flows,
            "conntrack -D failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => {
            static TOLD: std::sync::Once = std::sync::Once::new();
            TOLD.call_once(|| {
                warn!("running conntrack: {e}: UDP flows keep their old route until they expire (install conntrack)")
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(aid: &str, addr: &str, virtual_port: u16, real_port: u16) -> Translation {
        Translation {
            protocol: Protocol::Udp,
            addr: addr.parse().unwrap(),
            virtual_port,
            aid: aid.into(),
            real_port,
            owner: format!("{aid}-{real_port}"),
            socket_inode: u64::from(real_port),
        }
    }

    fn state(translations: Vec<Translation>) -> RegistryState {
        RegistryState {
            translations,
            ..RegistryState::default()
        }
    }

    const ROOT: &str = "/sys/fs/cgroup/unified";

    #[test]
    fn each_aid_goes_to_its_own_real_port_and_others_are_refused() {
        let p = plan(
            &state(vec![
                udp("b", "0.0.0.0", 5353, 20001),
                udp("a", "0.0.0.0", 5353, 5353),
            ]),
            Path::new(ROOT),
            "t",
        );
        let a = "socket cgroupv2 level 3 \"unified/appshot/t/a\"";
        let b = "socket cgroupv2 level 3 \"unified/appshot/t/b\"";
        let local4 = "meta nfproto ipv4 fib daddr type local";
        // a holds the fixed port itself: no rewrite, but no later rule.
        assert_eq!(
            p.nat,
            [
                format!("udp dport 5353 {local4} {a} accept"),
                format!("udp dport 5353 {local4} {b} redirect to :20001"),
            ]
        );
        assert_eq!(
            p.mark,
            [
                "ct state != new return".to_string(),
                format!("udp dport 5353 {local4} {a} return"),
                format!("udp dport 5353 {local4} {b} return"),
                "udp dport 5353 fib daddr type local socket cgroupv2 level 2 \"unified/appshot/t\" ct mark set 0x61707375".to_string(),
            ]
        );
        assert_eq!(
            p.reject,
            ["ct mark 0x61707375 ct direction original reject"]
        );
    }

    #[test]
    fn specific_addresses_come_first_and_keep_their_address() {
        let p = plan(
            &state(vec![
                udp("a", "::", 53, 20002),
                udp("a", "127.0.0.2", 53, 20003),
                udp("a", "::1", 53, 20004),
            ]),
            Path::new("/sys/fs/cgroup"),
            "t",
        );
        let a = "socket cgroupv2 level 3 \"appshot/t/a\"";
        assert_eq!(
            p.nat,
            [
                format!("udp dport 53 ip daddr 127.0.0.2 {a} dnat ip to 127.0.0.2:20003"),
                format!("udp dport 53 ip6 daddr ::1 {a} dnat ip6 to [::1]:20004"),
                format!("udp dport 53 fib daddr type local {a} redirect to :20002"),
            ]
        );
    }

    #[test]
    fn a_v6_wildcard_beside_a_v4_socket_takes_ipv6_alone() {
        let mut v4 = udp("a", "0.0.0.0", 53, 53);
        let mut v6 = udp("a", "::", 53, 20006);
        v4.owner = "dns".into();
        v6.owner = "dns".into();
        let p = plan(&state(vec![v6, v4]), Path::new(ROOT), "t");
        let a = "socket cgroupv2 level 3 \"unified/appshot/t/a\"";
        assert_eq!(
            p.nat,
            [
                format!("udp dport 53 meta nfproto ipv4 fib daddr type local {a} accept"),
                format!(
                    "udp dport 53 meta nfproto ipv6 fib daddr type local {a} redirect to :20006"
                ),
            ]
        );
    }

    #[test]
    fn a_change_forgets_only_the_flows_it_made_wrong() {
        let before = state(vec![
            udp("a", "0.0.0.0", 53, 53),
            udp("b", "0.0.0.0", 53, 20001),
        ]);
        // b's instance replaced (new real port), c arrives.
        let after = state(vec![
            udp("a", "0.0.0.0", 53, 53),
            udp("b", "0.0.0.0", 53, 20002),
            udp("c", "0.0.0.0", 53, 20003),
        ]);
        let flows: Vec<Flows> = stale_flows(&before, &after).into_iter().collect();
        assert_eq!(
            flows,
            [
                Flows::ToRealPort {
                    virtual_port: 53,
                    real_port: 20001
                },
                Flows::Refused { virtual_port: 53 },
            ],
            "a still holds 53 itself: what passed through to it is right"
        );
        assert_eq!(
            flows[0].args(),
            [
                "-D",
                "-p",
                "udp",
                "--orig-port-dst",
                "53",
                "--reply-port-src",
                "20001"
            ]
        );
        let first = stale_flows(&state(vec![]), &state(vec![udp("b", "0.0.0.0", 53, 20001)]));
        assert!(first.contains(&Flows::PassedThrough { virtual_port: 53 }));
        assert!(stale_flows(&after, &after).is_empty());
    }

    #[test]
    fn tcp_translations_make_no_udp_rules_and_no_rules_remove_the_chains() {
        let mut tcp = udp("a", "0.0.0.0", 80, 20005);
        tcp.protocol = Protocol::Tcp;
        let p = plan(&state(vec![tcp]), Path::new(ROOT), "t");
        assert_eq!(p, Plan::default());
        let s = script(&chains(Path::new("/nonexistent")), &p);
        assert_eq!(s.matches("delete chain").count(), 3, "{s}");
        assert!(!s.contains("add rule"), "{s}");
    }
}
