//! Datagram path: UDP through the kernel's routing by AID (the cgroup
//! programs of `sys/bpf/udproutes.bpf.c` on sendto/recvfrom, and a
//! connected socket connected to the real port), against native.
//!
//! - iperf3 -u: bulk datagrams, unlimited rate (`-b 0`), the rate the
//!   server received (the sender outruns it on loopback, so this is the
//!   receiver's speed, both ways).
//! - udprr: one request, one answer, over and over from one socket
//!   (`bench/probes/udprr.c`); every answer is checked to come from the
//!   virtual port with the request's bytes. Server and client share one
//!   CPU, natively as under appshot: each round trip is then two context
//!   switches on that CPU, where a wake-up across CPUs of this VM varied
//!   the rate 3x from run to run (18k to 56k). Under appshot another AID's
//!   decoy holds the fixed port itself and answers with other bytes, so a
//!   routing mistake fails the run.

use std::time::Duration;

use anyhow::Context;

use super::iperf;
use super::{argv, Client, Ctx, Outcome};
use crate::measure::{interleaved, Trial, Unit};
use crate::net::{self, Serves};
use crate::probes::{self, UDPRR};
use crate::procs::{self, Background};

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
    let client = |port: u16| {
        argv([
            "iperf3",
            "-u",
            "-b",
            "0",
            "-c",
            HOST,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
    };
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
        &format!("-b 0, 1 stream, {secs}s, received rate; server and client under appshot"),
        m,
    );
    Ok(())
}

/// `command` pinned to the machine's last CPU.
fn pinned(command: &[&str]) -> Vec<String> {
    static CPU: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let cpu = CPU.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (n - 1).to_string()
    });
    argv(
        ["taskset", "-c", cpu]
            .into_iter()
            .chain(command.iter().copied()),
    )
}

fn request_response(ctx: &mut Ctx<'_>, out: &mut Outcome) -> anyhow::Result<()> {
    let probe = UDPRR.build(ctx.work)?.display().to_string();
    let logs = ctx.logs();
    let native_port = ctx.ports.take()?;
    let mut native = Background::spawn(
        procs::command(&pinned(&[
            probe.as_str(),
            "serve",
            &native_port.to_string(),
        ])),
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
            &pinned(&[probe.as_str(), "serve", &port]),
            Serves::Udp,
        )
        .context("UDP request/response: starting the appshot server")?;

    let ask = |port: u16| {
        pinned(&[
            probe.as_str(),
            "ask",
            HOST,
            &port.to_string(),
            &RR_MILLIS.to_string(),
        ])
    };
    let rr = Client {
        appshot: ctx.appshot,
        aid: AID,
        timeout: Duration::from_secs(60),
        figure: |out: &str| probes::parse_value(out, "round_trips_per_s"),
    };
    let trials = vec![
        rr.native("native", ask(native_port), "udprr client"),
        rr.appshot(ask(virtual_port), "udprr client under appshot"),
    ];
    let m = interleaved(
        "UDP request/response",
        Unit::RequestsPerSec,
        ctx.plan,
        trials,
    )?;
    out.add_against_native(
        "UDP request/response",
        "sendto + recvfrom, one socket, client and server on one CPU; same AID, another AID on the port",
        m,
    );
    Ok(())
}
