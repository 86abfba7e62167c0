//! [`Traced`]: the grid wrapper that times every command of an operation.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::CommandEvent;
use crate::controller::{
    AppInfo, AppSummary, GridController, GridFuture, MigrateOptions, ProgressFn, VolumeChecksum,
};

/// A [`GridController`] that times every command into the operation's trace and the log (inside
/// the caller's span, so with the operation id).
pub(super) struct Traced {
    pub(super) inner: Arc<dyn GridController>,
    pub(super) log: Arc<Mutex<Vec<CommandEvent>>>,
}

impl Traced {
    fn run<'a, T: Send + 'a>(&'a self, what: String, fut: GridFuture<'a, T>) -> GridFuture<'a, T> {
        Box::pin(async move {
            let at = crate::op::now();
            let start = Instant::now();
            let r = fut.await;
            let millis = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
            let error = r.as_ref().err().map(ToString::to_string);
            let controller = self.inner.controller();
            match &error {
                None => tracing::info!(%controller, command = %what, millis, "grid command"),
                Some(e) => {
                    tracing::warn!(%controller, command = %what, millis, error = %e, "grid command failed")
                }
            }
            self.log.lock().expect("trace lock").push(CommandEvent {
                at,
                what: format!("{what} on {controller}"),
                millis,
                error,
            });
            r
        })
    }
}

impl GridController for Traced {
    fn controller(&self) -> &dialect::Controller {
        self.inner.controller()
    }
    fn list(&self) -> GridFuture<'_, Vec<AppSummary>> {
        self.run("app list".into(), self.inner.list())
    }
    fn info<'a>(&'a self, name: &'a str) -> GridFuture<'a, AppInfo> {
        self.run(format!("app info {name}"), self.inner.info(name))
    }
    fn provision<'a>(
        &'a self,
        template: &'a str,
        name: &'a str,
        props: &'a [(String, String)],
    ) -> GridFuture<'a, ()> {
        self.run(
            format!("app provision {template} {name}"),
            self.inner.provision(template, name, props),
        )
    }
    fn start<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app start {name}"), self.inner.start(name))
    }
    fn stop<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app stop {name}"), self.inner.stop(name))
    }
    fn destroy<'a>(&'a self, name: &'a str) -> GridFuture<'a, ()> {
        self.run(format!("app destroy {name}"), self.inner.destroy(name))
    }
    fn config<'a>(&'a self, name: &'a str, props: &'a [(String, String)]) -> GridFuture<'a, ()> {
        self.run(format!("app config {name}"), self.inner.config(name, props))
    }
    fn migrate_import<'a>(
        &'a self,
        remote: &'a dialect::Controller,
        app: &'a str,
        new_name: &'a str,
        props: &'a [(String, String)],
        opts: MigrateOptions,
        progress: ProgressFn<'a>,
    ) -> GridFuture<'a, ()> {
        // The limit is named in the timeline: it explains a copy slower than the link.
        let limit = opts
            .max_rate
            .map(|r| format!(" {}{r}", dialect::MAX_RATE_OPTION))
            .unwrap_or_default();
        self.run(
            format!("app migrate {remote} {app} .name={new_name} --import{limit}"),
            self.inner
                .migrate_import(remote, app, new_name, props, opts, progress),
        )
    }
    fn checksum<'a>(&'a self, name: &'a str) -> GridFuture<'a, Vec<VolumeChecksum>> {
        self.run(format!("app checksum {name}"), self.inner.checksum(name))
    }
    fn grid_summary(&self) -> GridFuture<'_, crate::controller::GridSummary> {
        self.run("app grid".into(), self.inner.grid_summary())
    }
    fn check_import<'a>(
        &'a self,
        remote: &'a dialect::Controller,
        app: &'a str,
        new_name: &'a str,
    ) -> GridFuture<'a, ()> {
        self.run(
            format!("app migrate {remote} {app} .name={new_name} --import --check"),
            self.inner.check_import(remote, app, new_name),
        )
    }
    /// Not a command: no entry in the timeline (the login's time shows in no step).
    fn warm_up(self: Arc<Self>) -> GridFuture<'static, ()> {
        self.inner.clone().warm_up()
    }
}
