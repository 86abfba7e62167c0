//! The `gridctl` binary: a thin CLI over the library (see the crate docs in lib.rs).
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gridctl::{client, daemon, kvstore, lab};

#[derive(Parser)]
#[command(
    name = "gridctl",
    version,
    about = "A reference grid controller for the AppLogic command dialect"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The grid's supervisor: owns the applications, listens on STATE/daemon.sock.
    Daemon {
        #[arg(long)]
        state: PathBuf,
    },
    /// sshd's ForceCommand: runs the command in SSH_ORIGINAL_COMMAND (exit 0 ok, 1 failed, 2 refused).
    Ssh {
        #[arg(long)]
        state: PathBuf,
    },
    /// The built-in kvstore component: PUT/GET /kv/KEY, stored on FILE.
    Kvstore {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        data: PathBuf,
    },
    /// A lab of real sshd grids on loopback.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Starts N grids (g1..gN on 127.0.(BASE+n).1:2222); idempotent.
    Up {
        #[arg(long)]
        grids: u8,
        #[arg(long)]
        dir: PathBuf,
        /// Offset of the grids' addresses: grid n gets 127.0.(BASE+n).x.
        #[arg(long, default_value_t = 0)]
        base: u8,
        /// The `mig` binary the MigHelper template runs (default: `mig` beside gridctl).
        #[arg(long)]
        mig_bin: Option<PathBuf>,
        /// Each grid in its own network namespace (addresses 198.18.(BASE+n).x) behind a router
        /// namespace, so links can be cut and slowed (root only; see DIR/netns).
        #[arg(long)]
        netns: bool,
    },
    /// Stops every grid of the lab; leaves no process behind.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn tracing_init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GRIDCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Daemon { state } => {
            // Detach from whoever started us (lab up, a shell): own session, no terminal.
            let _ = nix::unistd::setsid();
            tracing_init("info");
            rt()?.block_on(daemon::run(state))
        }
        Cmd::Ssh { state } => {
            tracing_init("error");
            std::process::exit(client::main(&state))
        }
        Cmd::Kvstore { listen, data } => {
            tracing_init("info");
            rt()?.block_on(kvstore::run(&listen, &data))
        }
        Cmd::Lab { cmd } => {
            tracing_init("warn");
            match cmd {
                LabCmd::Up {
                    grids,
                    dir,
                    base,
                    mig_bin,
                    netns,
                } => lab::up(&lab::UpOpts {
                    grids,
                    dir,
                    base,
                    mig_bin,
                    netns,
                }),
                LabCmd::Down { dir } => lab::down(&dir),
            }
        }
    }
}
