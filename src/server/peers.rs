//! The routes other instances call: the signed handoff of an operation, and the signed status a
//! sender asks for before it undoes anything.

use actix_web::{web, HttpRequest, HttpResponse};
use actors::auth::Signed;
use actors::faults;
use actors::handoff::{self, Handoff, StatusQuery};
use mig_web::ops::{cors, error};
use tracing::Instrument;

use super::auth::audit_request;
use super::Shared;
use crate::audit::action;

/// `POST /api/v1/handoff`: a signed operation from the previous actor.
pub(super) async fn handoff(
    req: HttpRequest,
    shared: web::Data<Shared>,
    body: web::Bytes,
) -> HttpResponse {
    let Some(recipient) = &shared.handoff else {
        audit_request(
            &req,
            &shared,
            action::HANDOFF,
            None,
            "refused (503): this instance cannot take operations",
        );
        return error(503, "this instance cannot take operations (see mig check)");
    };
    let signed =
        match Signed::from_headers(|name| req.headers().get(name).and_then(|v| v.to_str().ok())) {
            Ok(s) => s,
            Err(e) => {
                audit_request(
                    &req,
                    &shared,
                    action::HANDOFF,
                    None,
                    &format!("refused (401): {e}"),
                );
                return error(401, e.to_string());
            }
        };
    let op_id = signed.op_id.clone();
    let seq = signed.seq;
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let span = tracing::info_span!("op", op_id = %signed.op_id, traceparent);
    if let Some(ids) = actors::telemetry::SpanIds::child_of(traceparent) {
        actors::telemetry::link(&span, &ids);
    }
    let sent = recipient.send(Handoff {
        signed,
        body: body.to_vec(),
    });
    async move {
        let (answer, result) = match sent.await {
            Ok(Ok(())) if shared.faults.active(faults::DROP_HANDOFF_REPLY) => {
                tracing::warn!("handoff accepted; its answer dropped at a test fault point");
                (
                    error(
                        503,
                        "fault point: the answer to an accepted handoff is dropped",
                    ),
                    format!("accepted (seq {seq}); the answer dropped at a test fault point"),
                )
            }
            Ok(Ok(())) => (
                HttpResponse::Ok().json(serde_json::json!({"accepted": true})),
                format!("accepted (seq {seq})"),
            ),
            Ok(Err(e)) => {
                tracing::warn!(status = e.status(), error = %e, "handoff refused");
                (
                    error(e.status(), e.to_string()),
                    format!("refused ({}) (seq {seq}): {e}", e.status()),
                )
            }
            Err(e) => (
                error(500, format!("the actor is gone: {e}")),
                format!("refused (500) (seq {seq}): the actor is gone"),
            ),
        };
        // The op id is the signed header's: a refused one may be anyone's claim, and says so.
        let op_id = actors::op::valid_id(&op_id).then_some(op_id.as_str());
        audit_request(&req, &shared, action::HANDOFF, op_id, &result);
        answer
    }
    .instrument(span)
    .await
}

#[derive(serde::Deserialize)]
pub(super) struct StatusParams {
    nonce: String,
}

/// `GET /api/v1/ops/{id}/status?nonce=HEX`: whether this instance owns the operation, and since
/// which handoff, signed with the operation's key over the asker's nonce. A sender whose handoff
/// went unanswered trusts only this before it undoes anything.
pub(super) async fn op_status(
    shared: web::Data<Shared>,
    id: web::Path<String>,
    q: web::Query<StatusParams>,
) -> HttpResponse {
    if !actors::op::valid_id(&id) || !handoff::valid_nonce(&q.nonce) {
        return error(
            400,
            "the operation id and nonce are 32 lowercase hex digits",
        );
    }
    if shared.faults.active(faults::FAIL_STATUS) {
        return error(503, "fault point: status unavailable");
    }
    let Some(recipient) = &shared.status else {
        return error(503, "this instance cannot take operations (see mig check)");
    };
    let query = StatusQuery {
        op_id: id.into_inner(),
        nonce: q.into_inner().nonce,
    };
    match recipient.send(query).await {
        Ok(Some(a)) => cors(
            HttpResponse::Ok()
                .content_type("application/json")
                .insert_header((actors::auth::H_SIGNATURE, a.signature))
                .body(a.body),
        ),
        Ok(None) => error(404, "this instance does not answer for that operation"),
        Err(e) => error(500, format!("the actor is gone: {e}")),
    }
}
