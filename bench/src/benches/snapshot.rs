//! Snapshot, restore and clone of an instance. The bench does not time
//! them yet, so their rows carry no figure: "not available" while appshot
//! lacks the command, "not measured" once it has it (the bench asks
//! `appshot help`), so the table never claims a missing feature that exists.
//!
//! To measure one: start a redis-server instance as `redis::run` does,
//! time the operation in a `Trial` (with a peer such as CRIU as the
//! baseline, if one is installed), and replace its row with
//! `Row::compared`.

use super::{Ctx, Outcome};
use crate::table::Row;

pub const TITLE: &str = "snapshot/restore/clone";

pub fn run(ctx: &mut Ctx<'_>) -> anyhow::Result<Outcome> {
    let commands = ctx.appshot.commands()?;
    let rows = [
        ("snapshot", "redis-server instance, time to snapshot"),
        ("restore", "redis-server instance, time to restore"),
        ("clone", "redis-server instance, time to a serving clone"),
    ]
    .into_iter()
    .map(|(command, configuration)| {
        if commands.iter().any(|c| c == command) {
            Row::not_measured(
                command,
                configuration,
                &format!("`appshot {command}` exists; bench/src/benches/snapshot.rs does not time it yet"),
            )
        } else {
            Row::not_available(
                command,
                configuration,
                &format!("appshot has no `{command}` command yet"),
            )
        }
    })
    .collect();
    Ok(Outcome {
        rows,
        measurements: Vec::new(),
    })
}
