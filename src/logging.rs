//! Logging set-up: human text or one JSON object per line, filtered `RUST_LOG`-style, and (in a
//! `mig` built with the `otlp` feature) the same spans exported to an OpenTelemetry collector.

use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written (to standard error, so standard output stays for command results).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Keeps the span exporter alive; dropping it flushes what is still queued.
#[derive(Default)]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("mig: flushing spans to the OTLP endpoint failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber. `filter` is a `RUST_LOG`-style directive such as
/// `info,actors=debug`; a bad one is an error naming it. `otlp_endpoint` (the property) sends the
/// spans there too.
pub fn init(format: LogFormat, filter: &str, otlp_endpoint: Option<&str>) -> anyhow::Result<Guard> {
    let filter = EnvFilter::builder()
        .parse(filter)
        .map_err(|e| anyhow::anyhow!("--log {filter:?}: {e}"))?;
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    let mut guard = Guard::default();

    #[cfg(feature = "otlp")]
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| anyhow::anyhow!("otlp_endpoint {endpoint:?}: {e}"))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_id_generator(otel::OpIds::default())
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("mig")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("mig");
            guard.provider = Some(provider);
            actors::telemetry::install(otel::link);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        None => None,
    };
    #[cfg(not(feature = "otlp"))]
    let otel: Option<tracing_subscriber::layer::Identity> = match otlp_endpoint {
        Some(_) => anyhow::bail!(
            "otlp_endpoint is set, but this mig was built without the `otlp` feature (cargo build --features otlp)"
        ),
        None => None,
    };

    registry
        .with(otel)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    #[cfg(not(feature = "otlp"))]
    let _ = &mut guard;
    Ok(guard)
}

/// Gives the operations' spans the ids the actors derive (see `actors::telemetry`), so that the
/// spans of the three instances form one trace in a collector.
#[cfg(feature = "otlp")]
mod otel {
    use std::cell::Cell;

    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    thread_local! {
        /// The ids the next span started on this thread takes (set by [`link`] around the start).
        static NEXT: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
    }

    /// Random ids, except for a span [`link`] is starting. The SDK draws a span's ids from the
    /// provider's generator and offers no other way to choose them; tracing-opentelemetry
    /// starts a span when its context is first asked for, so `link` asks for it right away with
    /// the ids set here.
    #[derive(Debug, Default)]
    pub struct OpIds(RandomIdGenerator);

    impl IdGenerator for OpIds {
        fn new_trace_id(&self) -> TraceId {
            NEXT.with(Cell::get)
                .map_or_else(|| self.0.new_trace_id(), |n| n.0)
        }
        fn new_span_id(&self) -> SpanId {
            NEXT.with(Cell::get)
                .map_or_else(|| self.0.new_span_id(), |n| n.1)
        }
    }

    pub fn link(span: &tracing::Span, ids: &actors::telemetry::SpanIds) {
        let Ok(trace) = TraceId::from_hex(&ids.trace_id) else {
            return;
        };
        let parent = match ids.parent.as_deref().map(SpanId::from_hex) {
            Some(Ok(p)) => opentelemetry::Context::new().with_remote_span_context(
                SpanContext::new(trace, p, TraceFlags::SAMPLED, true, TraceState::default()),
            ),
            // A root of its own (not the daemon's span's child): the generator gives the trace id.
            _ => opentelemetry::Context::new(),
        };
        if span.set_parent(parent).is_err() {
            return;
        }
        if let Some(Ok(id)) = ids.span_id.as_deref().map(SpanId::from_hex) {
            NEXT.with(|n| n.set(Some((trace, id))));
            let _ = span.context();
            NEXT.with(|n| n.set(None));
        }
    }
}
