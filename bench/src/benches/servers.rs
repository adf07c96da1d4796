//! Native servers and the socat peer, shared by the benchmarks.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::Outcome;
use crate::measure::Measurement;
use crate::net;
use crate::procs::{self, Background};
use crate::table::Row;

/// How long a server may take to listen.
pub const START: Duration = Duration::from_secs(30);

/// Starts `argv` natively and returns once it listens on `port`; the guard
/// stops it.
pub fn native_server(
    port: u16,
    argv: &[String],
    what: &str,
    logs: &Path,
) -> anyhow::Result<Background> {
    let mut bg = Background::spawn(procs::command(argv), what, logs)?;
    net::wait_listening(port, START, || bg.check_running())
        .with_context(|| format!("starting the {what} on port {port}"))?;
    Ok(bg)
}

/// socat forwarding loopback port `listen` to `upstream` with one forked
/// process per connection: a user-space proxy, as docker-proxy publishes
/// container ports.
pub fn socat_proxy(listen: u16, upstream: u16, logs: &Path) -> anyhow::Result<Background> {
    let argv: Vec<String> = vec![
        "socat".into(),
        format!("TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr"),
        format!("TCP:127.0.0.1:{upstream}"),
    ];
    native_server(
        listen,
        &argv,
        &format!("socat proxy {listen}->{upstream}"),
        logs,
    )
}

/// The rows of a benchmark measured native, under appshot and through the
/// socat proxy (`m` in that order): appshot against native, as
/// `configuration`, then against the socat peer.
pub fn rows_with_socat(title: &str, configuration: &str, m: Vec<Measurement>) -> Outcome {
    let socat = Row::compared(
        title,
        "peer: socat proxy (ratio: appshot/socat)",
        "socat",
        &m[2],
        &m[1],
    );
    let mut out = Outcome::default();
    out.add_against_native(title, configuration, m);
    out.rows.push(socat);
    out
}
