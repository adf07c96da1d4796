//! Connection setup and teardown rate: connect + accept + close, with the
//! server and the client both native, both under appshot, through a
//! socat proxy, which stands in for docker-proxy style port publishing, and
//! both in one sandlock sandbox with port_remap (its supervisor handles the
//! connect by notification, as appshot's does with `--routing notified`).
//! The appshot client runs twice: with the default routing, where the
//! cgroup programs route its connect and no call of the round is notified,
//! and with `--routing notified`, where its supervisor makes the connect.

use std::time::Duration;

use anyhow::Context;

use super::sandlock;
use super::servers::{native_server, rows_with_socat, socat_proxy};
use super::{argv, Client, Ctx, Outcome, NOTIFIED_ROUTING};
use crate::measure::{interleaved, Unit};
use crate::probes::{self, CONNRATE};
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
    let native = |port: u16, what: &str| native_server(port, &server(port), what, &logs);
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
    let _native = native(native_port, "native connrate server")?;

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
    let _upstream = native(upstream, "connrate server behind socat")?;
    let _proxy = socat_proxy(proxy_port, upstream, &logs)?;

    // Server and client in one sandbox: its port space is its own, so the
    // client's connect to the server's port is remapped like appshot's.
    let sandlock = sandlock::usable()?;
    let sandboxed_port = ctx.ports.take()?;
    let sandboxed = sandlock.as_ref().ok().map(|peer| {
        let script = format!(
            "{} & exec {}",
            server(sandboxed_port).join(" "),
            client(sandboxed_port).join(" ")
        );
        peer.argv(&argv(["sh", "-c", script.as_str()]))
    });

    let connrate = Client {
        appshot: ctx.appshot,
        aid: AID,
        timeout: TIMEOUT,
        figure: |out: &str| probes::parse_value(out, "conns_per_s"),
    };
    let mut trials = vec![
        connrate.native("native", client(native_port), "connrate client"),
        connrate.appshot(client(virtual_port), "connrate client under appshot"),
        connrate.native(
            "socat proxy",
            client(proxy_port),
            "connrate client via socat",
        ),
        connrate.appshot_notified(
            client(virtual_port),
            "connrate client under appshot --routing notified",
        ),
    ];
    if let Some(argv) = sandboxed {
        trials.push(connrate.native("sandlock", argv, "connrate under sandlock"));
    }
    let m = interleaved(TITLE, Unit::ConnsPerSec, ctx.plan, trials)?;
    let peer_row = match &sandlock {
        Ok(peer) => Row::compared(TITLE, &peer.row_configuration(), "sandlock", &m[4], &m[1]),
        Err(why) => Row::alone(TITLE, "peer: sandlock", &m[1], why),
    };
    let notified_row = Row::compared(
        TITLE,
        &format!("{NOTIFIED_ROUTING}: same AID, 2 other AIDs on the port"),
        "native",
        &m[0],
        &m[3],
    );
    let mut out = rows_with_socat(
        TITLE,
        "appshot (default routing, the kernel's): same AID, 2 other AIDs on the port",
        m,
    );
    out.rows.push(notified_row);
    out.rows.push(peer_row);
    Ok(out)
}
