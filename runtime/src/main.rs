//! `appshot`: run unmodified applications under a supervisor that
//! multiplexes their fixed ports across instances. The command line: it
//! parses, calls the library (`lib.rs`) and prints.
#![forbid(unsafe_code)]

// The command line's own room: starting detached supervisors and clones.
mod cli;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use appshot_configurator::{
    validate_aid, validate_env_key, validate_hostname, validate_name, validate_value_key,
    AppConfig, CloneId, CloneRules, Pattern, PortRange, UserSpec,
};
use appshot_snapshot::lazy::LazySettings;
use clap::{ArgAction, Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use appshot::commands::{self, apps, systemd};
use appshot::net::connroutes::Routing;
use appshot::net::{agent, netlock, remote, sourcerules, udproutes};
use appshot::supervisor::{self, init, logs, pending, pool, restart, snapshots, templates, user};
use appshot::supervisor::{CloneIdentity, IdentityFile, Launch, Mode, LAUNCH_ENV};
use appshot::{error, oci, DEFAULT_RUN_DIR, VERSION};
use cli::{clones, detach};

#[derive(Parser)]
#[command(
    name = "appshot",
    version = VERSION,
    about = "Run many instances of an unmodified application on one fixed port"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Directory of the host-wide registry and instance state.
    #[arg(
        long,
        env = "APPSHOT_RUN_DIR",
        default_value = DEFAULT_RUN_DIR,
        global = true
    )]
    run_dir: PathBuf,
    /// Who decides connect, getsockname and getpeername of the instances
    /// `run`, `restore` and `clone` start: the kernel's cgroup programs
    /// from the registry (only bind is then notified), or their supervisor,
    /// notified of each call. `kernel`, the default, falls back to
    /// `notified` with a cluster key (connect negotiates with other hosts)
    /// or where the programs cannot be attached.
    #[arg(
        long,
        env = "APPSHOT_ROUTING",
        value_enum,
        default_value_t = Routing::Kernel,
        global = true
    )]
    routing: Routing,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command as a supervised instance.
    Run(RunArgs),
    /// List running instances (with -a also those that ended and were not
    /// removed).
    Ps {
        #[arg(long)]
        json: bool,
        #[arg(short, long)]
        all: bool,
    },
    /// Print a detached instance's output, running or ended.
    Logs {
        name: String,
        /// Go on printing what it writes until it ends.
        #[arg(short, long)]
        follow: bool,
        /// Only lines since a duration ago (30s, 5m, 2h, 1d) or a UTC time
        /// (YYYY-MM-DDTHH:MM:SS).
        #[arg(long, value_parser = logs::parse_since)]
        since: Option<String>,
        /// Each line with the UTC time it was written.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Remove the logs and exit record of instances that ended.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Show the port translation table (with source rules and recent
    /// cross-host negotiations).
    Ports {
        #[arg(long)]
        json: bool,
        /// Only source rules and negotiations (with --json: as an object).
        #[arg(long)]
        remote: bool,
    },
    /// Cross-host multiplexing: the negotiation agent.
    Vpm {
        #[command(subcommand)]
        command: VpmCmd,
    },
    /// Serve OCI containers: the seccomp agent runc/crun hand each
    /// container's listener to (runs in the foreground).
    OciAgent {
        /// The Unix socket runtimes connect to (the profile's listenerPath).
        #[arg(long, default_value = oci::DEFAULT_SOCKET)]
        listen: PathBuf,
    },
    /// Print the seccomp profile (OCI `linux.seccomp`) for containers
    /// served by `appshot oci-agent`.
    OciProfile {
        /// A profile to extend: an OCI `linux.seccomp` object or a whole
        /// config.json. Default: allow every other syscall.
        #[arg(long)]
        base: Option<PathBuf>,
        /// The agent's socket.
        #[arg(long, default_value = oci::DEFAULT_SOCKET)]
        listener_path: PathBuf,
        /// Put the AID in listenerMetadata (`appshot.aid=AID`); the
        /// container's annotation `appshot.aid` takes precedence.
        #[arg(long)]
        aid: Option<String>,
    },
    /// Stop instances: SIGTERM, then SIGKILL after the grace time.
    Stop {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        names: Vec<String>,
        /// Every running instance.
        #[arg(short, long)]
        all: bool,
        /// Seconds to wait after SIGTERM before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Save a running instance into an image (then stop it, unless
    /// --leave-running).
    Snapshot {
        name: String,
        /// Image file to write (replaced atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Let the instance run on after the snapshot. Its memory is
        /// copied while it runs, and it is frozen only for what it wrote
        /// meanwhile and the rest of its state.
        #[arg(long)]
        leave_running: bool,
        /// Copy memory while the instance runs before freezing and stopping
        /// it (always done with --leave-running).
        #[arg(long)]
        pre_copy: bool,
        /// Take the image as a template for `appshot clone`.
        #[arg(long)]
        template: bool,
        /// Incremental: save only the pages written since PARENT was taken
        /// (the last snapshot of this instance, left running with --track
        /// or --parent); the image refers to the rest in PARENT, which must
        /// stay in place (`appshot merge` makes a whole image of it).
        #[arg(long, value_name = "PARENT")]
        parent: Option<PathBuf>,
        /// Keep tracking the instance's writes after a --leave-running
        /// snapshot, for a later `--parent` one on this image (a snapshot
        /// left running with --parent always does).
        #[arg(long, requires = "leave_running")]
        track: bool,
        /// Make the image durable (fsync) before it is in place, and before
        /// a stopping snapshot stops the instance. Without it the command
        /// returns, as `criu dump` does, once the image is complete in the
        /// page cache, and the kernel writes it back.
        #[arg(long)]
        sync: bool,
        /// `close`: save a Unix socket connected to a peer outside the
        /// instance as closed (the restored process reads EOF on it)
        /// instead of refusing the snapshot.
        #[arg(long, value_name = "close", value_parser = ["close"])]
        external_unix: Option<String>,
        /// Print the statistics as JSON (see the README's JSON section).
        #[arg(long)]
        json: bool,
    },
    /// Start instances from a template: each with its own AID, name,
    /// hostname, real ports and PID namespace, sharing the template's
    /// unchanged memory. Many clones start at once, e.g. `--aid web --count
    /// 100` (web-1 … web-100) or `--aid a --aid b`.
    Clone {
        template: PathBuf,
        /// AID of the clone. Repeated: one clone per --aid. Once with
        /// --count N: the clones get AID-1 … AID-N.
        #[arg(long, required = true)]
        aid: Vec<String>,
        /// Instance name (default: the clone's AID). Once for several
        /// clones: NAME-1 … NAME-N; or once per clone, in --aid's order.
        #[arg(long)]
        name: Vec<String>,
        /// How many clones (default: one per --aid); more than one implies
        /// --detach.
        #[arg(long)]
        count: Option<u32>,
        /// Each clone's hostname, in a UTS namespace of its own: `{number}`
        /// (the clone's number, 1 … N), `{aid}` and `{name}` are replaced,
        /// e.g. `web-{number}`. Overrides the config's `[clone] hostname`;
        /// default: the clone's name.
        #[arg(long, value_name = "PATTERN")]
        hostname: Option<Pattern>,
        /// A line KEY=VALUE of each clone's identity file (repeatable;
        /// VALUE takes the placeholders of --hostname). Overrides the
        /// config's `[clone.values]` KEY. Needs an identity file.
        #[arg(long = "value", value_name = "KEY=VALUE", value_parser = parse_value)]
        values: Vec<(String, Pattern)>,
        /// A path at which each clone sees its own identity file (its AID,
        /// name, hostname and values, a KEY=VALUE each line), e.g. a file
        /// the application serves or reads. Overrides the config's
        /// `[clone] identity_file`.
        #[arg(long)]
        identity_file: Option<PathBuf>,
        /// A variable of each clone's environment file (repeatable; VALUE
        /// takes the placeholders of --hostname), like `docker run --env`
        /// but read from the file: a running clone's environment is its
        /// template's. Overrides the config's `[clone.env]` KEY. Needs
        /// --env-file.
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(String, Pattern)>,
        /// A path at which each clone sees its own environment file, a
        /// `KEY='VALUE'` each line as sh reads it (`set -a; . PATH`), e.g.
        /// for the processes it starts later. Overrides the config's
        /// `[clone] env_file`.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Application config: its `[clone]` rules and `port_range` apply.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Real ports the clones' sockets get, e.g. 20000-29999 (overrides
        /// the config's `port_range`).
        #[arg(long)]
        port_range: Option<PortRange>,
        /// Instance shells kept ready for the template's next clones
        /// (default 2, or what the last --pool said; 0: none): a detached
        /// clone that claims one skips the start of its supervisor and
        /// namespace init.
        #[arg(long, value_name = "N")]
        pool: Option<u32>,
        #[arg(short, long)]
        detach: bool,
    },
    /// List the resident templates clones are forked from: one holder
    /// process per template image, started by its first clone.
    Templates,
    /// Manage resident templates.
    Template {
        #[command(subcommand)]
        command: TemplateCmd,
    },
    /// Bring an instance back from an image, continuing where it stopped.
    Restore {
        image: PathBuf,
        /// Instance name (default: the snapshotted instance's name).
        #[arg(long)]
        name: Option<String>,
        /// AID (default: the snapshotted instance's AID).
        #[arg(long)]
        aid: Option<String>,
        /// Application config: its `port_range` applies.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Real ports the restored sockets get, e.g. 20000-29999 (overrides
        /// the config's `port_range`).
        #[arg(long)]
        port_range: Option<PortRange>,
        /// Give the application its TCP connections as reset by their
        /// peers instead of rebuilding them (and take any real ports).
        #[arg(long)]
        tcp_close: bool,
        /// A hostname of its own, in a UTS namespace of its own (e.g. the
        /// one a snapshotted clone had; the image does not keep it).
        /// Default: the host's.
        #[arg(long, value_parser = parse_hostname)]
        hostname: Option<String>,
        /// Release the instance before its memory is in: pages are served
        /// on fault (userfaultfd) and the rest read in the background.
        #[arg(long)]
        lazy: bool,
        /// With --lazy: read at most this many MiB a second in the
        /// background (faults are always served at once).
        #[arg(long, value_name = "MIB", requires = "lazy", value_parser = clap::value_parser!(u64).range(1..))]
        prefetch_rate: Option<u64>,
        #[arg(short, long)]
        detach: bool,
    },
    /// Flatten an incremental image and its chain of parents into one
    /// whole image, which needs none of them.
    Merge {
        image: PathBuf,
        /// The whole image to write (replaced atomically; may be IMAGE
        /// itself).
        #[arg(short, long)]
        output: PathBuf,
        /// Make it durable (fsync) before it is in place.
        #[arg(long)]
        sync: bool,
    },
    /// Show what an image holds.
    Inspect {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        /// List every memory mapping (the text shows their number only).
        #[arg(long)]
        mappings: bool,
    },
    /// Print a systemd unit that runs an existing instance (or, with
    /// --agent, the negotiation agent) as a service, in the foreground.
    Generate {
        #[command(subcommand)]
        command: GenerateCmd,
    },
    /// Application configs.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Print the man page (roff), e.g.
    /// `appshot man > /usr/local/share/man/man1/appshot.1`.
    Man,
    /// Print a completion script for SHELL, e.g.
    /// `appshot completion bash > /etc/bash_completion.d/appshot`.
    Completion { shell: clap_complete::Shell },
    #[command(name = "__init", hide = true)]
    #[command(group = clap::ArgGroup::new("start").required(true).args(["channel_fd", "restore_pid"]))]
    Init {
        /// Launch: where the filter's listener goes.
        #[arg(long)]
        channel_fd: Option<i32>,
        /// Restore: the image's top-level processes; one stub is forked
        /// for each.
        #[arg(long, value_delimiter = ',')]
        restore_pid: Vec<u32>,
        /// A clone forked from a template holder: the PID it gets, which
        /// init waits for after saying on the channel that its namespaces
        /// are ready.
        #[arg(long, requires = "channel_fd", conflicts_with = "restore_pid")]
        await_pid: Option<u32>,
        /// Repeated with --file-target: one bind mount each.
        #[arg(long, requires = "file_target")]
        file_source: Vec<PathBuf>,
        #[arg(long, requires = "file_source")]
        file_target: Vec<PathBuf>,
        #[arg(long)]
        hostname: Option<String>,
        #[arg(long)]
        cwd: Option<PathBuf>,
        #[arg(long, value_parser = parse_run_as)]
        user: Option<user::RunAs>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    #[command(name = "__supervise", hide = true)]
    Supervise,
    /// An instance shell for clones of TEMPLATE (canonical path), started
    /// by `appshot clone`.
    #[command(name = "__shell", hide = true)]
    Shell { template: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate config files (a directory: each `*.toml` in it) with the
    /// errors `run --config` would give, without running anything; two
    /// claiming one executable are refused.
    Check {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum GenerateCmd {
    /// A unit for instance NAME (from its registry record: name, AID,
    /// config, ports, port range, user, command), e.g. `appshot generate
    /// systemd web > /etc/systemd/system/appshot-web.service`.
    Systemd {
        #[arg(required_unless_present = "agent", conflicts_with = "agent")]
        name: Option<String>,
        /// A unit for `appshot vpm agent` instead.
        #[arg(long, requires = "listen")]
        agent: bool,
        /// With --agent: the address and port it listens on.
        #[arg(long, requires = "agent")]
        listen: Option<std::net::SocketAddr>,
        /// With --agent: the cluster key file.
        #[arg(long, requires = "agent")]
        key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// End templates' holders (by the names `appshot templates` shows):
    /// their clones run on, and the next clone starts a new holder.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VpmCmd {
    /// Answer other hosts' negotiations from this host's registry (runs in
    /// the foreground).
    Agent {
        /// Address and port to listen on, e.g. 10.200.1.1:7946.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Cluster key (default: $APPSHOT_CLUSTER_KEY_FILE, then
        /// /etc/appshot/cluster.key).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Application id: clients reach instances of their own AID only.
    #[arg(long)]
    aid: Option<String>,
    /// Instance name (default: AID and a random suffix).
    #[arg(long)]
    name: Option<String>,
    /// Application config file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A port to multiplex (repeatable). Default: every TCP port below the
    /// ephemeral range.
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// Real ports the allocator hands out, e.g. 20000-29999.
    #[arg(long)]
    port_range: Option<PortRange>,
    /// How long a bind waits for a free real port before EADDRINUSE.
    #[arg(long)]
    allocation_timeout_ms: Option<u64>,
    /// Return once the instance runs; its supervisor lives on.
    #[arg(short, long)]
    detach: bool,
    /// Remove the instance's logs and exit record when it ends.
    #[arg(long)]
    rm: bool,
    /// With --detach: write the supervisor's PID to this file once the
    /// instance runs (for a service manager's PIDFile=); removed when the
    /// instance ends.
    #[arg(long, requires = "detach")]
    pidfile: Option<PathBuf>,
    /// Start the application again when it exits: `no`, `on-failure[:N]`
    /// (a status other than 0, at most N times) or `always`; the wait
    /// doubles from 100 ms up to 30 s. Never after `appshot stop`, nor
    /// after an exit during `run -d`'s start period.
    #[arg(long, default_value = "no")]
    restart: restart::Policy,
    /// Rotate the application's log (`app.log`) at this many bytes.
    #[arg(long, default_value_t = logs::DEFAULT_MAX_BYTES)]
    log_max_size: u64,
    /// Run the application as USER[:GROUP] (names or numbers); the
    /// supervisor stays root.
    #[arg(long, short = 'u', value_name = "USER[:GROUP]")]
    user: Option<UserSpec>,
    /// The command and its arguments, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match (&cli.command, cli.verbose) {
        (_, 1) => "info",
        (_, 2) => "debug",
        (_, n) if n > 2 => "trace",
        (Cmd::Supervise | Cmd::Shell { .. } | Cmd::Vpm { .. } | Cmd::OciAgent { .. }, _) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // A detached supervisor's stderr is its own log; it is kept for it here
    // because the application's output takes stderr over (see `supervise`).
    // A shell's log moves to its clone's once claimed (see `shell`).
    let supervising = matches!(cli.command, Cmd::Supervise | Cmd::Shell { .. });
    let writer = match std::io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) if supervising => {
            OWN_LOG_FD.store(fd.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
            BoxMakeWriter::new(std::sync::Mutex::new(std::fs::File::from(fd)))
        }
        _ => BoxMakeWriter::new(std::io::stderr),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(!supervising && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            if supervising {
                tracing::error!("{e:#}");
            } else {
                eprintln!("appshot: {e:#}");
            }
            ExitCode::from(
                e.downcast_ref::<error::RuntimeError>()
                    .map_or(125, error::RuntimeError::exit_status),
            )
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let run_dir = cli.run_dir;
    let routing = cli.routing;
    appshot_vpm::set_reclaim_hook(sourcerules::reclaim);
    appshot_vpm::set_udp_change_hook(udproutes::refresh);
    appshot_vpm::set_tcp_change_hook(udproutes::refresh_connects);
    if !matches!(
        cli.command,
        Cmd::Init { .. }
            | Cmd::Supervise
            | Cmd::Shell { .. }
            | Cmd::Completion { .. }
            | Cmd::Man
            | Cmd::Config { .. }
    ) {
        pending::sweep(&run_dir);
        netlock::sweep(&run_dir);
    }
    match cli.command {
        Cmd::Run(args) => {
            commands::require_privileges("run")?;
            let detach = args.detach;
            let mut launch = resolve(args, &run_dir)?;
            launch.routing = routing;
            if detach {
                detach::detach_supervisor(&launch, cli.verbose)
            } else {
                Ok(supervisor::run(launch, &mut None)?.status)
            }
        }
        Cmd::Supervise => {
            let json = std::env::var(LAUNCH_ENV)
                .context("__supervise is started by `appshot run --detach`")?;
            std::env::remove_var(LAUNCH_ENV);
            let launch: Launch =
                serde_json::from_str(&json).context("decoding the launch description")?;
            // Its own session: no terminal signals reach a detached instance.
            nix::unistd::setsid().context("setsid")?;
            supervise(launch)
        }
        Cmd::Shell { template } => {
            nix::unistd::setsid().context("setsid")?;
            shell(&run_dir, &template)
        }
        Cmd::Init {
            channel_fd,
            restore_pid,
            await_pid,
            file_source,
            file_target,
            hostname,
            cwd,
            user,
            command,
        } => init::run(init::InitArgs {
            // clap lets exactly one of the three through.
            start: match (channel_fd, await_pid) {
                (Some(fd), Some(pid)) => init::Start::Await {
                    pid,
                    channel_fd: fd,
                },
                (Some(fd), None) => init::Start::Launch { channel_fd: fd },
                (None, _) => init::Start::Restore { pids: restore_pid },
            },
            files: file_source.into_iter().zip(file_target).collect(),
            hostname,
            cwd,
            user,
            command,
            routing,
        })
        .map_err(Into::into),
        Cmd::Config {
            command: ConfigCmd::Check { paths },
        } => {
            let mut files = Vec::new();
            for path in paths {
                if path.is_dir() {
                    files.extend(apps::files(&path)?);
                } else {
                    files.push(path);
                }
            }
            each(&files, |file| {
                AppConfig::load(file)?;
                println!("{}: ok", file.display());
                Ok(())
            })?;
            // Valid one by one, they must not claim one program twice.
            apps::claims(&files)?;
            Ok(0)
        }
        Cmd::Generate {
            command:
                GenerateCmd::Systemd {
                    name,
                    agent: _,
                    listen,
                    key_file,
                },
        } => {
            let unit = match (name, listen) {
                (Some(name), _) => systemd::instance_unit(&run_dir, &name)?,
                (None, Some(listen)) => systemd::agent_unit(listen, key_file.as_deref(), &run_dir)?,
                (None, None) => bail!("give an instance NAME or --agent --listen ADDR:PORT"),
            };
            print!("{unit}");
            Ok(0)
        }
        Cmd::Man => {
            let man = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            match man.render(&mut std::io::stdout()) {
                // A reader that stopped early (`| head`) is not an error.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow!("writing the man page: {e}"))
                }
                _ => Ok(0),
            }
        }
        Cmd::Completion { shell } => {
            // Without the hidden internal commands (__init, __supervise),
            // which clap_complete would offer.
            let full = <Cli as clap::CommandFactory>::command();
            let mut cmd = clap::Command::new("appshot")
                .version(VERSION)
                .args(full.get_arguments().cloned())
                .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            clap_complete::generate(shell, &mut cmd, "appshot", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Ps { json, all } => {
            print!("{}", commands::ps(&run_dir, json, all)?);
            Ok(0)
        }
        Cmd::Logs {
            name,
            follow,
            since,
            timestamps,
        } => {
            let view = logs::View {
                since,
                timestamps,
                follow,
            };
            logs::print(&run_dir, &name, &view)?;
            Ok(0)
        }
        Cmd::Templates => {
            print!("{}", commands::templates(&run_dir));
            Ok(0)
        }
        Cmd::Template {
            command: TemplateCmd::Rm { names },
        } => each(&names, |name| {
            templates::remove(&run_dir, name)?;
            println!("{name}");
            Ok(())
        }),
        Cmd::Rm { names } => each(&names, |name| {
            logs::remove(&run_dir, name)?;
            println!("{name}");
            Ok(())
        }),
        Cmd::Ports { json, remote } => {
            print!("{}", commands::ports(&run_dir, json, remote)?);
            Ok(0)
        }
        Cmd::Vpm {
            command: VpmCmd::Agent { listen, key_file },
        } => Ok(agent::run(agent::AgentArgs {
            listen,
            key_file,
            run_dir,
        })?),
        Cmd::OciAgent { listen } => Ok(oci::agent::run(oci::agent::AgentArgs {
            listen,
            run_dir,
            ephemeral_start: ephemeral_range()?.0,
        })?),
        Cmd::OciProfile {
            base,
            listener_path,
            aid,
        } => {
            if let Some(aid) = &aid {
                validate_aid(aid).map_err(|e| anyhow!("--aid: {e}"))?;
            }
            let base = base.map(|b| oci::profile::read_base(&b)).transpose()?;
            let metadata = aid.map(|a| format!("{}={a}", oci::AID_ANNOTATION));
            let profile = oci::profile::build(base, &listener_path, metadata.as_deref())?;
            println!("{}", oci::profile::render(&profile));
            Ok(0)
        }
        Cmd::Snapshot {
            name,
            output,
            leave_running,
            pre_copy,
            template,
            parent,
            track,
            sync,
            external_unix,
            json,
        } => {
            commands::require_privileges("snapshot")?;
            let options = snapshots::SnapshotOptions {
                leave_running,
                pre_copy,
                template,
                external_unix_close: external_unix.is_some(),
                parent,
                track,
                durability: snapshots::durability(sync),
            };
            println!(
                "{}",
                snapshots::snapshot(&run_dir, &name, &output, options, json)?
            );
            Ok(0)
        }
        Cmd::Clone {
            template,
            aid,
            name,
            count,
            hostname,
            values,
            identity_file,
            env,
            env_file,
            config,
            port_range,
            pool,
            detach,
        } => {
            commands::require_privileges("clone")?;
            let config = match &config {
                Some(path) => AppConfig::load(path)?,
                None => AppConfig::default(),
            };
            let mut rules = config.clone;
            rules.identity_file = identity_file.or(rules.identity_file);
            rules.hostname = hostname.or(rules.hostname);
            rules.values.extend(values);
            rules.env_file = env_file.or(rules.env_file);
            rules.env.extend(env);
            let range = port_range.unwrap_or(config.port_range);
            let plan = clones::plan(&aid, &name, count)?;
            if let ([one], true) = (plan.as_slice(), detach) {
                if let Some(mut launch) = unopened_launch(&template, one, &rules, range, &run_dir)?
                {
                    launch.routing = routing;
                    let started = detach::detach_unopened(&launch);
                    if !matches!(started, Ok(None)) {
                        replenish(&run_dir, &launch, pool, cli.verbose);
                        return started.map(|status| status.unwrap_or_default());
                    }
                }
            }
            let (mut launches, forkable) =
                clone_launches(&template, &plan, &rules, range, &run_dir, detach)?;
            for launch in &mut launches {
                launch.routing = routing;
            }
            let started = match launches.as_slice() {
                [launch] if detach => detach::detach_supervisor(launch, cli.verbose),
                [_] => {
                    let launch = launches.into_iter().next().expect("one launch");
                    return Ok(supervisor::run(launch, &mut None)?.status);
                }
                _ => clones::start_all(&launches, cli.verbose),
            };
            if let (true, Some(launch)) = (forkable, launches.first()) {
                replenish(&run_dir, launch, pool, cli.verbose);
            }
            started
        }
        Cmd::Merge {
            image,
            output,
            sync,
        } => {
            println!(
                "{}",
                snapshots::merge(&image, &output, snapshots::durability(sync))?
            );
            Ok(0)
        }
        Cmd::Inspect {
            image,
            json,
            mappings,
        } => {
            print!("{}", snapshots::inspect(&image, json, mappings)?);
            Ok(0)
        }
        Cmd::Restore {
            image,
            name,
            aid,
            config,
            port_range,
            tcp_close,
            hostname,
            lazy,
            prefetch_rate,
            detach,
        } => {
            commands::require_privileges("restore")?;
            let lazy = lazy.then_some(LazySettings {
                prefetch_bytes_per_sec: prefetch_rate.map(|mib| mib << 20),
            });
            let config = match &config {
                Some(path) => AppConfig::load(path)?,
                None => AppConfig::default(),
            };
            let mut launch = restore_launch(&image, name, aid, tcp_close, lazy, &run_dir)?;
            launch.routing = routing;
            launch.range = port_range.unwrap_or(config.port_range);
            launch.identity = hostname.map(|hostname| CloneIdentity {
                hostname,
                file: None,
                env_file: None,
            });
            if detach {
                detach::detach_supervisor(&launch, cli.verbose)
            } else {
                Ok(supervisor::run(launch, &mut None)?.status)
            }
        }
        Cmd::Stop { names, all, time } => {
            let names = if all {
                commands::running(&run_dir)?
            } else {
                names
            };
            let grace = Duration::from_secs(time);
            // Together, as each may take the whole grace time.
            let stopped: Vec<(String, Result<(), error::RuntimeError>)> =
                std::thread::scope(|scope| {
                    let threads: Vec<_> = names
                        .iter()
                        .map(|n| (n, scope.spawn(|| commands::stop(&run_dir, n, grace))))
                        .collect();
                    threads
                        .into_iter()
                        .map(|(n, t)| (n.clone(), t.join().expect("stop thread")))
                        .collect()
                });
            each(&stopped, |(name, result)| match result {
                Ok(()) => {
                    println!("{name}");
                    Ok(())
                }
                Err(e) => Err(anyhow!("{e}")),
            })
        }
    }
}

/// Flags over config over defaults. Without `--config`, the config is the
/// host-wide one of the command's program, if there is one.
fn resolve(args: RunArgs, run_dir: &Path) -> anyhow::Result<Launch> {
    let host_wide = match (&args.config, args.command.first()) {
        (None, Some(program)) => apps::for_command(program)?,
        _ => None,
    };
    let config = match (&args.config, host_wide) {
        (Some(path), _) => AppConfig::load(path)?,
        (None, Some((file, config))) => {
            tracing::info!("{} applies to {}", file.display(), args.command[0]);
            config
        }
        (None, None) => AppConfig::default(),
    };
    let config_path = args
        .config
        .as_deref()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    let cluster = remote::ClusterSettings::resolve(&config)?;
    let aid = args.aid.or(config.aid).unwrap_or_else(|| "default".into());
    validate_aid(&aid).map_err(|e| anyhow!("--aid {aid:?}: {e}"))?;
    let name = match args.name.or(config.name) {
        Some(n) => n,
        None => format!("{aid}-{:06x}", random_suffix()),
    };
    validate_name(&name).map_err(|e| anyhow!("--name {name:?}: {e}"))?;
    let command = if args.command.is_empty() {
        config.command
    } else {
        args.command
    };
    if command.is_empty() {
        bail!("no command: give it after `--` or as `command` in the config");
    }
    let ports = if args.ports.is_empty() {
        config.ports.iter().map(|p| p.port).collect()
    } else {
        args.ports
    };
    if ports.contains(&0) {
        bail!("--port 0: port 0 asks the kernel for any port and is never multiplexed");
    }
    let user = args
        .user
        .or(config.user)
        .map(|spec| user::resolve(&spec))
        .transpose()?;
    let range = args.port_range.unwrap_or(config.port_range);
    let (eph_lo, eph_hi) = ephemeral_range()?;
    if range.start <= eph_hi && range.end >= eph_lo {
        tracing::warn!("port range {range} overlaps the ephemeral range {eph_lo}-{eph_hi}: allocations may collide with outgoing connections");
    }
    Ok(Launch {
        name,
        aid,
        command,
        cwd: config.cwd,
        env: config.env.into_iter().collect(),
        ports,
        ephemeral_start: eph_lo,
        range,
        allocation_timeout_ms: args
            .allocation_timeout_ms
            .unwrap_or(config.allocation_timeout.as_millis() as u64),
        run_dir: run_dir.to_path_buf(),
        mode: Mode::Run,
        cluster,
        identity: None,
        user,
        remove_on_exit: args.rm,
        pidfile: args.pidfile,
        log_max_bytes: args.log_max_size,
        restart: args.restart,
        config: config_path,
        routing: Routing::default(),
        free_ports: 0,
    })
}

fn parse_hostname(arg: &str) -> Result<String, String> {
    validate_hostname(arg).map_err(|e| e.to_string())?;
    Ok(arg.to_string())
}

/// `--value KEY=VALUE`.
fn parse_value(arg: &str) -> Result<(String, Pattern), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not KEY=VALUE"))?;
    validate_value_key(key).map_err(|e| e.to_string())?;
    Ok((key.to_string(), value.parse()?))
}

fn parse_env(arg: &str) -> Result<(String, Pattern), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not KEY=VALUE"))?;
    validate_env_key(key).map_err(|e| e.to_string())?;
    Ok((key.to_string(), value.parse()?))
}

fn parse_run_as(arg: &str) -> Result<user::RunAs, String> {
    user::RunAs::from_arg(arg).ok_or_else(|| format!("`{arg}` is not UID:GID:GROUPS"))
}

/// A supervisor launch that restores `image`. The image is checked in full
/// here, before any process exists.
fn restore_launch(
    image: &Path,
    name: Option<String>,
    aid: Option<String>,
    tcp_close: bool,
    lazy: Option<LazySettings>,
    run_dir: &Path,
) -> anyhow::Result<Launch> {
    let (path, img) = checked_image(image)?;
    if lazy.is_some() {
        appshot_snapshot::lazy::check(&img)?;
    }
    let info = &img.manifest.instance;
    image_launch(
        Mode::Restore {
            image: path,
            tcp_close,
            lazy,
        },
        info.command.clone(),
        info.multiplexed.clone(),
        name.unwrap_or_else(|| info.name.clone()),
        aid.unwrap_or_else(|| info.aid.clone()),
        run_dir,
    )
}

/// The image at `image`, its headers, manifests and layouts checked (a
/// truncated or malformed image is refused here, before anything starts);
/// its pages are checked by the supervisor while it rebuilds the processes
/// (or, restored lazily, by its page server), not read through twice.
fn checked_image(image: &Path) -> anyhow::Result<(PathBuf, appshot_snapshot::image::Image)> {
    let path =
        std::fs::canonicalize(image).with_context(|| format!("image {}", image.display()))?;
    let img = appshot_snapshot::image::Image::open_pages_unchecked(&path)?;
    appshot_snapshot::restore::check_files(&img)?;
    Ok((path, img))
}

/// After the clones answered: the shells for the next clones of
/// `launch`'s template start while they run.
fn replenish(run_dir: &Path, launch: &Launch, size: Option<u32>, verbose: u8) {
    if let Mode::Clone { template } = &launch.mode {
        if let Err(e) = pool::replenish(run_dir, template, size, verbose) {
            tracing::warn!("starting instance shells for the next clones: {e}");
        }
    }
}

/// Refuses rules whose values have no file to carry them.
fn check_rules(rules: &CloneRules) -> anyhow::Result<()> {
    if rules.identity_file.is_none() && !rules.values.is_empty() {
        let keys: Vec<&str> = rules.values.keys().map(String::as_str).collect();
        bail!(
            "values {} need an identity file to carry them: give --identity-file PATH or the config's [clone] identity_file",
            keys.join(", ")
        );
    }
    if rules.env_file.is_none() && !rules.env.is_empty() {
        let keys: Vec<&str> = rules.env.keys().map(String::as_str).collect();
        bail!(
            "--env {} need an environment file to carry them (a running clone's environment is the template's memory): give --env-file PATH or the config's [clone] env_file",
            keys.join(", ")
        );
    }
    Ok(())
}

/// A clone's hostname and files, as `rules` render them for it.
fn clone_identity(rules: &CloneRules, identity: appshot_configurator::Identity) -> CloneIdentity {
    CloneIdentity {
        hostname: identity.hostname,
        file: rules.identity_file.clone().map(|path| IdentityFile {
            path,
            values: identity.values,
        }),
        env_file: rules.env_file.clone().map(|path| IdentityFile {
            path,
            values: identity.env,
        }),
    }
}

/// The launch of a single detached clone (`one`: its AID and name) made
/// without opening the template, for one of the template's instance
/// shells to complete from the image it holds (`detach::detach_unopened`):
/// the shell opened and verified the image when it started and refuses the
/// claim if the file changed since, so the CLI checks here only what needs
/// no image (the rules, the clone's identity, AID and name). Opening the
/// template, its manifest and the files it maps was most of the CLI's own
/// work before the claim, on the path of the clone's first answer. `None`
/// when the template path does not resolve (the full path says why).
fn unopened_launch(
    template: &Path,
    (clone_aid, clone_name): &(String, String),
    rules: &CloneRules,
    range: PortRange,
    run_dir: &Path,
) -> anyhow::Result<Option<Launch>> {
    check_rules(rules)?;
    let Ok(path) = std::fs::canonicalize(template) else {
        return Ok(None);
    };
    let identity = rules.render(&CloneId {
        number: 1,
        aid: clone_aid,
        name: clone_name,
    })?;
    let mode = Mode::Clone { template: path };
    let mut launch = image_launch(
        mode,
        Vec::new(),
        Vec::new(),
        clone_name.clone(),
        clone_aid.clone(),
        run_dir,
    )?;
    launch.identity = Some(clone_identity(rules, identity));
    launch.range = range;
    Ok(Some(launch))
}

/// Launches for the clones of a template in `plan` (AID and name of
/// each). Everything that could make a clone fail for a reason known now
/// (not a template, changed files, names in use, identities the rules
/// cannot render, too few real ports) is checked before the first one
/// starts. The template's pages are verified here (once per unchanged
/// file, see `snapshots::open_template`); the clones skip that. A single
/// detached clone that will claim an instance shell leaves the real ports
/// to its supervisor, which counts them in the transaction that records
/// the clone, from the registry connection it opened ahead: reading the
/// registry here was about 0.9 ms of the clone's start.
fn clone_launches(
    template: &Path,
    plan: &[(String, String)],
    rules: &CloneRules,
    range: PortRange,
    run_dir: &Path,
    detach: bool,
) -> anyhow::Result<(Vec<Launch>, bool)> {
    check_rules(rules)?;
    let path = std::fs::canonicalize(template)
        .with_context(|| format!("template {}", template.display()))?;
    let img = snapshots::open_template(&path, run_dir)?;
    appshot_snapshot::restore::check_files(&img)?;
    if !img.manifest.instance.template {
        bail!(
            "{} is not a template: take one with `appshot snapshot NAME --template -o {}`",
            template.display(),
            template.display()
        );
    }
    let mut launches = Vec::new();
    for (number, (clone_aid, clone_name)) in (1..).zip(plan) {
        let identity = rules.render(&CloneId {
            number,
            aid: clone_aid,
            name: clone_name,
        })?;
        if appshot_vpm::is_alive(run_dir, clone_name) {
            return Err(appshot_vpm::VpmError::NameInUse(clone_name.clone()).into());
        }
        let mode = Mode::Clone {
            template: path.clone(),
        };
        let info = &img.manifest.instance;
        let mut launch = image_launch(
            mode,
            info.command.clone(),
            info.multiplexed.clone(),
            clone_name.clone(),
            clone_aid.clone(),
            run_dir,
        )?;
        launch.identity = Some(clone_identity(rules, identity));
        launch.range = range;
        launches.push(launch);
    }
    let sockets = img
        .manifest
        .processes
        .iter()
        .map(|p| p.listening().count())
        .sum::<usize>();
    let forkable = appshot_snapshot::holder::unforkable(&img).is_none();
    match launches.as_mut_slice() {
        [one] if detach && forkable && pool::ready(run_dir, &path) > 0 => one.free_ports = sockets,
        _ => {
            let registry = appshot_vpm::Registry::open(run_dir)?;
            supervisor::check_free_ports(&registry.read()?, range, sockets, launches.len())
                .map_err(|why| anyhow!(why))?;
        }
    }
    Ok((launches, forkable))
}

/// The launch of an image's instance: `command` and `ports` are the
/// image's (its command line and multiplexed ports).
fn image_launch(
    mode: Mode,
    command: Vec<String>,
    ports: Vec<u16>,
    name: String,
    aid: String,
    run_dir: &Path,
) -> anyhow::Result<Launch> {
    validate_aid(&aid).map_err(|e| anyhow!("--aid {aid:?}: {e}"))?;
    validate_name(&name).map_err(|e| anyhow!("--name {name:?}: {e}"))?;
    let defaults = AppConfig::default();
    Ok(Launch {
        name,
        aid,
        command,
        cwd: None,
        env: Vec::new(),
        ports,
        ephemeral_start: ephemeral_range()?.0,
        range: defaults.port_range,
        allocation_timeout_ms: defaults.allocation_timeout.as_millis() as u64,
        run_dir: run_dir.to_path_buf(),
        mode,
        cluster: remote::ClusterSettings::resolve(&defaults)?,
        identity: None,
        user: None,
        remove_on_exit: false,
        pidfile: None,
        log_max_bytes: logs::DEFAULT_MAX_BYTES,
        restart: restart::Policy::No,
        config: None,
        routing: Routing::default(),
        free_ports: 0,
    })
}

fn ephemeral_range() -> anyhow::Result<(u16, u16)> {
    let path = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi))) => Ok((lo, hi)),
        _ => bail!("{path}: unexpected contents {text:?}"),
    }
}

fn random_suffix() -> u32 {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        return std::process::id();
    }
    u32::from_ne_bytes(b) & 0xff_ffff
}

/// Runs `f` on every item, reporting each failure; fails (125) if any did,
/// after trying them all.
fn each<T>(items: &[T], mut f: impl FnMut(&T) -> anyhow::Result<()>) -> anyhow::Result<i32> {
    let mut failed = 0;
    for item in items {
        if let Err(e) = f(item) {
            eprintln!("appshot: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("{failed} of {} failed", items.len());
    }
    Ok(0)
}

/// A detached supervisor (`appshot __supervise`). Its stdout is the
/// starter's pipe, on which it waits for the start's outcome; its stderr
/// is its log. The application's output (and a restored one's, which takes
/// the supervisor's stdio) goes through a pipe on fds 1 and 2 into
/// `app.log`; when the instance has ended the record of how is written.
/// Where a detached supervisor's (or a shell's) own log is written, so a
/// claimed shell can move it to its clone's log directory.
static OWN_LOG_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

fn supervise(launch: Launch) -> anyhow::Result<i32> {
    let ready = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout")?;
    let read = output_pipe()?;
    supervise_with(launch, None, ready, read)
}

/// Makes stdout and stderr (the application's, through init's) a pipe
/// whose read end is returned, for the log capture.
fn output_pipe() -> anyhow::Result<OwnedFd> {
    let (read, write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("the output pipe")?;
    for fd in [1, 2] {
        nix::unistd::dup2(write.as_raw_fd(), fd).context("redirecting stdio to the output pipe")?;
    }
    Ok(read)
}

/// `__shell`: an instance shell waits to be claimed (see
/// `supervisor::pool`), then supervises its clone as `__supervise` does.
fn shell(run_dir: &Path, template: &Path) -> anyhow::Result<i32> {
    // Before init starts: it and the clone inherit the output pipe.
    let read = output_pipe()?;
    let Some(claimed) = pool::wait_for_claim(run_dir, template)? else {
        return Ok(0);
    };
    if claimed.unopened {
        if let Err(e) = make_clone_logs(&claimed) {
            let status = e
                .downcast_ref::<error::RuntimeError>()
                .map_or(125, error::RuntimeError::exit_status);
            let _ = nix::unistd::write(&claimed.answer, detach::refusal(status, &e).as_bytes());
            return Err(e);
        }
    }
    let log = logs::append(
        &logs::dir(&claimed.launch.run_dir, &claimed.launch.name).join(logs::SUPERVISOR_LOG),
    )?;
    let own = OWN_LOG_FD.load(std::sync::atomic::Ordering::Relaxed);
    if own >= 0 {
        nix::unistd::dup2(log.as_raw_fd(), own).context("moving the log to the clone's")?;
    }
    drop(log);
    tracing::info!(name = %claimed.launch.name, init = claimed.shell.init.pid, "instance shell claimed");
    if let Err(e) = pool::show_as_supervisor() {
        tracing::warn!("showing the claimed shell as its clone's supervisor: {e}");
    }
    supervise_with(claimed.launch, Some(claimed.shell), claimed.answer, read)
}

/// The log directory of the clone a shell completed the launch of (see
/// `pool::claim`): the CLI left it to the shell, which has the registry
/// open. Its name is checked first, as the CLI checks it: the logs of a
/// name in use belong to the running instance.
fn make_clone_logs(claimed: &pool::Claimed) -> anyhow::Result<()> {
    let launch = &claimed.launch;
    if appshot_vpm::is_alive(&launch.run_dir, &launch.name) {
        return Err(appshot_vpm::VpmError::NameInUse(launch.name.clone()).into());
    }
    let opened;
    let registry = match claimed.shell.registry(&launch.run_dir) {
        Some(registry) => registry,
        None => {
            opened = appshot_vpm::Registry::open(&launch.run_dir)?;
            &opened
        }
    };
    logs::make_dir(registry, &launch.name)?;
    Ok(())
}

fn supervise_with(
    launch: Launch,
    shell: Option<pool::Shell>,
    ready: OwnedFd,
    read: OwnedFd,
) -> anyhow::Result<i32> {
    let log_dir = logs::dir(&launch.run_dir, &launch.name);
    let capture = logs::capture(log_dir.clone(), read, launch.log_max_bytes);
    let created = logs::now_unix();
    let mut ready = Some(std::fs::File::from(ready));
    let result = supervisor::run_in(launch.clone(), shell, &mut ready);
    // The supervisor's ends were the last: the capture ends and is joined,
    // so the log is complete before anyone is told the instance ended.
    let null = std::fs::File::open("/dev/null").context("opening /dev/null")?;
    for fd in [1, 2] {
        nix::unistd::dup2(null.as_raw_fd(), fd).context("closing the output pipe")?;
    }
    let _ = capture.join();
    let (status, restarts) = match &result {
        Ok(ended) => (ended.status, ended.restarts),
        Err(e) => (i32::from(e.exit_status()), 0),
    };
    if let Some(path) = &launch.pidfile {
        // Only our own: a newer instance may have written it since.
        let ours = std::fs::read_to_string(path)
            .is_ok_and(|pid| pid.trim() == std::process::id().to_string());
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
    if launch.remove_on_exit {
        let _ = std::fs::remove_dir_all(&log_dir);
    } else {
        let mut exited =
            logs::Exited::new(&launch.name, &launch.aid, &launch.command, created, status);
        exited.restarts = restarts;
        if let Err(e) = logs::record_exit(&launch.run_dir, &exited) {
            tracing::warn!("{e}");
        }
    }
    if let (Some(mut r), Ok(_)) = (ready, &result) {
        let _ = std::io::Write::write_fmt(&mut r, format_args!("exited {status}\n"));
    }
    Ok(result?.status)
}
