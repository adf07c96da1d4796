//! The cost of one notified syscall: getsockname() is trapped by appshot's
//! seccomp filter and answered by the supervisor, so its time under appshot
//! is the round trip of a user notification. getsockopt(SO_TYPE) on the
//! same socket is not trapped and shows what the filter alone costs. A
//! connect to a Unix socket path is the costliest notified call: the
//! supervisor performs it as the task, in a thread that takes on the
//! task's credentials, root, cwd and umask.
//!
//! Two instances of other AIDs share a port meanwhile, so the registry
//! holds a translated port, as on any host that multiplexes: a name is
//! then looked at, not left to the kernel unseen.
//!
//! The floor of a notified call is measured in the same run: the same
//! probe under `notify_floor`, a supervisor that traps the same syscalls
//! and only answers CONTINUE. Its row compares appshot with it; what
//! appshot costs beyond it is appshot's own work. sandlock, a notification
//! sandbox that remaps ports as well, is the peer of that row.
//!
//! The notified rows and the floor's run their client with `--routing
//! notified`, where getsockname goes to the supervisor. Under the default
//! routing (the kernel's) getsockname is not notified at all: the cgroup
//! program renames the port inside the call; its row compares that with
//! native.

use std::time::Duration;

use anyhow::Context;

use super::sandlock;
use super::{argv, Client, Ctx, Outcome, NOTIFIED_ROUTING};
use crate::measure::{interleaved, Unit};
use crate::probes::{self, CONNRATE, NOTIFY_FLOOR, SYSCALL_COST};
use crate::table::Row;

pub const TITLE: &str = "syscall cost";
const TIMEOUT: Duration = Duration::from_secs(120);
/// Only the bind to port 0 and these calls are made: port 0 is never
/// multiplexed, so the socket is a plain kernel socket under appshot too.
const AID: &str = "bench";
const UNTRAPPED_FACTOR: u64 = 20;
/// The instances that share a port while the calls are timed.
const OTHER_AIDS: [&str; 2] = ["other1", "other2"];
/// A Unix connect round (four syscalls, one notified and performed in a
/// thread of its own) costs several notified calls.
const UNIX_CONNECT_DIVISOR: u64 = 10;

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let probe = SYSCALL_COST.build(ctx.work)?;
    let floor = NOTIFY_FLOOR.build(ctx.work)?;
    let decoy = CONNRATE.build(ctx.work)?.display().to_string();
    let port = ctx.ports.take()?;
    let decoy = argv([decoy.as_str(), "decoy", "127.0.0.1", &port.to_string()]);
    let _sharing = OTHER_AIDS
        .iter()
        .map(|aid| ctx.appshot.server(aid, port, &decoy))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("syscall cost: starting two instances on one port")?;
    let sandlock = sandlock::usable()?;
    let mut out = Outcome::default();
    let client = Client {
        appshot: ctx.appshot,
        aid: AID,
        timeout: TIMEOUT,
        figure: |output: &str| Ok(probes::parse_value(output, "ns_per_call")? / 1e3),
    };
    let n = ctx.plan.syscall_iterations;
    // An untrapped call is ~100 times cheaper: more of them keep its run
    // long enough (a quarter second and up) not to be timer noise.
    let cases = [
        (
            "notified syscall",
            "getsockname() on a bound TCP socket",
            "getsockname",
            n,
        ),
        (
            "notified connect as the task",
            "socket + connect(Unix path) + accept + close",
            "unixconnect",
            n / UNIX_CONNECT_DIVISOR,
        ),
        (
            "untrapped syscall",
            "getsockopt(SO_TYPE), same socket",
            "getsockopt",
            n * UNTRAPPED_FACTOR,
        ),
    ];
    for (benchmark, configuration, call, iterations) in cases {
        let args = argv([
            probe.display().to_string(),
            call.to_string(),
            iterations.to_string(),
        ]);
        let with_floor = call == "getsockname";
        // The untrapped call is untrapped either way: it runs as users get it.
        let under_appshot = if call == "getsockopt" {
            client.appshot(args.clone(), "syscall_cost under appshot")
        } else {
            client.appshot_notified(
                args.clone(),
                "syscall_cost under appshot --routing notified",
            )
        };
        let mut trials = vec![
            client.native("native", args.clone(), "syscall_cost (native)"),
            under_appshot,
        ];
        if with_floor {
            let under_floor = std::iter::once(floor.display().to_string())
                .chain(args.iter().cloned())
                .collect();
            trials.push(client.native(FLOOR, under_floor, "syscall_cost under notify_floor"));
            trials.push(client.appshot(args.clone(), "syscall_cost under appshot"));
            if let Ok(peer) = &sandlock {
                trials.push(client.native(
                    "sandlock",
                    peer.argv(&args),
                    "syscall_cost under sandlock",
                ));
            }
        }
        let m = interleaved(benchmark, Unit::MicrosPerCall, ctx.plan, trials)?;
        let mut rows = Vec::new();
        if with_floor {
            rows.push(Row::compared(
                benchmark,
                "floor: a supervisor that only answers CONTINUE (ratio: appshot/floor)",
                FLOOR,
                &m[2],
                &m[1],
            ));
            rows.push(Row::compared(
                "getsockname under appshot vs native",
                "appshot (default routing, the kernel's): not notified, renamed by the cgroup program",
                "native",
                &m[0],
                &m[3],
            ));
            rows.push(match &sandlock {
                Ok(peer) => Row::compared(
                    benchmark,
                    &peer.row_configuration(),
                    "sandlock",
                    &m[4],
                    &m[1],
                ),
                Err(why) => Row::alone(benchmark, "peer: sandlock", &m[1], why),
            });
        }
        let configuration = if call == "getsockopt" {
            configuration.to_string()
        } else {
            format!("{configuration} ({NOTIFIED_ROUTING})")
        };
        out.add_against_native(benchmark, &configuration, m);
        out.rows.extend(rows);
    }
    Ok(out)
}

/// The configuration of the floor's trial.
const FLOOR: &str = "floor";
