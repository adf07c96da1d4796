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
//!   AID holds V, and so is one sent to an instance's real port by a
//!   socket of another AID.
//! - `…/udp/rej`, filter input: marked datagrams are rejected with ICMP
//!   port unreachable, exactly what a closed port answers (a connected
//!   socket gets ECONNREFUSED, an unconnected one nothing; rejected on
//!   output, the sender would get EPERM instead). They never reach another
//!   AID's instance, even one that holds V itself.
//!
//! The rules keep no state (a packet mark, not a conntrack flow), so no
//! change of the translations leaves a stale verdict behind.
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

use crate::error::chain;
use crate::net::sourcerules::{nft, registry_tag, TABLE};
use crate::net::{cgroup, connroutes};

/// The packet mark of refused datagrams ("apsu"), set on output and
/// read on input (loopback keeps it).
const REFUSED: u32 = 0x6170_7375;
/// The standard filter priority: the rules need neither conntrack nor NAT.
const PRIORITY: i32 = 0;

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
    // Per port, the AIDs it is theirs to reach return first; then every
    // other supervised socket is refused. Every datagram of a routed
    // request passes these rules, so the cheap matches come first: the
    // socket's cgroup before a route lookup (`fib`). A real port's return
    // needs none: only a local destination is ever marked, so returning
    // early for another changes no verdict (a fib lookup per request cost
    // 2.5 % of the one-CPU request/response rate).
    let scope = format!(
        "socket cgroupv2 level {} \"{}\"",
        cgroup::SCOPE_LEVEL,
        cgroup::nft_scope(root, tag)
    );
    let aid_of = |t: &Translation| {
        format!(
            "socket cgroupv2 level {} \"{}\"",
            cgroup::AID_LEVEL,
            cgroup::nft_path(root, tag, &t.aid)
        )
    };
    let mut rules: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
    for t in &udp {
        let v = t.virtual_port;
        let allowed = rules.entry(v).or_default();
        if t.real_port == v {
            let to = destination(t.addr, has_v4_sibling(&udp, t));
            allowed.insert(format!("udp dport {v} {} {to} return", aid_of(t)));
        } else {
            // A real port is its own AID's: another's datagrams sent to
            // it directly are refused as well.
            rules.entry(t.real_port).or_default().insert(format!(
                "udp dport {} {} return",
                t.real_port,
                aid_of(t)
            ));
        }
    }
    for (port, allowed) in rules {
        out.mark.extend(allowed);
        out.mark.push(format!(
            "udp dport {port} {scope} fib daddr type local meta mark set {REFUSED:#x}"
        ));
    }
    out.reject.push(format!("meta mark {REFUSED:#x} reject"));
    out
}

/// The `nft -f` script that replaces the chains with `plan`'s rules, or
/// removes them when there are none.
pub fn script(chains: &[String; 2], plan: &Plan) -> String {
    let mut s = format!("add table {TABLE}\n");
    let rules = [
        (&chains[0], "output", &plan.mark),
        (&chains[1], "input", &plan.reject),
    ];
    for (chain, hook, rules) in rules {
        let _ = writeln!(
            s,
            "add chain {TABLE} {chain} {{ type filter hook {hook} priority {PRIORITY} ; policy accept ; }}"
        );
        if plan.mark.is_empty() {
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

/// Why the programs do not have the plan's routes.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the registry's cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the instance's cgroup {path}")]
    Instance {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup2 below /sys/fs/cgroup")]
    NoCgroup2,
    #[error("an AID's cgroup could not be made")]
    AidCgroup,
    #[error(transparent)]
    Bpf(#[from] udpbpf::BpfError),
    #[error(transparent)]
    Registry(#[from] appshot_vpm::VpmError),
}

/// What the maps are given for `state`: the UDP plan's routes, the
/// connect and name classes, the host's addresses.
fn entries(state: &RegistryState, plan: &Plan, aids: &BTreeMap<String, u64>) -> Entries {
    let tables = connroutes::plan(state, aids);
    Entries {
        locals: host_addresses(),
        connects: tables.connects,
        names: tables.names,
        damaged: tables.damaged,
        ..plan.routes.clone()
    }
}

/// The file in the registry's directory naming (by [`digest`]) the state
/// the connect and name maps were last made to hold: a change that starts
/// from that state alters only the entries of the ports it touches; after
/// any other (a process killed between its commit and its hook) the maps
/// are made anew.
const SYNCED: &str = "kernel-routes.synced";

/// What the connect and name entries depend on, as one number whatever
/// the order of the translations.
fn digest(state: &RegistryState) -> u64 {
    use std::hash::{Hash, Hasher};
    let hash = |value: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value(&mut h);
        h.finish()
    };
    state
        .translations
        .iter()
        .map(|t| hash(&|h| t.hash(h)))
        .fold(hash(&|h| state.damaged.hash(h)), u64::wrapping_add)
}

fn synced(registry_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(registry_dir.join(SYNCED)).ok()?;
    u64::from_str_radix(text.trim(), 16).ok()
}

/// Records that the maps hold `state`'s entries; failing that, that they
/// are unknown.
fn mark_synced(registry_dir: &Path, state: &RegistryState) {
    let path = registry_dir.join(SYNCED);
    if let Err(e) = std::fs::write(&path, format!("{:016x}\n", digest(state))) {
        warn!(
            "{}: {e}; the next change rebuilds the kernel's routes",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
    }
}

fn forget_synced(registry_dir: &Path) {
    let _ = std::fs::remove_file(registry_dir.join(SYNCED));
}

/// Gives the programs `entries`, attaching them first if they are not; or
/// detaches them when they route no datagram and no instance leaves its
/// calls to them.
fn install_routes(root: &Path, tag: &str, entries: &Entries) -> Result<(), RouteError> {
    let scope = cgroup::scope_dir(root, tag);
    let mine = pin_dir(tag, &scope).map_err(|source| RouteError::Cgroup {
        path: scope.clone(),
        source,
    })?;
    let parent = mine.parent().expect("below bpffs");
    for other in udpbpf::pin_dirs(parent, &format!("{tag}-")) {
        if other != mine {
            udpbpf::detach(&other)?;
        }
    }
    // Looked at under the attach lock: an instance joins the routed list
    // under it, without the registry's.
    let _attaching = attach_lock(&scope)?;
    // The connect and name entries matter only to kernel-routed instances.
    let routed = UdpRoutes::is_current(&mine) && any_routed(&mut UdpRoutes::open(&mine)?, &scope)?;
    if entries.routes.is_empty() && !routed {
        udpbpf::detach(&mine)?;
        return Ok(());
    }
    udpbpf::ensure_bpffs()?;
    let mut routes = UdpRoutes::attach(&mine, &scope, u32::from(cgroup::AID_LEVEL))?;
    Ok(routes.sync_linked(entries, &scope)?)
}

/// Held (on the registry's cgroup directory) while the programs are
/// attached or detached: a kernel-routed start attaches them before its
/// registry transaction, outside the registry lock, as loading them takes
/// 20-30 ms (their loader parses the kernel's BTF), and must not meet a
/// detach or another attach half-way.
fn attach_lock(scope: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, RouteError> {
    let dir = std::fs::File::open(scope).map_err(|source| RouteError::Cgroup {
        path: scope.to_owned(),
        source,
    })?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, errno)| {
        RouteError::Cgroup {
            path: scope.to_owned(),
            source: errno.into(),
        }
    })
}

/// The registry's UDP change hook: the kernel's routes follow the
/// committed state.
pub fn refresh(registry_dir: &Path, state: &RegistryState) {
    let Some(root) = cgroup::root() else {
        return;
    };
    let tag = registry_tag(registry_dir);
    // nftables resolves a cgroup path when the rule is loaded, and the
    // programs compare cgroup ids: every AID named must have its directory.
    let Some(aids) = connroutes::aid_ids(root, &tag, state) else {
        return;
    };
    let plan = plan(state, &aids, root, &tag);
    forget_synced(registry_dir);
    match install_routes(root, &tag, &entries(state, &plan, &aids)) {
        Ok(()) => mark_synced(registry_dir, state),
        Err(e) => warn!(
            "UDP routes not installed, datagrams to virtual ports are refused: {}",
            chain(&e)
        ),
    }
    match nft(&script(&chains(registry_dir), &plan)) {
        Ok(()) => debug!(routes = plan.routes.routes.len(), "UDP routes installed"),
        Err(e) => warn!(
            "UDP refusals not installed, datagrams to virtual ports are not refused: {}",
            chain(&e)
        ),
    }
}

/// The registry's TCP change hook: the maps follow the committed state
/// while some instance leaves its calls to the kernel (which then found
/// them attached); otherwise nothing reads them. From the state the maps
/// hold, only the entries of the ports the change touched are written: a
/// start or stop costs the same with a thousand instances on the host as
/// with one.
pub fn refresh_connects(registry_dir: &Path, before: &RegistryState, after: &RegistryState) {
    let Some(root) = cgroup::root() else {
        return;
    };
    let tag = registry_tag(registry_dir);
    let scope = cgroup::scope_dir(root, &tag);
    let Ok(mine) = pin_dir(&tag, &scope) else {
        return;
    };
    if !UdpRoutes::is_current(&mine) {
        return;
    }
    let synced = (|| {
        let mut routes = UdpRoutes::open(&mine)?;
        if !routes.any_routed()? {
            return Ok(());
        }
        let held = synced(registry_dir);
        if held == Some(digest(after)) {
            // Written by this transaction's UDP hook.
            return Ok(());
        }
        forget_synced(registry_dir);
        if held == Some(digest(before)) && before.damaged == after.damaged {
            let ports = connroutes::changed_ports(before, after);
            let only = connroutes::Ports::Only(&ports);
            let diff = connroutes::diff(
                &connroutes::plan_named(before, only),
                &connroutes::plan_named(after, only),
            );
            let aids = connroutes::ids_of(root, &tag, diff.aids()).ok_or(RouteError::AidCgroup)?;
            let connects: Vec<_> = diff
                .connects
                .iter()
                .filter_map(|(key, route)| connroutes::resolve(key, &aids).map(|k| (k, *route)))
                .collect();
            routes.change(&connects, &diff.names)?;
            debug!(
                ports = ports.len(),
                connects = connects.len(),
                names = diff.names.len(),
                "connect routes changed"
            );
        } else {
            if !any_routed(&mut routes, &scope)? {
                return Ok(());
            }
            let aids = connroutes::aid_ids(root, &tag, after).ok_or(RouteError::AidCgroup)?;
            let plan = plan(after, &aids, root, &tag);
            routes.sync_linked(&entries(after, &plan, &aids), &scope)?;
        }
        mark_synced(registry_dir, after);
        Ok::<_, RouteError>(())
    })();
    if let Err(e) = synced {
        warn!(
            "connect routes not installed, kernel-routed connects may be stale: {}",
            chain(&e)
        );
    }
}

/// Whether an instance of the registry whose cgroup is `scope` is
/// kernel-routed; the listed cgroups that are gone (a supervisor killed
/// before it could take its own out) are taken out first.
fn any_routed(routes: &mut UdpRoutes, scope: &Path) -> Result<bool, udpbpf::BpfError> {
    let listed = routes.routed()?;
    if listed.is_empty() {
        return Ok(false);
    }
    // AID directories, then instance directories below them.
    let live: BTreeSet<u64> = std::fs::read_dir(scope)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|aid| std::fs::read_dir(aid.path()).ok())
        .flatten()
        .flatten()
        .filter_map(|instance| instance.metadata().ok())
        .filter(|m| m.is_dir())
        .map(|m| m.ino())
        .collect();
    let mut any = false;
    for id in listed {
        if live.contains(&id) {
            any = true;
        } else {
            routes.set_routed(id, false)?;
        }
    }
    Ok(any)
}

/// An instance whose connect, getsockname and getpeername the kernel
/// decides, for as long as this lives.
#[derive(Debug)]
pub struct KernelRouted {
    registry: appshot_vpm::Registry,
    pins: PathBuf,
    id: u64,
}

/// Lets the programs decide the calls of the instance in cgroup
/// `instance`: attached (and their maps filled from the registry) under
/// the registry lock, so that no change of the registry is missed.
pub fn route_in_kernel(
    registry: &appshot_vpm::Registry,
    instance: &Path,
) -> Result<KernelRouted, RouteError> {
    let root = cgroup::root().ok_or(RouteError::NoCgroup2)?;
    let tag = registry_tag(registry.dir());
    let scope = cgroup::scope_dir(root, &tag);
    let pins = pin_dir(&tag, &scope).map_err(|source| RouteError::Cgroup {
        path: scope.clone(),
        source,
    })?;
    let id = std::fs::metadata(instance)
        .map_err(|source| RouteError::Instance {
            path: instance.to_owned(),
            source,
        })?
        .ino();
    let dir = registry.dir();
    let routed = |registry: &appshot_vpm::Registry, pins| KernelRouted {
        registry: registry.clone(),
        pins,
        id,
    };
    {
        let _attaching = attach_lock(&scope)?;
        if UdpRoutes::is_current(&pins) {
            // Kept by the change hooks while another instance is routed:
            // this one only joins, without a registry transaction (the
            // attach lock keeps the last one's end from detaching them
            // meanwhile).
            let mut routes = UdpRoutes::open(&pins)?;
            if routes.any_routed()? {
                routes.set_routed(id, true)?;
                return Ok(routed(registry, pins));
            }
        } else {
            // Attached ahead, their maps empty (no instance is routed by
            // them yet), so that the transaction below only fills them.
            udpbpf::ensure_bpffs()?;
            UdpRoutes::attach(&pins, &scope, u32::from(cgroup::AID_LEVEL))?;
        }
    }
    registry.transaction(|state| {
        forget_synced(dir);
        let aids = connroutes::aid_ids(root, &tag, state).ok_or(RouteError::AidCgroup)?;
        let plan = plan(state, &aids, root, &tag);
        // Attached above, unless a change detached them since.
        let mut routes = {
            let _attaching = attach_lock(&scope)?;
            udpbpf::ensure_bpffs()?;
            UdpRoutes::attach(&pins, &scope, u32::from(cgroup::AID_LEVEL))?
        };
        routes.set_routed(id, true)?;
        routes.sync_linked(&entries(state, &plan, &aids), &scope)?;
        mark_synced(dir, state);
        Ok::<_, RouteError>(())
    })??;
    Ok(routed(registry, pins))
}

impl Drop for KernelRouted {
    /// Under the registry lock, as the change hooks: the programs go when
    /// they are left with nothing to do.
    fn drop(&mut self) {
        let Some(root) = cgroup::root() else {
            return;
        };
        let tag = registry_tag(self.registry.dir());
        let dir = self.registry.dir();
        let scope = cgroup::scope_dir(root, &tag);
        let released = self.registry.transaction(|state| {
            if UdpRoutes::is_current(&self.pins) {
                let mut routes = UdpRoutes::open(&self.pins)?;
                routes.set_routed(self.id, false)?;
                // The hooks keep the maps for the others, if any: with no
                // other instance in the registry, the cgroups still listed
                // are those of supervisors killed before they could take
                // theirs out, and are taken out now (looking costs a read
                // of the registry's cgroups, which are few then).
                let others = state.instances.len() > 1;
                if routes.any_routed()? && (others || any_routed(&mut routes, &scope)?) {
                    return Ok::<_, RouteError>(());
                }
            }
            forget_synced(dir);
            let aids = connroutes::aid_ids(root, &tag, state).ok_or(RouteError::AidCgroup)?;
            let plan = plan(state, &aids, root, &tag);
            install_routes(root, &tag, &entries(state, &plan, &aids))?;
            mark_synced(dir, state);
            Ok(())
        });
        match released {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(id = self.id, "releasing the kernel's routes: {}", chain(&e)),
            Err(e) => warn!(id = self.id, "releasing the kernel's routes: {}", chain(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::fixtures::{aids, state, translation};

    fn udp(aid: &str, addr: &str, virtual_port: u16, real_port: u16) -> Translation {
        let owner = format!("{aid}-{real_port}");
        translation(Protocol::Udp, aid, addr, virtual_port, real_port, &owner)
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

    /// The plan of `translations` on a hybrid host, registry tag `t`.
    fn plan_of(translations: Vec<Translation>) -> Plan {
        plan(&state(translations), &aids(), Path::new(ROOT), "t")
    }

    #[test]
    fn each_aid_goes_to_its_own_real_port_and_others_are_refused() {
        let p = plan_of(vec![
            udp("b", "0.0.0.0", 5353, 20001),
            udp("a", "0.0.0.0", 5353, 5353),
        ]);
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
        let mark = "meta mark set 0x61707375";
        assert_eq!(
            p.mark,
            [
                format!("udp dport 5353 {a} {local4} return"),
                format!("udp dport 5353 {scope} fib daddr type local {mark}"),
                format!("udp dport 20001 {b} return"),
                format!("udp dport 20001 {scope} fib daddr type local {mark}"),
            ]
        );
        assert_eq!(p.reject, ["meta mark 0x61707375 reject"]);
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
        let p = plan_of(vec![udp("a", "::", 53, 20002), udp("b", "::", 53, 20003)]);
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
        let p = plan_of(vec![v6, v4]);
        assert_eq!(
            p.routes.routes,
            BTreeMap::from([
                (key(101, "0.0.0.0", 53), 20004),
                (key(101, "::", 53), 20005),
            ])
        );
        // A specific IPv4 socket of another instance of the AID keeps its
        // address; the wildcard's IPv4 stays the dual-stack socket's.
        let p = plan_of(vec![
            udp("a", "::", 53, 20006),
            udp("a", "127.0.0.2", 53, 20007),
        ]);
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
        let p = plan_of(vec![udp("z", "0.0.0.0", 53, 20008)]);
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
    fn tcp_translations_make_no_udp_rules_and_no_rules_remove_the_chains() {
        let mut tcp = udp("a", "0.0.0.0", 80, 20005);
        tcp.protocol = Protocol::Tcp;
        let p = plan_of(vec![tcp]);
        assert_eq!(p, Plan::default());
        let s = script(&chains(Path::new("/nonexistent")), &p);
        assert_eq!(s.matches("delete chain").count(), 2, "{s}");
        assert!(!s.contains("add rule"), "{s}");
    }
}
