//! Datagram path: UDP through the kernel's routing by AID (the cgroup
//! programs of `sys/bpf/udproutes.bpf.c` on sendto/recvfrom, and a
//! connected socket connected to the real port), against native.
//!
//! - iperf3 -u: bulk datagrams, unlimited rate (`-b 0`), the rate the
//!   server received (the sender outruns it on loopback, so this is the
//!   receiver's speed, both ways); client and server each on a CPU of
//!   its own (`-A`).
//! - udprr: one request, one answer, over and over from one socket
//!   (`bench/probes/udprr.c`); every answer is checked to come from the
//!   virtual port with the request's bytes. Two placements, natively as
//!   under appshot: server and client on one CPU (each round trip two
//!   context switches there: the syscall path's cost shows, run to run
//!   within 1-3 %), and on two CPUs (each round trip two wake-ups across
//!   CPUs, which on this VM vary the rate up to 3x from run to run, so
//!   that row takes three times the runs). Under appshot another AID's
//!   decoy holds the fixed port itself and answers with other bytes, so a
//!   routing mistake fails the run.

use std::time::Duration;

use anyhow::Context;

use super::iperf;
use super::{argv, Client, Ctx, Outcome};
use crate::measure::{interleaved, Plan, Trial, Unit};
use crate::net::{self, Serves};
use crate::probes::{self, UDPRR};
use crate::procs::Background;

pub const TITLE: &str = "UDP";
const AID: &str = "a";
const DECOY_AID: &str = "other1";
const HOST: &str = "127.0.0.1";
const SERVER_EXIT: Duration = Duration::from_secs(30);
/// How long each udprr run asks, in ms.
const RR_MILLIS: u32 = 1_000;

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    iperf(ctx, &mut out)?;
    request_response(ctx, &mut out)?;
    Ok(out)
}

fn iperf(ctx: &mut Ctx<'_>, out: &mut Outcome) -> anyhow::Result<()> {
    let logs = ctx.logs();
    let secs = ctx.plan.iperf_seconds;
    let timeout = Duration::from_secs(u64::from(secs) + 60);
    // Client and server on CPUs of their own: where the scheduler put them
    // (one CPU or two), the rate was 10 or 22-30 Gbit/s from run to run.
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let affinity = format!("{},{}", n.saturating_sub(2), n - 1);
    let client = |port: u16| iperf::client(port, secs, &["-A", &affinity, "-u", "-b", "0"]);
    let native_port = ctx.ports.take()?;
    let virtual_port = ctx.ports.take()?;
    let appshot = ctx.appshot;
    let trials = vec![
        Trial::new("native", || {
            iperf::native_once(
                native_port,
                &client(native_port),
                "native iperf3 -u server",
                &logs,
                timeout,
            )
        }),
        Trial::new("appshot", || {
            iperf::appshot_once(appshot, virtual_port, &client(virtual_port), timeout)
        }),
    ];
    let m = interleaved(
        "UDP throughput (iperf3 -u)",
        Unit::GbitPerSec,
        ctx.plan,
        trials,
    )?;
    out.add_against_native(
        "UDP throughput (iperf3 -u)",
        &format!("-b 0, 1 stream, {secs}s, received rate, client and server on two CPUs; both under appshot"),
        m,
    );
    Ok(())
}

/// `command` pinned to CPU `cpu` counted from the machine's last (0: the
/// last, 1: the one before it, or the last again on one CPU).
fn pinned(cpu: usize, command: &[&str]) -> Vec<String> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = (n - 1).saturating_sub(cpu).to_string();
    argv(
        ["taskset", "-c", cpu.as_str()]
            .into_iter()
            .chain(command.iter().copied()),
    )
}

fn request_response(ctx: &mut Ctx<'_>, out: &mut Outcome) -> anyhow::Result<()> {
    let probe = UDPRR.build(ctx.work)?.display().to_string();
    let logs = ctx.logs();
    let native_port = ctx.ports.take()?;
    // A session of its own, as the appshot server's (run -d).
    let mut native = Background::spawn_session(
        &pinned(0, &[probe.as_str(), "serve", &native_port.to_string()]),
        "native udprr server",
        &logs,
    )?;
    net::wait_serving(native_port, Serves::Udp, SERVER_EXIT, || {
        native.check_running()
    })?;

    let virtual_port = ctx.ports.take()?;
    let port = virtual_port.to_string();
    let _decoy = ctx
        .appshot
        .server_of(
            DECOY_AID,
            virtual_port,
            &argv([probe.as_str(), "decoy", &port]),
            Serves::Udp,
        )
        .context("UDP request/response: starting the other AID's decoy")?;
    let _instance = ctx
        .appshot
        .server_of(
            AID,
            virtual_port,
            &pinned(0, &[probe.as_str(), "serve", &port]),
            Serves::Udp,
        )
        .context("UDP request/response: starting the appshot server")?;

    let ask = |cpu: usize, port: u16| {
        pinned(
            cpu,
            &[
                probe.as_str(),
                "ask",
                HOST,
                &port.to_string(),
                &RR_MILLIS.to_string(),
            ],
        )
    };
    let rr = Client {
        appshot: ctx.appshot,
        aid: AID,
        timeout: Duration::from_secs(60),
        figure: |out: &str| probes::parse_value(out, "round_trips_per_s"),
    };
    let placements = [
        (0, 1, "client and server on one CPU"),
        (1, 3, "client and server on two CPUs"),
    ];
    for (cpu, times, placement) in placements {
        let trials = vec![
            rr.native("native", ask(cpu, native_port), "udprr client"),
            rr.appshot(ask(cpu, virtual_port), "udprr client under appshot"),
        ];
        let plan = Plan {
            runs: ctx.plan.runs * times,
            ..ctx.plan.clone()
        };
        let m = interleaved(
            &format!("UDP request/response, {placement}"),
            Unit::RequestsPerSec,
            &plan,
            trials,
        )?;
        out.add_against_native(
            "UDP request/response",
            &format!(
                "sendto + recvfrom, one socket, {placement}; same AID, another AID on the port"
            ),
            m,
        );
    }
    Ok(())
}
