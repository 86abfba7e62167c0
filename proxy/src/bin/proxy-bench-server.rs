//! The Proxy actor alone, for `scripts/bench-proxy`: set beside the real `mig serve`, it shows what
//! the rest of MIG costs the proxy. Binds the pass-through ports, prints `ready ADDR...`, and on
//! SIGTERM or SIGINT shuts down gracefully.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::{Context, Result};
use clap::Parser;
use proxy::{self, Proxy, ProxyConfig, ProxyStats, Shutdown};

#[derive(Parser, Debug)]
#[command(about = "Run MIG's pass-through proxy on its own (benchmarks)")]
struct Args {
    /// The `in` address to listen on.
    #[arg(long)]
    listen: IpAddr,
    /// Upstream host; omit to leave aux unconnected.
    #[arg(long)]
    aux: Option<String>,
    /// Pass-through ports, e.g. 80,443,5000-5010.
    #[arg(long)]
    ports: String,
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Connections one client address may hold; the load tool's idle run is one address.
    #[arg(long, default_value_t = proxy::DEFAULT_MAX_CONNECTIONS_PER_CLIENT)]
    max_connections_per_client: usize,
    /// Use the copy loop instead of splice(2) (the same as --path copy).
    #[arg(long)]
    copy: bool,
    /// How bytes move: auto, sockmap, splice or copy (the `proxy_path` property).
    #[arg(long, default_value = "splice")]
    path: proxy::ProxyPath,
    /// Drain period on shutdown, in seconds.
    #[arg(long, default_value_t = 1)]
    drain_secs: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let ports = proxy::parse_passthrough(&args.ports).map_err(anyhow::Error::msg)?;
    let limit = proxy::raise_fd_limit().context("raising the open-file limit")?;
    tracing::info!(limit, "open-file limit");
    let config = ProxyConfig {
        max_connections: args.max_connections,
        max_connections_per_client: args.max_connections_per_client,
        path: if args.copy {
            proxy::ProxyPath::Copy
        } else {
            args.path
        },
        drain: Duration::from_secs(args.drain_secs),
        ..ProxyConfig::new(args.listen, args.aux, ports)
    };
    actix::System::new().block_on(async move {
        let stats = Arc::new(ProxyStats::new());
        let proxy = Proxy::bind(config, stats.clone())
            .await
            .context("binding the pass-through ports")?;
        let addrs: Vec<String> = proxy.local_addrs().iter().map(|a| a.to_string()).collect();
        eprintln!("path {}", proxy.path());
        let addr = proxy.start();
        println!("ready {}", addrs.join(" "));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        addr.send(Shutdown)
            .await
            .context("shutting the proxy down")?;
        for s in stats.snapshot() {
            eprintln!("{}", serde_json::to_string(&s)?);
        }
        Ok(())
    })
}
