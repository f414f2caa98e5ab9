//! The HTTP surface of agentledger, on one port: GraphQL (`POST /graphql`,
//! GraphiQL at `GET /graphql`, subscriptions over WebSocket at
//! `/graphql/ws` in both the `graphql-transport-ws` and the legacy
//! `graphql-ws` subprotocols), `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! This is the only crate that knows axum and async-graphql; it converts
//! domain and read-model types at its edge and never talks SQL itself.

pub mod graphql;
pub mod metrics;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agentledger_projections::lag;
use async_graphql::http::GraphiQLSource;
use async_graphql::http::ALL_WEBSOCKET_PROTOCOLS;
use async_graphql_axum::{GraphQLProtocol, GraphQLRequest, GraphQLResponse, GraphQLWebSocket};
use axum::extract::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;

pub use graphql::{schema, sdl, AgentledgerSchema, Caller, Limits, Services};

/// What `/health` reports besides being alive.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// `postgres` or `in-memory`.
    pub store: &'static str,
    /// The configuration profile.
    pub profile: String,
}

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// `/ready` fails when a projection lags more events than this.
    pub max_lag: Option<u64>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 2 * 1024 * 1024,
            max_lag: None,
        }
    }
}

#[derive(Clone)]
struct AppState {
    info: ServiceInfo,
    schema: AgentledgerSchema,
    services: Services,
    config: HttpConfig,
    counters: Arc<Counters>,
    http: Arc<metrics::HttpMetrics>,
}

#[derive(Default)]
struct Counters {
    graphql_requests: AtomicU64,
    graphql_errors: AtomicU64,
}

/// The service's routes over `services`.
pub fn router(info: ServiceInfo, services: Services, config: HttpConfig) -> Router {
    let schema = graphql::schema(services.clone());
    let state = AppState {
        info,
        schema: schema.clone(),
        services,
        config: config.clone(),
        counters: Arc::default(),
        http: Arc::default(),
    };
    let http = state.http.clone();
    Router::new()
        .route("/graphql", get(graphiql).post(graphql_request))
        .route("/graphql/ws", get(graphql_ws))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/.well-known/agentledger-key", get(ledger_key))
        .route_layer(axum::middleware::from_fn_with_state(http, metrics::track))
        // The GraphQL extractor reads the body itself, past axum's default
        // limit: the limit is enforced on the body stream instead.
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

/// The health routes alone (for a process without the GraphQL services).
pub fn health_router(info: ServiceInfo) -> Router {
    Router::new().route(
        "/health",
        get(move || {
            let info = info.clone();
            async move { Json(health_body(&info)) }
        }),
    )
}

fn health_body(info: &ServiceInfo) -> Value {
    json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "store": info.store,
        "profile": info.profile,
    })
}

async fn health(State(state): State<AppState>) -> Json<Value> {
    Json(health_body(&state.info))
}

/// The deployment's digest signing keys (public halves), active first, for
/// reviewers who check signed digests.
async fn ledger_key(State(state): State<AppState>) -> Response {
    match state.services.ledger_keys.public_keys().await {
        Ok(keys) => Json(json!({
            "active": keys.iter().find(|k| k.retired_at.is_none()).map(|k| &k.key_id),
            "keys": keys,
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "reading the ledger keys");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "keys unavailable"})),
            )
                .into_response()
        }
    }
}

async fn graphiql() -> Html<String> {
    Html(
        GraphiQLSource::build()
            .endpoint("/graphql")
            .subscription_endpoint("/graphql/ws")
            .finish(),
    )
}

async fn graphql_request(
    State(state): State<AppState>,
    request: GraphQLRequest,
) -> GraphQLResponse {
    let request = request.into_inner().data(Caller::anonymous());
    let response = state.schema.execute(request).await;
    state
        .counters
        .graphql_requests
        .fetch_add(1, Ordering::Relaxed);
    if response.is_err() {
        state
            .counters
            .graphql_errors
            .fetch_add(1, Ordering::Relaxed);
    }
    response.into()
}

/// Buffers of one WebSocket connection. Subscription messages are small;
/// tungstenite's defaults (128 KiB to read) would cost ~128 MiB for 1,000
/// open subscriptions.
const WS_BUFFER_BYTES: usize = 8 * 1024;

/// Subscriptions over WebSocket, in the subprotocol the client asks for
/// (`graphql-transport-ws` or `graphql-ws`).
async fn graphql_ws(
    State(state): State<AppState>,
    protocol: GraphQLProtocol,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .protocols(ALL_WEBSOCKET_PROTOCOLS)
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        .on_upgrade(move |stream| {
            GraphQLWebSocket::new(stream, state.schema, protocol)
                .with_data({
                    let mut data = async_graphql::Data::default();
                    data.insert(Caller::anonymous());
                    data
                })
                .serve()
        })
}

/// Ready when the store answers and, if a bound is set, every projection's
/// lag is within it; the body names what is not ready.
async fn ready(State(state): State<AppState>) -> Response {
    let services = &state.services;
    let mut problems = Vec::new();
    let mut lags = serde_json::Map::new();
    match lag(&*services.read_models, &*services.store).await {
        Ok(found) => {
            for (name, behind) in found {
                if state.config.max_lag.is_some_and(|max| behind > max) {
                    problems.push(format!("projection {name} is {behind} events behind"));
                }
                lags.insert(name, json!(behind));
            }
        }
        Err(e) => problems.push(format!("database: {e}")),
    }
    let ready = problems.is_empty();
    let body = Json(json!({ "ready": ready, "problems": problems, "projection_lag": lags }));
    if ready {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

/// Prometheus text.
async fn render_metrics(State(state): State<AppState>) -> Response {
    use std::fmt::Write;
    let services = &state.services;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP agentledger_graphql_requests_total GraphQL requests over HTTP."
    );
    let _ = writeln!(out, "# TYPE agentledger_graphql_requests_total counter");
    let _ = writeln!(
        out,
        "agentledger_graphql_requests_total {}",
        state.counters.graphql_requests.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP agentledger_graphql_errors_total GraphQL requests answered with errors."
    );
    let _ = writeln!(out, "# TYPE agentledger_graphql_errors_total counter");
    let _ = writeln!(
        out,
        "agentledger_graphql_errors_total {}",
        state.counters.graphql_errors.load(Ordering::Relaxed)
    );
    if let Ok(head) = services.store.head_position().await {
        let _ = writeln!(
            out,
            "# HELP agentledger_head_position The last position readers can see."
        );
        let _ = writeln!(out, "# TYPE agentledger_head_position gauge");
        let _ = writeln!(out, "agentledger_head_position {head}");
    }
    if let Ok(lags) = lag(&*services.read_models, &*services.store).await {
        let _ = writeln!(out, "# HELP agentledger_projection_lag_events Head position minus the projection's checkpoint.");
        let _ = writeln!(out, "# TYPE agentledger_projection_lag_events gauge");
        for (name, behind) in lags {
            let _ = writeln!(
                out,
                "agentledger_projection_lag_events{{projection=\"{name}\"}} {behind}"
            );
        }
    }
    if let Ok(counts) = services.read_models.count_by_state().await {
        let _ = writeln!(
            out,
            "# HELP agentledger_workflows Workflows by state (read model)."
        );
        let _ = writeln!(out, "# TYPE agentledger_workflows gauge");
        for (workflow_state, n) in counts {
            let name = agentledger_projections::model::status::state_name(workflow_state);
            let _ = writeln!(out, "agentledger_workflows{{state=\"{name}\"}} {n}");
        }
    }
    let _ = writeln!(
        out,
        "# HELP agentledger_subscriptions_open GraphQL subscriptions open now."
    );
    let _ = writeln!(out, "# TYPE agentledger_subscriptions_open gauge");
    let _ = writeln!(
        out,
        "agentledger_subscriptions_open {}",
        services.open_subscriptions.load(Ordering::Relaxed)
    );
    state.http.render(&mut out);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        out,
    )
        .into_response()
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish. Connections send small frames (subscription
/// events) at once: without `TCP_NODELAY`, Nagle's algorithm holds them
/// until the peer's delayed ACK, ~40 ms later.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
