//! Wiring of the two daemons: `mig serve` (Source and Target actors, GUI, mon) and `mig helper`
//! (the MigHelper actor for one operation). Each binds its ports first, so a port that cannot be
//! bound is reported before anything else starts.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use actix::{Actor, Addr};
use actors::auth::AppKey;
use actors::book::OpBook;
use actors::cancel::{Canceller, Keys};
use actors::faults::Faults;
use actors::handoff::{HelperEnv, HELPER_ENV_VAR};
use actors::journal::Journal;
use actors::mig_helper::MigHelper;
use actors::op::Role;
use actors::properties::Properties;
use actors::runner::{SshConnect, StepRunner};
use actors::source::{Source, SourceConfig};
use actors::target::Target;
use proxy::{Proxy, ProxyConfig, ProxyStats, Shutdown as ProxyShutdown};
use tokio_util::sync::CancellationToken;

use crate::server::{self, Shared};
use crate::site::{self, Site};

/// A reason to stop at start-up, with the process exit code.
#[derive(Debug)]
pub struct Fatal {
    pub code: u8,
    pub message: String,
}

fn fatal(message: impl Into<String>) -> Fatal {
    Fatal {
        code: 1,
        message: message.into(),
    }
}

fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, Fatal> {
    TcpListener::bind(addr).map_err(|e| {
        fatal(format!(
            "{what} did not start: cannot listen on {addr}: {e}"
        ))
    })
}

/// The operation journal in `state_dir`, and the runner the actors reach grids with (over SSH,
/// with the key and pinned host keys the properties name).
fn open_book_and_runner(props: &Properties) -> Result<(OpBook, StepRunner), Fatal> {
    let book = Journal::open(&props.state_dir)
        .and_then(OpBook::open)
        .map_err(|e| {
            fatal(format!(
                "cannot open the operation journal (state_dir): {e}"
            ))
        })?;
    let connect = SshConnect {
        key_file: props.private_key_file.clone(),
        known_hosts: props.known_hosts_file.clone(),
        grids: Default::default(),
    };
    let faults = Faults::new(props.fault_dir.clone());
    let runner = StepRunner::new(book.clone(), Arc::new(connect)).with_faults(faults);
    Ok((book, runner))
}

/// Binds the GUI and mon ports, logs where they are, and serves until SIGTERM/SIGINT. On the
/// signal the proxy (when there is one) closes its listeners and drains while the GUI finishes.
async fn listen_and_serve(
    props: &Properties,
    shared: Shared,
    proxy: Option<Addr<Proxy>>,
) -> Result<(), Fatal> {
    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone())?;
    let gui = bind("httpd", SocketAddr::new(props.listen, props.port_no))?;
    let mon = bind("mon", SocketAddr::new(props.listen, props.mon_port))?;
    let addr = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(gui = %format!("http://{}/", addr(&gui)), mon = %format!("http://{}/healthz", addr(&mon)), "serving");
    let drain = {
        let shutdown = shutdown.clone();
        async move {
            if let Some(p) = proxy {
                shutdown.cancelled().await;
                let _ = p.send(ProxyShutdown).await;
                tracing::info!("pass-through drained");
            }
        }
    };
    let (served, ()) = tokio::join!(server::run(shared, gui, mon, shutdown), drain);
    served.map_err(|e| fatal(format!("server failed: {e}")))
}

/// Starts the pass-through listeners for `passthrough` on `listen`, to `aux`.
async fn start_proxy(
    props: &Properties,
    stats: Arc<ProxyStats>,
) -> Result<Option<Addr<Proxy>>, Fatal> {
    if props.passthrough.is_empty() {
        return Ok(None);
    }
    if let Err(e) = proxy::raise_fd_limit() {
        tracing::warn!(error = %e, "cannot raise the open-file limit; fewer pass-through connections fit");
    }
    let mut cfg = ProxyConfig::new(props.listen, props.aux.clone(), props.passthrough.clone());
    cfg.max_connections = props.max_connections;
    cfg.max_connections_per_client = props.max_connections_per_client;
    cfg.connect_timeout = props.connect_timeout;
    cfg.idle_timeout = props.idle_timeout;
    cfg.drain = props.drain_timeout;
    cfg.path = props.proxy_path;
    // On an arbiter (thread) of its own, so bulk traffic cannot delay the GUI or the actors.
    let arbiter = actix::Arbiter::new();
    let (proxy, _addrs) = Proxy::start_on(&arbiter.handle(), cfg, stats)
        .await
        .map_err(|e| fatal(format!("pass-through did not start: {e}")))?;
    match &props.aux {
        Some(aux) => tracing::info!(ports = ?props.passthrough, %aux, "passing through"),
        None => {
            tracing::warn!(ports = ?props.passthrough, "aux is not set: pass-through connections are closed at once")
        }
    }
    Ok(Some(proxy))
}

/// `mig serve`.
pub async fn serve(props: Properties) -> Result<(), Fatal> {
    // Before the actors start: what they record before a recorder exists is lost.
    crate::metrics::install();
    site::run_rc_local(&props.config_dir).await.map_err(fatal)?;
    let site = Site::inspect(props);
    for p in &site.problems {
        tracing::warn!("{p}");
    }
    let props = site.props.clone();
    let (book, runner) = open_book_and_runner(&props)?;
    // Before any actor commits, so no start or end goes unannounced.
    let lifecycle = book.subscribe();

    // Without a usable key MIG can neither reach a grid nor check a handoff.
    let key_ok = actors::keys::check_private_key(&props.private_key_file).is_ok();
    let app_key = match AppKey::load_or_create(&props.handoff_key_file) {
        Ok(k) => key_ok.then_some(k),
        Err(e) => {
            tracing::warn!(
                "operations are not offered: the handoff secret {} is not usable: {e}",
                props.handoff_key_file.display()
            );
            None
        }
    };
    let (mut handoff, mut status, mut source) = (None, None, None);
    let mut canceller = None;
    if let Some(app_key) = app_key {
        let me = props
            .app_name
            .iter()
            .flat_map(|a| [(Role::Source, a.clone()), (Role::Target, a.clone())])
            .collect();
        canceller = Some(Canceller::new(book.clone(), Keys::App(app_key.clone()), me));
        let target = Target::new(app_key.clone(), props.app_name.clone(), runner.clone()).start();
        status = Some(target.clone().recipient());
        handoff = Some(target.recipient());
        match site.operations_unavailable() {
            Some(why) => tracing::warn!("operations are not offered: {why}"),
            None => {
                let own = site
                    .own_grid
                    .clone()
                    .expect("no problems means own grid known");
                tracing::info!(grid = %own, "operations offered");
                let cfg = SourceConfig {
                    mode: props.mode,
                    app_name: props.app_name.clone(),
                    site: Ok((
                        site.grid_info
                            .clone()
                            .expect("no problems means grid.info parsed"),
                        own,
                    )),
                    app_key,
                    private_key: read(&props.private_key_file)?,
                    known_hosts: read(&props.known_hosts_file)?,
                    otlp_endpoint: props.otlp_endpoint.clone(),
                    precopy: props.precopy,
                    gui: actors::auth::GuiCredentials::new(&props.username, &props.password),
                };
                let started = Source::new(cfg, runner).start();
                if let Some(c) = canceller.as_mut() {
                    c.source = Some(started.clone().recipient());
                }
                source = Some(started);
            }
        }
    } else {
        tracing::warn!("operations are not offered: the private key is not usable (see mig check)");
    }
    let mut shared = Shared::new(Some(site), book, actors::api::SERVE_ROLES.to_vec());
    shared.handoff = handoff;
    shared.status = status;
    shared.source = source;
    shared.canceller = canceller.map(Arc::new);
    shared.faults = Faults::new(props.fault_dir.clone());
    if !props.webhook_url.is_empty() {
        crate::webhook::Webhooks {
            urls: props.webhook_url.clone(),
            secret: props.webhook_secret.clone(),
            audit: shared.audit.clone(),
            backoff: crate::webhook::BACKOFF.to_vec(),
        }
        .spawn(lifecycle);
        let to: Vec<String> = props
            .webhook_url
            .iter()
            .map(|u| crate::webhook::target(u))
            .collect();
        tracing::info!(webhooks = ?to, "announcing operations to webhooks");
    }
    let stats = Arc::new(ProxyStats::new());
    let proxy = start_proxy(&props, stats.clone()).await?;
    if proxy.is_some() {
        shared.proxy_stats = Some(stats);
    }
    listen_and_serve(&props, shared, proxy).await
}

fn read(path: &Path) -> Result<String, Fatal> {
    std::fs::read_to_string(path).map_err(|e| fatal(format!("{}: {e}", path.display())))
}

/// `mig helper`: MigHelper for the one operation named in `MIG_HELPER_ENV`.
pub async fn helper(mut props: Properties, env: Option<String>) -> Result<(), Fatal> {
    crate::metrics::install();
    let env = env.ok_or_else(|| Fatal {
        code: 2,
        message: format!("{HELPER_ENV_VAR} is not set: mig helper runs only as the MigHelper application that MIG provisions"),
    })?;
    let env = HelperEnv::decode(&env).map_err(|message| Fatal { code: 2, message })?;

    // The credentials arrive in the environment; libssh2 wants files, private to this helper.
    let creds = props.state_dir.join("credentials");
    std::fs::create_dir_all(&creds).map_err(|e| fatal(format!("{}: {e}", creds.display())))?;
    props.private_key_file = creds.join("private.key");
    props.known_hosts_file = creds.join("known_hosts");
    write_private(&props.private_key_file, &env.private_key)?;
    write_private(&props.known_hosts_file, &env.known_hosts)?;

    let (book, runner) = open_book_and_runner(&props)?;
    let span = tracing::info_span!("op", op_id = %env.op_id, actor = "mig_helper");
    span.in_scope(|| tracing::info!("MigHelper starting"));
    let helper = MigHelper::new(env.op_id.clone(), env.op_key(), runner).start();
    let mut canceller = Canceller::new(
        book.clone(),
        Keys::One(env.op_id.clone(), env.op_key()),
        vec![(Role::Helper, actors::op::helper_app_name(&env.op_id))],
    );
    canceller.helper = Some(helper.clone().recipient());
    let mut shared = Shared::new(None, book, actors::api::HELPER_ROLES.to_vec());
    shared.canceller = Some(Arc::new(canceller));
    // The source MIG's GUI credentials (the password as a MAC): a cancel here needs them too.
    shared.credentials = env
        .gui
        .as_ref()
        .and_then(|(user, mac)| actors::auth::GuiCredentials::from_mac(user, &env.op_key(), mac));
    shared.handoff = Some(helper.clone().recipient());
    shared.status = Some(helper.recipient());
    shared.faults = Faults::new(props.fault_dir.clone());
    shared.hosts = crate::host_check::HostCheck::new(&props, None);
    listen_and_serve(&props, shared, None).await
}

/// Writes a key or known_hosts file readable by this user only ([`create_private`]).
fn write_private(path: &Path, text: &str) -> Result<(), Fatal> {
    use std::io::Write;
    let err = |e: std::io::Error| fatal(format!("{}: {e}", path.display()));
    create_private(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(err)
}

/// Opens `path` empty and 0600 before a byte of the secret goes in: created with that mode (never
/// world-readable for a moment between a write and a chmod), and an existing file with a looser
/// mode narrowed first.
fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// Cancels `shutdown` on SIGTERM (the grid stopping the application) or SIGINT (Ctrl-C). The
/// handlers are installed before this returns, so a signal that arrives at once is not lost to the
/// default action (which would end MIG without draining).
fn stop_on_signal(shutdown: CancellationToken) -> Result<(), Fatal> {
    use tokio::signal::unix::{signal, SignalKind};
    let install =
        |kind| signal(kind).map_err(|e| fatal(format!("cannot install signal handlers: {e}")));
    let (mut term, mut int) = (
        install(SignalKind::terminate())?,
        install(SignalKind::interrupt())?,
    );
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let path = dir.path().join("private.key");
        let file = create_private(&path).unwrap();
        assert_eq!(mode(&path), 0o600, "created private, not chmodded after");
        drop(file);
        write_private(&path, "secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "secret");

        // An existing file with a looser mode is narrowed before the secret goes in.
        let old = dir.path().join("known_hosts");
        std::fs::write(&old, "a much longer old text").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        let file = create_private(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(file.metadata().unwrap().len(), 0, "truncated");
        drop(file);
        write_private(&old, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "new");
    }
}
