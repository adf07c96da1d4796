//! Data path: bulk TCP throughput over loopback with iperf3. appshot traps
//! no read, write, send or recv, so its figure should match native; the
//! socat proxy copies every byte through user space.
//!
//! Every run gets a fresh one-off server (`iperf3 -s -1`): it exits after
//! its test, which tells that the server side finished cleanly too.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use super::servers::{native_server, rows_with_socat, socat_proxy};
use super::{argv, Ctx, Outcome};
use crate::appshot::Appshot;
use crate::measure::{interleaved, Trial, Unit};
use crate::procs;

pub const TITLE: &str = "TCP throughput (iperf3)";
const AID: &str = "a";
/// How long a one-off server may take to exit after its client is done.
const SERVER_EXIT: Duration = Duration::from_secs(30);

/// A one-off iperf3 server on `port`: it exits after its test.
pub fn server(port: u16) -> Vec<String> {
    argv(["iperf3", "-s", "-1", "-p", &port.to_string()])
}

/// One native run: a one-off server on `server_port`, then `client` (which
/// may go through a proxy) to its end; the received rate in Gbit/s.
/// The iperf3 client of one run against loopback port `port`, `secs`
/// long, JSON output, with `options` (UDP, affinity) before the target.
pub fn client(port: u16, secs: u32, options: &[&str]) -> Vec<String> {
    let (port, secs) = (port.to_string(), secs.to_string());
    let mut out = argv(["iperf3"]);
    out.extend(argv(options.iter().copied()));
    out.extend(argv(["-c", "127.0.0.1", "-p", &port, "-t", &secs, "-J"]));
    out
}

pub fn native_once(
    server_port: u16,
    client: &[String],
    what: &str,
    logs: &Path,
    timeout: Duration,
) -> anyhow::Result<f64> {
    let mut srv = native_server(server_port, &server(server_port), what, logs)?;
    let out = procs::run(
        &mut procs::command(client),
        &format!("iperf3 client ({what})"),
        timeout,
    )?;
    srv.wait_success(SERVER_EXIT)?;
    gbits(&out)
}

/// One run with the one-off server on `virtual_port` and `client`, both
/// under appshot as [`AID`].
pub fn appshot_once(
    appshot: &Appshot,
    virtual_port: u16,
    client: &[String],
    timeout: Duration,
) -> anyhow::Result<f64> {
    let srv = appshot
        .server(AID, virtual_port, &server(virtual_port))
        .context("starting the iperf3 server under appshot")?;
    let out = procs::run(
        &mut appshot.foreground(AID, client),
        "iperf3 client under appshot",
        timeout,
    )?;
    srv.wait_exit(SERVER_EXIT)?;
    gbits(&out)
}

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let logs = ctx.logs();
    let secs = ctx.plan.iperf_seconds;
    let timeout = Duration::from_secs(u64::from(secs) + 60);
    let client = |port: u16| client(port, secs, &[]);

    let native_port = ctx.ports.take()?;
    let virtual_port = ctx.ports.take()?;
    let upstream = ctx.ports.take()?;
    let proxy_port = ctx.ports.take()?;
    let _proxy = socat_proxy(proxy_port, upstream, &logs)?;
    let appshot = ctx.appshot;

    let native_run = |server_port: u16, client_port: u16, what: &'static str| {
        let (logs, client) = (logs.clone(), client(client_port));
        move || native_once(server_port, &client, what, &logs, timeout)
    };
    let trials = vec![
        Trial::new(
            "native",
            native_run(native_port, native_port, "native iperf3 server"),
        ),
        Trial::new("appshot", || {
            appshot_once(appshot, virtual_port, &client(virtual_port), timeout)
        }),
        Trial::new(
            "socat proxy",
            native_run(upstream, proxy_port, "iperf3 server behind socat"),
        ),
    ];
    let m = interleaved(TITLE, Unit::GbitPerSec, ctx.plan, trials)?;
    Ok(rows_with_socat(
        TITLE,
        &format!("bulk, 1 stream, {secs}s; server and client under appshot"),
        m,
    ))
}

/// Received throughput of an `iperf3 -J` report, in Gbit/s.
pub fn gbits(json: &str) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 -J printed no JSON")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .map(|bps| bps / 1e9)
        .ok_or_else(|| anyhow!("iperf3 -J has no end.sum_received.bits_per_second"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_comes_from_the_received_sum() {
        let report = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":9e10},
            "sum_received":{"bits_per_second":4.5e10}}}"#;
        assert_eq!(gbits(report).unwrap(), 45.0);
        assert!(gbits(r#"{"error":"unable to connect"}"#)
            .unwrap_err()
            .to_string()
            .contains("unable to connect"));
        assert!(gbits("{}").is_err());
        assert!(gbits("garbage").is_err());
    }
}
