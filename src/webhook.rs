//! Webhooks: each `webhook_url` gets a POST with the operation's summary when an operation starts
//! here and when it ends here, signed `X-Mig-Signature: sha256=HEX` (HMAC-SHA256 of the body under
//! `webhook_secret`).
//!
//! Delivery runs on tasks of its own, fed by the op book's commits through an unbounded channel:
//! a receiver that is slow, down or wrong never delays or fails an operation. Each attempt is
//! retried with back-off for a bounded time ([`BACKOFF`]), and its result goes to the audit log and
//! to `mig_webhook_attempts_total` on the mon port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actors::book::{Lifecycle, LifecycleEvent};
use actors::op::Op;
use actors::properties::Secret;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::audit::{action, Audit};

/// The signature header of each POST.
pub const SIGNATURE_HEADER: &str = "X-Mig-Signature";

/// Waits between attempts; after the last, delivery gives up (about two minutes in all).
pub const BACKOFF: [Duration; 7] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(15),
    Duration::from_secs(30),
    Duration::from_secs(60),
];

/// How long one attempt may take, connection included.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// `sha256=HEX`: the HMAC-SHA256 of `body` under `secret`, as the header carries it.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Checks a header value against `body` in constant time (what a receiver does; the tests use it).
pub fn verify(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return false;
    }
    let tag: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

/// A webhook as the audit log and metrics name it: scheme, host and port, never the path or
/// query, which may be the receiver's token (e.g. a chat service's hook URL).
pub fn target(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            format!("{}://{}{port}", u.scheme(), u.host_str().unwrap_or("?"))
        }
        Err(_) => "(not a URL)".into(),
    }
}

/// The body of one POST: the event and the operation's summary.
pub fn payload(event: LifecycleEvent, op: &Op) -> serde_json::Value {
    let s = mig_web::OpSummary::of(op);
    serde_json::json!({
        "event": event.as_str(),
        "id": s.id,
        "kind": s.kind,
        "state": s.state,
        "source": {"grid": s.source_grid, "app": s.source_app},
        "target": {"grid": s.target_grid, "app": s.target_app},
        "error": s.error,
        "started_at": s.started_at,
        "ended_at": s.ended_at,
        "duration_secs": s.duration_secs,
        "bytes": s.bytes,
        "max_rate": s.max_rate,
    })
}

/// Where and how to deliver.
pub struct Webhooks {
    pub urls: Vec<String>,
    pub secret: Secret,
    pub audit: Arc<Audit>,
    /// Waits between attempts ([`BACKOFF`]; tests shorten it).
    pub backoff: Vec<Duration>,
}

impl Webhooks {
    /// Delivers every event `events` brings, each URL on a task of its own, until the book is gone.
    pub fn spawn(self, mut events: UnboundedReceiver<Lifecycle>) {
        let me = Arc::new(self);
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            // A receiver's redirect is not followed: the signature is for the URL configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("an HTTP client with default settings builds");
        tokio::spawn(async move {
            while let Some(l) = events.recv().await {
                let body = serde_json::to_vec(&payload(l.event, &l.op)).expect("JSON");
                let signature = sign(me.secret.expose().as_bytes(), &body);
                for url in &me.urls {
                    tokio::spawn(me.clone().deliver(
                        http.clone(),
                        url.clone(),
                        l.op.id.clone(),
                        l.event,
                        body.clone(),
                        signature.clone(),
                    ));
                }
            }
        });
    }

    async fn deliver(
        self: Arc<Self>,
        http: reqwest::Client,
        url: String,
        op_id: String,
        event: LifecycleEvent,
        body: Vec<u8>,
        signature: String,
    ) {
        let to = target(&url);
        let started = Instant::now();
        for attempt in 1..=self.backoff.len() + 1 {
            let r = http
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            let outcome = match r {
                Ok(resp) if resp.status().is_success() => Ok(resp.status().as_u16()),
                Ok(resp) => Err(format!("HTTP {}", resp.status().as_u16())),
                // Without the URL: reqwest's message would name the path.
                Err(e) => Err(error_kind(&e).into()),
            };
            let what = format!("{} event to {to}, attempt {attempt}", event.as_str());
            match outcome {
                Ok(status) => {
                    metrics::counter!("mig_webhook_attempts_total", "result" => "delivered")
                        .increment(1);
                    self.audit.record(
                        None,
                        None,
                        action::WEBHOOK,
                        Some(&op_id),
                        &format!("delivered: {what} (HTTP {status})"),
                    );
                    return;
                }
                Err(why) => {
                    metrics::counter!("mig_webhook_attempts_total", "result" => "failed")
                        .increment(1);
                    let next = self.backoff.get(attempt - 1);
                    let then = match next {
                        Some(d) => format!("; next attempt in {} s", d.as_secs_f64()),
                        None => format!(
                            "; gave up after {attempt} attempts in {} s",
                            started.elapsed().as_secs()
                        ),
                    };
                    tracing::warn!(op_id = %op_id, webhook = %to, attempt, error = %why, "webhook not delivered");
                    self.audit.record(
                        None,
                        None,
                        action::WEBHOOK,
                        Some(&op_id),
                        &format!("failed: {what}: {why}{then}"),
                    );
                    match next {
                        Some(d) => tokio::time::sleep(*d).await,
                        None => {
                            metrics::counter!("mig_webhook_gave_up_total").increment(1);
                            return;
                        }
                    }
                }
            }
        }
    }
}

/// What kind of failure a request had, in words that hold no part of the URL.
fn error_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "no answer in time"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "redirected (not followed)"
    } else if e.is_body() || e.is_decode() {
        "broken answer"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_the_body_and_any_change_breaks_it() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let body = br#"{"event":"ended","id":"x"}"#;
        let sig = sign(b"k", body);
        assert!(verify(b"k", body, &sig));
        assert!(!verify(b"other", body, &sig), "wrong key");
        assert!(
            !verify(b"k", br#"{"event":"ended","id":"y"}"#, &sig),
            "tampered body"
        );
        assert!(!verify(b"k", body, sig.trim_start_matches("sha256=")));
        assert!(!verify(b"k", body, "sha256=zz"));
    }

    #[test]
    fn a_webhook_is_named_without_its_path_or_credentials() {
        assert_eq!(
            target("https://u:p@hooks.example.com/services/T0/B0/tok3n?x=1"),
            "https://hooks.example.com"
        );
        assert_eq!(target("http://127.0.0.1:9999/h"), "http://127.0.0.1:9999");
    }

    #[test]
    fn the_payload_summarizes_the_operation() {
        let mut plan = actors::test_support::sample_plan();
        plan.target_app = "b".into();
        plan.max_rate = Some(1024);
        let mut op = Op::new(actors::op::new_id(), actors::op::Kind::Migrate, plan);
        op.start_step(actors::op::PROVISIONING_HELPER);
        op.end(actors::op::OpState::Failed, Some("boom".into()));
        let v = payload(LifecycleEvent::Ended, &op);
        assert_eq!(v["event"], "ended");
        assert_eq!(v["id"], op.id.as_str());
        assert_eq!(v["kind"], "migrate");
        assert_eq!(v["state"], "failed");
        assert_eq!(v["source"]["grid"], "g1");
        assert_eq!(v["target"]["app"], "b");
        assert_eq!(v["error"], "boom");
        assert_eq!(v["max_rate"], 1024);
        assert!(v["duration_secs"].as_f64().is_some());
        assert!(v.get("bytes").is_some());
    }
}
