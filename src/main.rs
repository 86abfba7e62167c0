//! `mig`: the self-migration enabler of an application. This file only parses the command line and
//! calls into the library; see `mig --help`.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use actors::properties::{self, Properties};
use clap::{Args, Parser, Subcommand};
use mig::logging::{self, LogFormat};
use mig::site::Site;
use tracing::Instrument;

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
    /// Run MigHelper for one operation (started by the grid as the MigHelper application; its
    /// operation arrives in MIG_HELPER_ENV and by handoff).
    Helper(ConfigArgs),
    /// Run every start-up check without side effects: exit 0, or exit 2 with one line per problem.
    Check(ConfigArgs),
    /// Move the application behind the MIG at --url to another grid, following it to the end.
    Migrate(OpArgs),
    /// Copy the application behind the MIG at --url to another grid, stopped; the source runs on.
    Snapshot(OpArgs),
    /// Print one operation as JSON, as the MIG at --url knows it: its public view, or with
    /// --user (or --record) its full record (plan, leftovers with the commands that clear them).
    Status {
        /// The MIG (or MigHelper) to ask, e.g. http://10.0.1.10:8080
        #[arg(long)]
        url: String,
        // --user asks for the full record too (the command's help says so).
        #[command(flatten)]
        login: Login,
        /// Ask for the full record even without --user (a MIG with no `username` serves it to
        /// anyone; MigHelper serves none).
        #[arg(long)]
        record: bool,
        /// The operation id.
        op_id: String,
    },
    /// Cancel an operation before its cut-over: it rolls back (the source runs again with its
    /// data) and ends `cancelled`. Ask any MIG (or MigHelper) that knows it; after the cut-over
    /// it is refused.
    Cancel {
        /// A MIG (or MigHelper) that knows the operation, e.g. http://10.0.1.10:8080
        #[arg(long)]
        url: String,
        #[command(flatten)]
        login: Login,
        /// The operation id.
        op_id: String,
    },
}

#[derive(Args)]
struct OpArgs {
    /// The application's MIG, e.g. http://10.0.1.10:8080
    #[arg(long)]
    url: String,
    /// The target grid's id in grid.info.
    #[arg(long, value_name = "GRID")]
    to: String,
    /// The target application's name.
    #[arg(long, value_name = "APP")]
    name: String,
    #[command(flatten)]
    login: Login,
    /// Print only the final summary.
    #[arg(long)]
    quiet: bool,
    /// Bandwidth limit of the copy in bytes per second, with K, M or G (1024-based), e.g. 8M;
    /// "" for no limit. Without it the MIG's `max_rate` property applies.
    #[arg(long, value_name = "RATE")]
    max_rate: Option<String>,
    /// Run every check the operation needs and print them as a table; change nothing. Exit 0
    /// only if every check passed.
    #[arg(long)]
    dry_run: bool,
}

/// How a client command signs in to a MIG's GUI routes.
#[derive(Args)]
struct Login {
    /// GUI username, when the MIG has one.
    #[arg(long)]
    user: Option<String>,
    /// GUI password (or MIG_PASSWORD_CLI in the environment, to keep it out of `ps`).
    #[arg(long, env = "MIG_PASSWORD_CLI", hide_env_values = true)]
    password: Option<String>,
}

impl Login {
    fn credentials(self) -> mig::client::Credentials {
        mig::client::Credentials {
            user: self.user,
            password: self.password,
        }
    }
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
    // The daemons' properties are read first: they may name an OTLP endpoint for the logger.
    // (Property errors are printed, not logged, so nothing is lost before the logger exists.)
    let mut props = match &cli.command {
        Command::Serve(args) | Command::Helper(args) => match args.load() {
            Ok(p) => Some(p),
            Err(code) => return code,
        },
        _ => None,
    };
    // MigHelper exports its spans where the Source that provisioned it does, unless told otherwise
    // (a MigHelper built without the exporter ignores the Source's endpoint rather than refusing it).
    if let (Command::Helper(_), Some(p)) = (&cli.command, props.as_mut()) {
        if cfg!(feature = "otlp") && p.otlp_endpoint.is_none() {
            p.otlp_endpoint = std::env::var(actors::handoff::HELPER_ENV_VAR)
                .ok()
                .and_then(|e| actors::handoff::HelperEnv::decode(&e).ok())
                .and_then(|e| e.otlp_endpoint);
        }
    }
    let otlp = props.as_ref().and_then(|p| p.otlp_endpoint.as_deref());
    let _logging = match logging::init(cli.log_format, &cli.log, otlp) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("mig: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match (cli.command, props) {
        (Command::Check(args), _) => check(args),
        (Command::Serve(_), Some(props)) => {
            let span = tracing::info_span!("mig", command = "serve");
            daemon(mig::daemon::serve(props).instrument(span).await)
        }
        (Command::Helper(_), Some(props)) => {
            let env = std::env::var(actors::handoff::HELPER_ENV_VAR).ok();
            let span = tracing::info_span!("mig", command = "helper");
            daemon(mig::daemon::helper(props, env).instrument(span).await)
        }
        (Command::Migrate(args), _) => operate("migrate", args).await,
        (Command::Snapshot(args), _) => operate("snapshot", args).await,
        (
            Command::Status {
                url,
                login,
                record,
                op_id,
            },
            _,
        ) => {
            let record = record || login.user.is_some();
            status(&url, &op_id, record.then(|| login.credentials())).await
        }
        (Command::Cancel { url, login, op_id }, _) => {
            cancel(&url, &op_id, &login.credentials()).await
        }
        (Command::Serve(_) | Command::Helper(_), None) => unreachable!("loaded above"),
    };
    result.unwrap_or_else(|code| code)
}

fn daemon(r: Result<(), mig::daemon::Fatal>) -> Result<ExitCode, ExitCode> {
    match r {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            tracing::error!("{}", f.message);
            eprintln!("mig: {}", f.message);
            Err(ExitCode::from(f.code))
        }
    }
}

async fn operate(kind: &str, a: OpArgs) -> Result<ExitCode, ExitCode> {
    let fail = |e: anyhow::Error| {
        eprintln!("mig {kind}: {e:#}");
        ExitCode::FAILURE
    };
    let creds = a.login.credentials();
    // Checked here too, so a typo is refused before anything is sent.
    if let Some(r) = &a.max_rate {
        if let Err(e) = properties::parse_rate(r) {
            eprintln!("mig {kind}: --max-rate {r:?}: {e}");
            return Err(ExitCode::from(2));
        }
    }
    if a.dry_run {
        let checks = mig::client::dry_run(&a.url, kind, &a.to, &a.name, &creds)
            .await
            .map_err(fail)?;
        println!("{}", mig::client::checks_table(&checks));
        let failed = checks.iter().filter(|c| !c.ok).count();
        return if failed == 0 {
            println!("every check passed: the {kind} can start");
            Ok(ExitCode::SUCCESS)
        } else {
            println!("{failed} check(s) failed: nothing was started");
            Err(ExitCode::FAILURE)
        };
    }
    let id = mig::client::start(&a.url, kind, &a.to, &a.name, a.max_rate.as_deref(), &creds)
        .await
        .map_err(fail)?;
    println!(
        "{kind} {id} started; follow it at {}{}",
        a.url.trim_end_matches('/'),
        actors::api::MONITOR_PAGE.for_op(&id)
    );
    // Ctrl-C stops following, not the operation: say how to follow it again and how to cancel it.
    let url = a.url.trim_end_matches('/');
    let owner = std::sync::Mutex::new(String::new());
    let op = tokio::select! {
        op = mig::client::follow_noting_owner(&a.url, &id, a.quiet, &owner) => op.map_err(fail)?,
        _ = tokio::signal::ctrl_c() => {
            let owner = owner.lock().expect("owner lock").clone();
            eprintln!("\n{}", mig::client::detached(kind, url, &owner, &id));
            return Err(ExitCode::from(130));
        }
    };
    println!("{}", mig::client::summary(&op));
    if op.state == actors::op::OpState::Succeeded {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(ExitCode::FAILURE)
    }
}

async fn cancel(
    url: &str,
    id: &str,
    creds: &mig::client::Credentials,
) -> Result<ExitCode, ExitCode> {
    match mig::client::cancel(url, id, creds).await {
        Ok(by) => {
            println!(
                "operation {id} cancelled by {} from {} at {}; it rolls back and ends `cancelled` \
                 (follow it: mig status --url {url} {id})",
                by["user"].as_str().unwrap_or("?"),
                by["from"].as_str().unwrap_or("?"),
                by["at"].as_str().unwrap_or("?"),
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("mig cancel: {e:#}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Prints the public view, or the full record when `record` holds the credentials to ask with.
async fn status(
    url: &str,
    id: &str,
    record: Option<mig::client::Credentials>,
) -> Result<ExitCode, ExitCode> {
    let http = reqwest::Client::new();
    let json = match &record {
        Some(creds) => mig::client::fetch_record(&http, url, id, creds)
            .await
            .map(|op| serde_json::to_string_pretty(&op)),
        None => mig::client::fetch(&http, url, id)
            .await
            .map(|op| serde_json::to_string_pretty(&op)),
    };
    match json {
        Ok(json) => {
            println!("{}", json.expect("serializes"));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("mig status: {e:#}");
            Err(ExitCode::FAILURE)
        }
    }
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
