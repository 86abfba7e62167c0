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
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("mig")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("mig");
            guard.provider = Some(provider);
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
