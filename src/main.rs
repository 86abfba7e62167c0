//! `mig`: the self-migration enabler of an application. This file only parses the command line and
//! calls into the library; see `mig --help`.
#![forbid(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

use actors::properties::{self, Properties};
use clap::{Args, Parser, Subcommand};
use mig::logging::{self, LogFormat};
use mig::site::{self, Site};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "mig",
    version,
    about = "MIG moves the application it lives in to another grid (migrate) or copies it there stopped (snapshot).",
    long_about = "MIG moves the application it lives in to another grid (migrate) or copies it there \
                  stopped (snapshot).\n\nProperties load from the built-in defaults, then CONFIG_DIR/mig.toml, \
                  then MIG_<NAME> environment variables, then --set NAME=VALUE; the later wins."
)]
struct Cli {
    /// How log lines are written to standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Which log lines are written, RUST_LOG-style (e.g. `info,actors=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance daemon: the GUI and API on `port_no`, the pass-through ports, and `mon`.
    Serve(ConfigArgs),
    /// Run every start-up check without side effects: exit 0, or exit 2 with one line per problem.
    Check(ConfigArgs),
}

#[derive(Args)]
struct ConfigArgs {
    /// The config volume: mig.toml, grid.info, private.key, known_hosts, .rc.local.
    #[arg(long, value_name = "DIR", default_value = properties::DEFAULT_CONFIG_DIR)]
    config_dir: PathBuf,
    /// Set a property, overriding every other layer; repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    sets: Vec<String>,
}

impl ConfigArgs {
    /// Loads the properties, or prints every problem and says to exit 2.
    fn load(&self) -> Result<Properties, ExitCode> {
        properties::load(&self.config_dir, std::env::vars(), &self.sets).map_err(|errors| {
            for e in errors {
                println!("{e}");
            }
            ExitCode::from(2)
        })
    }
}

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logging::init(cli.log_format, &cli.log) {
        eprintln!("mig: {e:#}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Check(args) => check(args),
        Command::Serve(args) => serve(args).await,
    };
    result.unwrap_or_else(|code| code)
}

fn check(args: ConfigArgs) -> Result<ExitCode, ExitCode> {
    let site = Site::inspect(args.load()?);
    for p in &site.problems {
        println!("{p}");
    }
    match (&site.own_grid, site.own()) {
        (Ok(_), Some(g)) => println!(
            "own grid: {} ({}), MIG_ip {}",
            g.id,
            g.location.as_deref().unwrap_or("no location"),
            g.mig_ip
        ),
        _ if site.problems.is_empty() => {
            println!("own grid: cannot tell: {}", why_or(&site.own_grid))
        }
        _ => {}
    }
    if site.problems.is_empty() {
        let n = site.grid_info.as_ref().map_or(0, |g| g.grids.len());
        println!("ok: {n} grid(s) in {}", site.props.grid_info_file.display());
        Ok(ExitCode::SUCCESS)
    } else {
        Err(ExitCode::from(2))
    }
}

fn why_or(r: &Result<String, String>) -> &str {
    r.as_ref().err().map_or("unknown", String::as_str)
}

async fn serve(args: ConfigArgs) -> Result<ExitCode, ExitCode> {
    let props = args.load()?;
    let fail = |msg: String| {
        tracing::error!("{msg}");
        eprintln!("mig: {msg}");
        ExitCode::FAILURE
    };
    site::run_rc_local(&props.config_dir).await.map_err(fail)?;

    let site = Site::inspect(props);
    for p in &site.problems {
        tracing::warn!("{p}");
    }
    match site.operations_unavailable() {
        Some(why) => tracing::warn!("operations are not offered: {why}"),
        None => {
            tracing::info!(grid = %site.own_grid.as_deref().unwrap_or_default(), "operations offered")
        }
    }

    let p = &site.props;
    let gui = bind(SocketAddr::new(p.listen, p.port_no))
        .map_err(|e| fail(format!("httpd did not start: {e}")))?;
    let mon = bind(SocketAddr::new(p.listen, p.mon_port))
        .map_err(|e| fail(format!("mon did not start: {e}")))?;
    tracing::info!(
        gui = %format!("http://{}/", gui.local_addr().map_err(|e| fail(e.to_string()))?),
        mon = %format!("http://{}/healthz", mon.local_addr().map_err(|e| fail(e.to_string()))?),
        "serving"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    mig::server::run(site, gui, mon, shutdown)
        .await
        .map_err(|e| fail(format!("server failed: {e}")))?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// Cancels `shutdown` on SIGTERM (the grid stopping the application) or SIGINT (Ctrl-C).
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop MIG with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
