//! Connection setup and teardown rate: connect + accept + close, with the
//! server and the client both native, both under appshot, and through a
//! socat proxy, which stands in for docker-proxy style port publishing.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::servers::{native_server, socat_proxy};
use super::{argv, Ctx, Outcome};
use crate::measure::{interleaved, Trial, Unit};
use crate::probes::{self, CONNRATE};
use crate::procs;
use crate::table::Row;

pub const TITLE: &str = "connection setup";
const TIMEOUT: Duration = Duration::from_secs(300);
const HOST: &str = "127.0.0.1";
const AID: &str = "a";
/// Instances of other AIDs on the same virtual port: the registry the
/// router consults is not a one-entry fast path.
const OTHER_AIDS: [&str; 2] = ["other1", "other2"];

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let probe = CONNRATE.build(ctx.work)?.display().to_string();
    let logs = ctx.logs();
    let server = |port: u16| argv([probe.as_str(), "server", HOST, &port.to_string()]);
    let client = |port: u16| {
        argv([
            probe.as_str(),
            "client",
            HOST,
            &port.to_string(),
            &ctx.plan.connections.to_string(),
        ])
    };

    let native_port = ctx.ports.take()?;
    let _native = native_server(
        native_port,
        &server(native_port),
        "native connrate server",
        &logs,
    )?;

    // The decoys start first: the first instance on a port gets the virtual
    // port itself as its real port, and the measured instance should sit on
    // a translated port like every other instance of a shared port. A
    // decoy answers with data, which fails the client: a routing mistake
    // can never pass for a measurement.
    let virtual_port = ctx.ports.take()?;
    let decoy = argv([probe.as_str(), "decoy", HOST, &virtual_port.to_string()]);
    let _decoys = OTHER_AIDS
        .iter()
        .map(|aid| ctx.appshot.server(aid, virtual_port, &decoy))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("connection setup: starting the other AIDs' instances")?;
    let _instance = ctx
        .appshot
        .server(AID, virtual_port, &server(virtual_port))
        .context("connection setup: starting the appshot server")?;

    let upstream = ctx.ports.take()?;
    let proxy_port = ctx.ports.take()?;
    let _upstream = native_server(
        upstream,
        &server(upstream),
        "connrate server behind socat",
        &logs,
    )?;
    let _proxy = socat_proxy(proxy_port, upstream, &logs)?;

    let conns = |out: String| probes::parse_value(&out, "conns_per_s");
    let native_client = |port: u16, what: &'static str| {
        let args = client(port);
        move || {
            conns(procs::run(
                Command::new(&args[0]).args(&args[1..]),
                what,
                TIMEOUT,
            )?)
        }
    };
    let appshot_args = client(virtual_port);
    let trials = vec![
        Trial::new("native", native_client(native_port, "connrate client")),
        Trial::new("appshot", || {
            conns(procs::run(
                &mut ctx.appshot.foreground(AID, &appshot_args),
                "connrate client under appshot",
                TIMEOUT,
            )?)
        }),
        Trial::new(
            "socat proxy",
            native_client(proxy_port, "connrate client via socat"),
        ),
    ];
    let m = interleaved(TITLE, Unit::ConnsPerSec, ctx.plan, trials)?;
    let rows = vec![
        Row::compared(
            TITLE,
            "appshot: same AID, 2 other AIDs on the port",
            "native",
            &m[0],
            &m[1],
        ),
        Row::compared(
            TITLE,
            "peer: socat proxy (ratio: appshot/socat)",
            "socat",
            &m[2],
            &m[1],
        ),
    ];
    Ok(Outcome {
        rows,
        measurements: m,
    })
}
