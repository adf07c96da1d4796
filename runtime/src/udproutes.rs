//! Datagrams routed by AID in the kernel. A supervisor sees no datagram
//! (sendto and recvfrom are not notified), so the registry's UDP
//! translations are handed to the kernel, rebuilt whenever they change:
//!
//! - cgroup sock_addr programs (`sys/bpf/udproutes.bpf.c`, attached to the
//!   registry's cgroup, pinned in bpffs): a datagram sent from a socket of
//!   AID A's cgroup to a local address and a virtual port V that an
//!   instance of A serves leaves for that instance's real port, and a
//!   datagram received from a real port shows its virtual port. Only the
//!   port named by the call changes: no packet is rewritten, no flow is
//!   bound to a route. Their maps are this module's [`Plan::routes`].
//! - `…/udp/mark`, nftables filter output: a datagram from any supervised
//!   socket to a local V that it still addresses as V (its AID has no
//!   instance there, or has one that holds V itself) is marked unless its
//!   AID holds V; so is one sent to an instance's real port by a socket
//!   of another AID.
//! - `…/udp/rej`, filter input: marked datagrams are rejected with ICMP
//!   port unreachable, exactly what a closed port answers: a connected
//!   socket gets ECONNREFUSED, an unconnected one nothing. They never reach
//!   another AID's instance, even one that holds V itself.
//!
//! A connected socket is connected to the real port by the supervisor
//! (connect is notified), which also answers its getpeername; the
//! programs show its datagrams' source as virtual.
//!
//! Processes outside appshot's cgroups (the host, containers of the OCI
//! agent) are not matched and reach V as they would without appshot. The
//! plan is pure and unit-tested; applying it runs under the registry lock,
//! from the registry's UDP change hook.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use appshot_sys::udpbpf::{self, Entries, RouteKey, UdpRoutes};
use appshot_vpm::{Protocol, RegistryState, Translation};
use tracing::{debug, warn};

use crate::cgroup;
use crate::sourcerules::{nft, registry_tag, TABLE};

/// The conntrack mark of refused flows ("apsu").
const REFUSED: u32 = 0x6170_7375;
/// After conntrack (-200), which the mark needs.
const MARK_PRIORITY: i32 = -150;

/// The chain names of the registry at `registry_dir`.
pub fn chains(registry_dir: &Path) -> [String; 2] {
    let tag = registry_tag(registry_dir);
    ["mark", "rej"].map(|kind| format!("as_{tag}/udp/{kind}"))
}

/// What the kernel is given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The programs' routes and reverse routes (the host's addresses are
    /// read when the plan is applied).
    pub routes: Entries,
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

/// An address as the programs compare it: 16 bytes in network order,
/// IPv4 mapped (its wildcard `::ffff:0.0.0.0`, apart from IPv6's `::`).
fn key_addr(ip: IpAddr) -> [u8; 16] {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn has_v4_sibling(udp: &[&Translation], t: &Translation) -> bool {
    udp.iter().any(|o| {
        o.owner == t.owner
            && o.virtual_port == t.virtual_port
            && matches!(canonical(o.addr), IpAddr::V4(_))
    })
}

/// The kernel's part for the registry's UDP translations; `aids` gives
/// each AID's cgroup id (translations of an AID without one are left
/// out), `root` is the cgroup2 mount, `tag` the registry's.
pub fn plan(state: &RegistryState, aids: &BTreeMap<String, u64>, root: &Path, tag: &str) -> Plan {
    let mut udp: Vec<&Translation> = state
        .translations
        .iter()
        .filter(|t| t.protocol == Protocol::Udp)
        .collect();
    // The first translation of a key wins, in a stable order.
    udp.sort_by_key(|t| (t.virtual_port, t.aid.clone(), t.real_port));
    let mut out = Plan::default();
    if udp.is_empty() {
        return out;
    }
    let key = |aid: u64, addr: [u8; 16], port: u16| RouteKey {
        aid,
        addr,
        port: u32::from(port),
        pad: 0,
    };
    let routes = &mut out.routes.routes;
    // Each socket's own address first; then what a dual-stack `::` takes
    // of IPv4, where no IPv4 socket of the AID claims it.
    for t in &udp {
        let Some(&aid) = aids.get(&t.aid) else {
            continue;
        };
        if t.real_port != t.virtual_port {
            routes
                .entry(key(aid, key_addr(t.addr), t.virtual_port))
                .or_insert(u32::from(t.real_port));
            out.routes
                .reverse
                .insert(u32::from(t.real_port), u32::from(t.virtual_port));
        }
    }
    for t in &udp {
        let Some(&aid) = aids.get(&t.aid) else {
            continue;
        };
        let dual = t.addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && !has_v4_sibling(&udp, t);
        if dual && t.real_port != t.virtual_port {
            let v4_any = key_addr(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
            routes
                .entry(key(aid, v4_any, t.virtual_port))
                .or_insert(u32::from(t.real_port));
        }
    }
    // A flow's verdict is its first datagram's (the mark is the flow's):
    // the datagrams after it, and every other packet the host sends once
    // its connection is set up, skip the rest.
    out.mark.push("ct state != new return".into());
    let mut seen = BTreeSet::new();
    for t in udp.iter().filter(|t| t.real_port == t.virtual_port) {
        let from = format!(
            "socket cgroupv2 level {} \"{}\"",
            cgroup::AID_LEVEL,
            cgroup::nft_path(root, tag, &t.aid)
        );
        let to = destination(t.addr, has_v4_sibling(&udp, t));
        let allow = format!("udp dport {} {to} {from} return", t.virtual_port);
        if seen.insert(allow.clone()) {
            out.mark.push(allow);
        }
    }
    // A real port is its own AID's: another's datagrams sent to it
    // directly are refused as well.
    let mut ports: BTreeSet<u16> = udp.iter().map(|t| t.virtual_port).collect();
    for t in udp.iter().filter(|t| t.real_port != t.virtual_port) {
        let from = format!(
            "socket cgroupv2 level {} \"{}\"",
            cgroup::AID_LEVEL,
            cgroup::nft_path(root, tag, &t.aid)
        );
        out.mark.push(format!(
            "udp dport {} fib daddr type local {from} return",
            t.real_port
        ));
        ports.insert(t.real_port);
    }
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
pub fn script(chains: &[String; 2], plan: &Plan) -> String {
    let mut s = format!("add table {TABLE}\n");
    let specs = [
        format!("type filter hook output priority {MARK_PRIORITY}"),
        format!("type filter hook input priority {MARK_PRIORITY}"),
    ];
    let rules = [&plan.mark, &plan.reject];
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

/// The host's addresses, as the programs compare them.
fn host_addresses() -> BTreeSet<[u8; 16]> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return BTreeSet::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .map(key_addr)
        .collect()
}

/// Where the registry's programs are pinned: named after its cgroup's id
/// too, so that pins left attached to a cgroup since removed are told
/// apart and dropped.
fn pin_dir(tag: &str, scope: &Path) -> std::io::Result<PathBuf> {
    let id = std::fs::metadata(scope)?.ino();
    Ok(Path::new(udpbpf::BPFFS)
        .join("appshot")
        .join(format!("{tag}-{id}")))
}

/// Gives the programs `plan`'s routes, attaching them first if they are
/// not; or detaches them when there are none.
fn install_routes(root: &Path, tag: &str, plan: &Plan) -> Result<(), String> {
    let scope = cgroup::scope_dir(root, tag);
    let mine = pin_dir(tag, &scope).map_err(|e| format!("{}: {e}", scope.display()))?;
    let parent = mine.parent().expect("below bpffs");
    for other in udpbpf::pin_dirs(parent, &format!("{tag}-")) {
        if other != mine || plan.routes.routes.is_empty() {
            udpbpf::detach(&other).map_err(|e| chain(&e))?;
        }
    }
    if plan.routes.routes.is_empty() {
        return Ok(());
    }
    udpbpf::ensure_bpffs().map_err(|e| chain(&e))?;
    let mut routes =
        UdpRoutes::attach(&mine, &scope, u32::from(cgroup::AID_LEVEL)).map_err(|e| chain(&e))?;
    let entries = Entries {
        locals: host_addresses(),
        ..plan.routes.clone()
    };
    routes.sync(&entries).map_err(|e| chain(&e))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let _ = write!(s, ": {inner}");
        source = inner.source();
    }
    s
}

/// The registry's UDP change hook: the kernel's routes follow the
/// committed state, and flows that the change made wrong are forgotten.
pub fn refresh(registry_dir: &Path, before: &RegistryState, state: &RegistryState) {
    let Some(root) = cgroup::root() else {
        return;
    };
    let tag = registry_tag(registry_dir);
    // nftables resolves a cgroup path when the rule is loaded, and the
    // programs compare cgroup ids: every AID named must have its directory.
    let mut aids = BTreeMap::new();
    for t in state
        .translations
        .iter()
        .filter(|t| t.protocol == Protocol::Udp)
    {
        if aids.contains_key(&t.aid) {
            continue;
        }
        match cgroup::ensure_aid_dir(root, &tag, &t.aid).and_then(std::fs::metadata) {
            Ok(m) => {
                aids.insert(t.aid.clone(), m.ino());
            }
            Err(e) => {
                warn!(aid = %t.aid, "UDP routes not installed: creating the AID's cgroup: {e}");
                return;
            }
        }
    }
    let plan = plan(state, &aids, root, &tag);
    if let Err(e) = install_routes(root, &tag, &plan) {
        warn!("UDP routes not installed, datagrams to virtual ports are refused: {e}");
    }
    match nft(&script(&chains(registry_dir), &plan)) {
        Ok(()) => debug!(routes = plan.routes.routes.len(), "UDP routes installed"),
        Err(e) => {
            warn!("UDP refusals not installed, datagrams to virtual ports are not refused: {e}");
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
    /// Sent to `virtual_port` and refused, when an instance came.
    Refused { virtual_port: u16 },
    /// Sent to `virtual_port` and let through to whatever holds it, when
    /// the AIDs whose instances hold the virtual port itself changed.
    PassedThrough { virtual_port: u16 },
}

/// The flows a change from `before` to `after` made wrong. Conntrack keeps
/// a flow's first verdict (refused or let through) while the flow lasts,
/// 30 s to 120 s after its last datagram: a client that sends on from one
/// socket would go on being refused after an instance of its AID came, or
/// reach the socket that holds the virtual port after it changed hands to
/// another AID. Datagrams the programs route go to real ports, as flows of
/// their own, which no change makes wrong.
pub fn stale_flows(before: &RegistryState, after: &RegistryState) -> BTreeSet<Flows> {
    let udp = |s: &RegistryState| -> BTreeSet<(u16, u16, String)> {
        s.translations
            .iter()
            .filter(|t| t.protocol == Protocol::Udp)
            .map(|t| (t.virtual_port, t.real_port, t.aid.clone()))
            .collect()
    };
    let (old, new) = (udp(before), udp(after));
    let mut out = BTreeSet::new();
    for (virtual_port, real_port, _) in old.symmetric_difference(&new) {
        if virtual_port == real_port {
            out.insert(Flows::PassedThrough {
                virtual_port: *virtual_port,
            });
        }
    }
    for (virtual_port, _, _) in new.difference(&old) {
        out.insert(Flows::Refused {
            virtual_port: *virtual_port,
        });
    }
    out
}

impl Flows {
    fn args(&self) -> Vec<String> {
        let mut a = vec!["-D".to_string(), "-p".into(), "udp".into()];
        let (v, more) = match *self {
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

    fn aids() -> BTreeMap<String, u64> {
        [("a", 101), ("b", 102), ("c", 103)]
            .into_iter()
            .map(|(aid, id)| (aid.to_string(), id))
            .collect()
    }

    fn key(aid: u64, addr: &str, port: u16) -> RouteKey {
        RouteKey {
            aid,
            addr: key_addr(addr.parse().unwrap()),
            port: u32::from(port),
            pad: 0,
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
            &aids(),
            Path::new(ROOT),
            "t",
        );
        // a holds the fixed port itself: its datagrams need no route.
        assert_eq!(
            p.routes.routes,
            BTreeMap::from([(key(102, "0.0.0.0", 5353), 20001)])
        );
        assert_eq!(p.routes.reverse, BTreeMap::from([(20001, 5353)]));
        let a = "socket cgroupv2 level 3 \"unified/appshot/t/a\"";
        let b = "socket cgroupv2 level 3 \"unified/appshot/t/b\"";
        let scope = "socket cgroupv2 level 2 \"unified/appshot/t\"";
        let local4 = "meta nfproto ipv4 fib daddr type local";
        assert_eq!(
            p.mark,
            [
                "ct state != new return".to_string(),
                format!("udp dport 5353 {local4} {a} return"),
                format!("udp dport 20001 fib daddr type local {b} return"),
                format!("udp dport 5353 fib daddr type local {scope} ct mark set 0x61707375"),
                format!("udp dport 20001 fib daddr type local {scope} ct mark set 0x61707375"),
            ]
        );
        assert_eq!(
            p.reject,
            ["ct mark 0x61707375 ct direction original reject"]
        );
    }

    #[test]
    fn addresses_are_keyed_as_the_programs_compare_them() {
        assert_eq!(
            key_addr("127.0.0.2".parse().unwrap()),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 2]
        );
        assert_eq!(
            key_addr("::ffff:127.0.0.2".parse().unwrap()),
            key_addr("127.0.0.2".parse().unwrap())
        );
        assert_ne!(
            key_addr("0.0.0.0".parse().unwrap()),
            key_addr("::".parse().unwrap())
        );
    }

    #[test]
    fn a_dual_stack_wildcard_takes_ipv4_unless_a_socket_of_its_own_or_its_aid_does() {
        let p = plan(
            &state(vec![udp("a", "::", 53, 20002), udp("b", "::", 53, 20003)]),
            &aids(),
            Path::new(ROOT),
            "t",
        );
        assert_eq!(
            p.routes.routes,
            BTreeMap::from([
                (key(101, "::", 53), 20002),
                (key(101, "0.0.0.0", 53), 20002),
                (key(102, "::", 53), 20003),
                (key(102, "0.0.0.0", 53), 20003),
            ])
        );
        // One server binding both families, IPV6_V6ONLY on the second.
        let mut v4 = udp("a", "0.0.0.0", 53, 20004);
        let mut v6 = udp("a", "::", 53, 20005);
        v4.owner = "dns".into();
        v6.owner = "dns".into();
        let p = plan(&state(vec![v6, v4]), &aids(), Path::new(ROOT), "t");
        assert_eq!(
            p.routes.routes,
            BTreeMap::from([
                (key(101, "0.0.0.0", 53), 20004),
                (key(101, "::", 53), 20005),
            ])
        );
        // A specific IPv4 socket of another instance of the AID keeps its
        // address; the wildcard's IPv4 stays the dual-stack socket's.
        let p = plan(
            &state(vec![
                udp("a", "::", 53, 20006),
                udp("a", "127.0.0.2", 53, 20007),
            ]),
            &aids(),
            Path::new(ROOT),
            "t",
        );
        assert_eq!(
            p.routes.routes,
            BTreeMap::from([
                (key(101, "::", 53), 20006),
                (key(101, "0.0.0.0", 53), 20006),
                (key(101, "127.0.0.2", 53), 20007),
            ])
        );
    }

    #[test]
    fn an_aid_without_a_cgroup_gets_no_route() {
        let p = plan(
            &state(vec![udp("z", "0.0.0.0", 53, 20008)]),
            &aids(),
            Path::new(ROOT),
            "t",
        );
        assert!(p.routes.routes.is_empty());
        assert!(
            p.mark
                .iter()
                .any(|r| r.starts_with("udp dport 53 ") && r.contains("mark set")),
            "its datagrams to the fixed port stay refused: {:?}",
            p.mark
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
            [Flows::Refused { virtual_port: 53 }],
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
                "--mark",
                "1634759541"
            ]
        );
        // The fixed port changes hands: what a's clients sent to it goes.
        let handed = state(vec![udp("b", "0.0.0.0", 53, 53)]);
        let flows = stale_flows(&state(vec![udp("a", "0.0.0.0", 53, 53)]), &handed);
        assert!(flows.contains(&Flows::PassedThrough { virtual_port: 53 }));
        assert!(stale_flows(&after, &after).is_empty());
    }

    #[test]
    fn tcp_translations_make_no_udp_rules_and_no_rules_remove_the_chains() {
        let mut tcp = udp("a", "0.0.0.0", 80, 20005);
        tcp.protocol = Protocol::Tcp;
        let p = plan(&state(vec![tcp]), &aids(), Path::new(ROOT), "t");
        assert_eq!(p, Plan::default());
        let s = script(&chains(Path::new("/nonexistent")), &p);
        assert_eq!(s.matches("delete chain").count(), 2, "{s}");
        assert!(!s.contains("add rule"), "{s}");
    }
}
