//! OpenTelemetry traces over OTLP, configured by the standard variables and
//! off unless one names an endpoint:
//!
//! - `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter adds `/v1/traces`) or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as given);
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` (or `…_TRACES_PROTOCOL`):
//!   `http/protobuf` (default) or `http/json`; `grpc` is refused at start,
//!   saying so;
//! - `OTEL_SERVICE_NAME` (default `agentledger`), `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the batch
//!   processor's `OTEL_BSP_*`, read by the SDK.
//!
//! Only the runtime's spans are exported (`agentledger_agents`, at info):
//! `invoke_workflow`, `invoke_agent {agent}`, `execute_tool {tool}` (see
//! `agents::trace`). Each event the runtime records carries its span's
//! trace id in the metadata (`trace_id`).

use anyhow::{bail, Context};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The exporter while traces are on: flushed and stopped by [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The layer that hands the runtime's spans to the exporter.
pub type TraceLayer<S> = Box<dyn Layer<S> + Send + Sync>;

/// Traces as the environment asks: `None` when no endpoint is set.
pub fn from_env<S>() -> anyhow::Result<Option<(Telemetry, TraceLayer<S>)>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if var("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    let protocol = var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let protocol = match protocol.as_str() {
        "http/protobuf" => Protocol::HttpBinary,
        "http/json" => Protocol::HttpJson,
        other => bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL is {other:?}: this build exports over HTTP only \
             (http/protobuf or http/json)"
        ),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .context("the OTLP trace exporter")?;
    let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| "agentledger".into());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service)
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let tracer = provider.tracer("agentledger");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target("agentledger_agents", LevelFilter::INFO))
        .boxed();
    agentledger_agents::trace::set_trace_id_source(current_trace_id);
    Ok(Some((Telemetry { provider }, layer)))
}

/// The trace id of the current span, hex, when it belongs to an exported trace.
fn current_trace_id() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

impl Telemetry {
    /// Exports what is buffered and stops.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "the trace exporter did not shut down cleanly");
        }
    }
}
