//! The copy's step bodies: the pre-copy while the source still runs, the copy in the stopped
//! phase, and the volume-by-volume comparison that must pass before the target starts.

use std::time::{Duration, Instant};

use super::PROGRESS_EVERY;
use crate::book::OpBook;
use crate::cancel::Gate;
use crate::controller::{GridController, GridFuture, MigrateOptions, ProgressFn};
use crate::faults;
use crate::op::{Op, StepId, MIGRATING, PRECOPYING};
use crate::runner::{destroy_if_ours, StepError, StepRunner, MARK};
use crate::units::human_bytes;

/// How often the pre-copy is tried before the operation rolls back. An interrupted pre-copy (a
/// cut link, a restarted grid daemon) costs only time, since the source still runs, so it is
/// tried again; but boundedly: a link that fails three pre-copies in a row would fail the copy
/// in the stopped phase too, and the operator learns sooner with the source untouched.
const PRECOPY_TRIES: u32 = 3;
/// The pause before the next try, for a daemon or link to come back.
const PRECOPY_PAUSE: Duration = Duration::from_secs(2);

/// [`precopy`], tried again after a failure that may pass (not a permanent one, not a cancel),
/// up to [`PRECOPY_TRIES`] times; each try starts over from a fresh staged copy.
pub(super) async fn precopy_tried(
    runner: &StepRunner,
    gate: &Gate,
    op: &mut Op,
    dst: &dyn GridController,
    plan: &crate::op::Plan,
) -> Result<String, StepError> {
    let mut failed: Vec<String> = Vec::new();
    loop {
        let e = match precopy(runner, op, dst, plan).await {
            Ok(detail) if failed.is_empty() => return Ok(detail),
            Ok(detail) => {
                return Ok(format!(
                    "{detail}, after {} interrupted attempt{} (last: {})",
                    failed.len(),
                    if failed.len() == 1 { "" } else { "s" },
                    failed.last().expect("one failed")
                ))
            }
            Err(e) => e,
        };
        failed.push(e.message.clone());
        let tries = failed.len() as u32;
        if e.permanent || tries >= PRECOPY_TRIES || gate.cancelled().is_some() {
            return Err(e);
        }
        tracing::warn!(attempt = tries, error = %e, "the pre-copy failed; trying again");
        op.trace(
            "step",
            format!("pre-copy attempt {tries} of {PRECOPY_TRIES} failed, trying again: {e}"),
            None,
            None,
        );
        runner.book.publish(op.clone());
        tokio::time::sleep(PRECOPY_PAUSE).await;
    }
}

/// The pre-copy, while the source runs: a target left by an earlier attempt of this operation
/// goes first (one this operation did not make fails the step), then the target grid pulls a
/// staged copy (`--stage`), marked as this operation's and never startable, its progress
/// published as it goes. Returns the step's detail.
async fn precopy(
    runner: &StepRunner,
    op: &mut Op,
    dst: &dyn GridController,
    plan: &crate::op::Plan,
) -> Result<String, StepError> {
    free_target_name(dst, plan, &op.id).await?;
    let (remote, props) = import_args(plan, &op.id)?;
    let mut progress = publishing_progress(&runner.book, op, PRECOPYING);
    let opts = MigrateOptions {
        stage: true,
        max_rate: plan.max_rate,
        ..Default::default()
    };
    pull(dst, plan, &remote, &props, opts, &mut progress)
        .await
        .map_err(|e| {
            staging_refused(&e, plan).unwrap_or_else(|| {
                StepError::from(e)
                    .context(format!("pre-copy from grid {} failed", plan.source_grid))
            })
        })?;
    // Gives `op` back (the callback may hold state to drop).
    drop(progress);
    let bytes = op.step(PRECOPYING).bytes_done.unwrap_or(0);
    Ok(format!(
        "{} pre-copied while the source ran",
        human_bytes(bytes)
    ))
}

/// Clears the target's name for a new copy: destroys a partial one of this operation; a name
/// another application holds fails the step for good.
async fn free_target_name(
    dst: &dyn GridController,
    plan: &crate::op::Plan,
    op_id: &str,
) -> Result<(), StepError> {
    if let Some(taken) = destroy_if_ours(dst, &plan.target_app, op_id).await? {
        return Err(StepError::permanent(format!(
            "the target name is taken: {taken}"
        )));
    }
    Ok(())
}

/// What every pull names: the source's controller, and the target's configuration with this
/// operation's [`MARK`] added (so a partial copy is known as ours).
fn import_args(
    plan: &crate::op::Plan,
    op_id: &str,
) -> Result<(dialect::Controller, Vec<(String, String)>), StepError> {
    let mut props = plan.target_app_config.clone();
    props.push((MARK.to_string(), op_id.to_string()));
    let remote: dialect::Controller = plan
        .source_controller
        .parse()
        .map_err(|e| StepError::permanent(format!("{e}")))?;
    Ok((remote, props))
}

/// Has `dst` pull the source application into the target's name.
fn pull<'a>(
    dst: &'a dyn GridController,
    plan: &'a crate::op::Plan,
    remote: &'a dialect::Controller,
    props: &'a [(String, String)],
    opts: MigrateOptions,
    progress: ProgressFn<'a>,
) -> GridFuture<'a, ()> {
    dst.migrate_import(
        remote,
        &plan.source_app,
        &plan.target_app,
        props,
        opts,
        progress,
    )
}

/// The progress callback of a pull in `step`: each report is kept in `op`, and reaches the op
/// book (and so the page) at most every [`PROGRESS_EVERY`], the last one always.
fn publishing_progress<'a>(
    book: &'a OpBook,
    op: &'a mut Op,
    step: StepId,
) -> impl FnMut(u64, u64) + Send + 'a {
    let mut last = Instant::now() - PROGRESS_EVERY;
    move |done: u64, total: u64| {
        op.set_progress(step, done, total);
        if last.elapsed() >= PROGRESS_EVERY || done == total {
            last = Instant::now();
            book.publish(op.clone());
        }
    }
}

/// A grid whose gridctl has no staged copies (stream format 3) refuses the pre-copy or the final
/// pull; said in MIG's own words, since the public page withholds a controller's output.
fn staging_refused(e: &crate::controller::GridError, plan: &crate::op::Plan) -> Option<StepError> {
    let text = e.to_string();
    let grid = if e.is_refused() && (text.contains("--stage") || text.contains("--delta")) {
        &plan.target_grid
    } else if text.contains("without staged copies") {
        &plan.source_grid
    } else {
        return None;
    };
    Some(StepError::permanent(format!(
        "grid {grid}'s controller runs a gridctl without staged copies (stream format 3), so it \
         cannot pre-copy: run the same gridctl version on both grids, or set precopy = off"
    )))
}

/// Whether `name` on `dst` is this operation's staged copy (the pre-copy), which the final
/// pull completes instead of copying everything again.
async fn is_our_staged_copy(
    dst: &dyn GridController,
    name: &str,
    op_id: &str,
) -> Result<bool, StepError> {
    if crate::runner::app_state(dst, name).await?.is_none() {
        return Ok(false);
    }
    let info = dst.info(name).await?;
    Ok(info.prop(MARK) == Some(op_id)
        && info.extra.iter().any(|(k, v)| k == "staged" && v == "true"))
}

/// One attempt at the copy: a target left by an interrupted copy of this operation is partial,
/// so it goes first (an application of that name that this operation did not make fails the
/// copy and is left alone); then the target grid pulls the application, marked as this
/// operation's, its progress published as it goes; then every volume's checksum is compared on
/// both grids (the source is stopped, so it is stable). Returns the step's detail.
pub(super) async fn copy(
    runner: &StepRunner,
    op: &mut Op,
    src: &dyn GridController,
    dst: &dyn GridController,
    plan: &crate::op::Plan,
) -> Result<String, StepError> {
    runner.faults.hold(faults::HOLD_COPY).await;
    // After a pre-copy only what changed moves, into this operation's staged copy.
    let delta =
        op.has_step(PRECOPYING) && is_our_staged_copy(dst, &plan.target_app, &op.id).await?;
    if !delta {
        free_target_name(dst, plan, &op.id).await?;
    }
    let (remote, props) = import_args(plan, &op.id)?;
    let mut progress = publishing_progress(&runner.book, op, MIGRATING);
    let opts = MigrateOptions {
        delta,
        max_rate: plan.max_rate,
        ..Default::default()
    };
    let import = pull(dst, plan, &remote, &props, opts, &mut progress);
    // The checksums for the verify come after the copy: after a delta both grids' gridctl answer
    // them from the BLAKE3 the delta computed as it read (source) and wrote (target), while the
    // volumes stay as it left them, instead of reading every volume whole once more.
    import.await.map_err(|e| {
        delta
            .then(|| staging_refused(&e, plan))
            .flatten()
            .unwrap_or_else(|| {
                StepError::from(e).context(format!("copy from grid {} failed", plan.source_grid))
            })
    })?;
    // Gives `op` back (the callback may hold state to drop).
    drop(progress);
    runner.faults.hold(faults::HOLD_VERIFY).await;
    let verified = verify(src, &plan.source_app, dst, &plan.target_app).await?;
    if !delta {
        return Ok(verified);
    }
    let pre = op.step(PRECOPYING).bytes_done.unwrap_or(0);
    let changed = op.step(MIGRATING).bytes_done.unwrap_or(0);
    Ok(format!(
        "{} pre-copied, {} changed since; {verified}",
        human_bytes(pre),
        human_bytes(changed)
    ))
}

/// Compares every volume's checksum of the source with the copy's. A difference is permanent: the
/// copy is not the application, and it must not start.
async fn verify(
    src: &dyn GridController,
    source_app: &str,
    dst: &dyn GridController,
    target_app: &str,
) -> Result<String, StepError> {
    let (a, b) = tokio::join!(src.checksum(source_app), dst.checksum(target_app));
    let (mut a, mut b) = (a?, b?);
    // The source's checksums stand for it only while it stays stopped. Read after them, so a
    // start by hand (an operator, a script) before they were taken is seen: such a source may
    // take writes the copy never gets, and starting the copy too would run two (issue 14).
    match crate::runner::app_state(src, source_app).await? {
        Some(dialect::AppState::Stopped) => {}
        other => {
            let now = other.map_or("gone".to_string(), |s| s.to_string());
            return Err(StepError::permanent(format!(
                "the source application {source_app} was started by someone during the copy (it is {now}); the copy will not be started"
            )));
        }
    }
    a.sort_by(|x, y| x.volume.cmp(&y.volume));
    b.sort_by(|x, y| x.volume.cmp(&y.volume));
    if a != b {
        let differ: Vec<String> = a
            .iter()
            .filter(|v| !b.contains(v))
            .map(|v| v.volume.clone())
            .chain(
                b.iter()
                    .filter(|w| !a.iter().any(|v| v.volume == w.volume))
                    .map(|w| w.volume.clone()),
            )
            .collect();
        return Err(StepError::permanent(format!(
            "the copy differs from the source after the transfer (volumes: {}); it will not be started",
            differ.join(", ")
        )));
    }
    Ok(format!(
        "verified {} volume{}, blake3 equal",
        a.len(),
        if a.len() == 1 { "" } else { "s" }
    ))
}
