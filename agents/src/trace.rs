//! Spans that follow the OpenTelemetry GenAI conventions, and the link from
//! a recorded event to the trace it was recorded in.
//!
//! The runtime opens `invoke_workflow` around each drive of a workflow,
//! `invoke_agent {agent}` around each agent's step (with the model and its
//! token counts when a model decided), and `execute_tool {tool}` around
//! each tool attempt. They are plain `tracing` spans: the binary exports
//! them over OTLP when configured, and sets [`set_trace_id_source`] so
//! that each event the runtime records carries its trace id in metadata.

use std::sync::OnceLock;

static SOURCE: OnceLock<fn() -> Option<String>> = OnceLock::new();

/// Where the current trace id comes from (the binary's OpenTelemetry
/// layer); set once, at start.
pub fn set_trace_id_source(source: fn() -> Option<String>) {
    let _ = SOURCE.set(source);
}

/// The current span's trace id, hex, when traces are exported.
pub(crate) fn current_trace_id() -> Option<String> {
    SOURCE.get().and_then(|source| source())
}

/// `invoke_workflow`: one drive of one workflow.
pub(crate) fn workflow_span(workflow: uuid::Uuid) -> tracing::Span {
    tracing::info_span!(
        "invoke_workflow",
        otel.name = "invoke_workflow",
        gen_ai.operation.name = "invoke_workflow",
        agentledger.workflow.id = %workflow,
        // Every log line of the drive carries the workflow as correlation id.
        correlation_id = %workflow,
    )
}

/// `invoke_agent {agent}`: one agent's step; the model's fields are filled
/// in when a model decided ([`record_model`]).
pub(crate) fn agent_span(actor: &agentledger_eventstore::Actor) -> tracing::Span {
    tracing::info_span!(
        "invoke_agent",
        otel.name = %format!("invoke_agent {}", actor.name),
        gen_ai.operation.name = "invoke_agent",
        gen_ai.agent.name = %actor.name,
        gen_ai.agent.version = %actor.version,
        gen_ai.provider.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
    )
}

/// Fills the current `invoke_agent` span's model fields.
pub(crate) fn record_model(call: &agentledger_domain::workflow::ModelCall) {
    let span = tracing::Span::current();
    span.record("gen_ai.provider.name", call.provider.as_str());
    span.record("gen_ai.request.model", call.model.as_str());
    if let Some(tokens) = call.input_tokens {
        span.record("gen_ai.usage.input_tokens", tokens);
    }
    if let Some(tokens) = call.output_tokens {
        span.record("gen_ai.usage.output_tokens", tokens);
    }
}

/// `execute_tool {tool}`: one attempt of one subtask.
pub(crate) fn tool_span(
    tool: &str,
    call_id: uuid::Uuid,
    subtask: &str,
    attempt: u8,
) -> tracing::Span {
    tracing::info_span!(
        "execute_tool",
        otel.name = %format!("execute_tool {tool}"),
        gen_ai.operation.name = "execute_tool",
        gen_ai.tool.name = %tool,
        gen_ai.tool.call.id = %call_id,
        agentledger.subtask.id = %subtask,
        agentledger.attempt = attempt,
        error.type = tracing::field::Empty,
    )
}
