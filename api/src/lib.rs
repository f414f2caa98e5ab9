//! The HTTP surface of agentledger, on one port: GraphQL (`POST /graphql`,
//! GraphiQL at `GET /graphql`, subscriptions over WebSocket at
//! `/graphql/ws` in both the `graphql-transport-ws` and the legacy
//! `graphql-ws` subprotocols), `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! Every GraphQL request is authenticated first (`auth`): a plain request
//! without a valid credential is answered 401 before its body is read, a
//! WebSocket authenticates on its upgrade request or in `connection_init`
//! (close 4401 when it cannot).
//!
//! This is the only crate that knows axum and async-graphql; it converts
//! domain and read-model types at its edge and never talks SQL itself.

pub mod auth;
mod console;
mod graphiql;
pub mod graphql;
pub mod limits;
pub mod metrics;
mod rest;
mod ws;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use agentledger_projections::lag;
use async_graphql_axum::GraphQLRequest;
use axum::extract::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;

pub use auth::{AuthConfig, Authenticator, Principal};
pub use graphql::{
    schema, sdl, AgentledgerSchema, Limits, Services, Transparency, WitnessReport, WitnessStatus,
    DEFAULT_ORIGIN,
};

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
    /// Largest request body, in bytes; also the largest WebSocket message
    /// and frame.
    pub max_body_bytes: usize,
    /// `/ready` fails when a projection lags more events than this.
    pub max_lag: Option<u64>,
    /// Rates and socket caps.
    pub limits: limits::LimitsConfig,
    /// Longest a plain request may take.
    pub request_timeout: std::time::Duration,
    /// Plain requests handled at once; more wait (WebSockets are not counted).
    pub max_concurrent_requests: usize,
    /// Browser origins allowed to call the API (CORS) and to open
    /// WebSockets, e.g. `https://console.example.com`.
    pub allowed_origins: Vec<String>,
    /// Also allow `http://localhost:*` and `http://127.0.0.1:*` origins (dev).
    pub loopback_origins: bool,
    /// Where the web console offers sign-in at an OpenID Connect issuer.
    pub console_oidc: Option<ConsoleOidc>,
}

/// The web console's sign-in at an OpenID Connect issuer (authorization
/// code with PKCE, as a public client).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleOidc {
    pub issuer: String,
    pub client_id: String,
    pub scope: String,
    /// What the sign-in button names.
    pub name: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 2 * 1024 * 1024,
            max_lag: None,
            limits: limits::LimitsConfig::default(),
            request_timeout: std::time::Duration::from_secs(30),
            max_concurrent_requests: 512,
            allowed_origins: Vec::new(),
            loopback_origins: false,
            console_oidc: None,
        }
    }
}

impl HttpConfig {
    /// Whether a browser page at `origin` may call the API: an allowed
    /// origin, a loopback one where those are allowed, or the API's own
    /// (`host`: the request's `Host`).
    fn admits(&self, origin: &str, host: Option<&str>) -> bool {
        let origin = origin.trim_end_matches('/');
        if self
            .allowed_origins
            .iter()
            .any(|o| o.trim_end_matches('/') == origin)
        {
            return true;
        }
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .unwrap_or_default();
        if host.is_some_and(|h| h == authority) {
            return true;
        }
        let hostname = authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        });
        self.loopback_origins
            && origin.starts_with("http://")
            && matches!(hostname, "localhost" | "127.0.0.1" | "[::1]")
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
    limiters: Arc<limits::Limiters>,
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
        limiters: Arc::new(limits::Limiters::new(config.limits.clone())),
    };
    let http = state.http.clone();
    // GraphiQL exists to explore the schema: where introspection is off
    // (prod by default) it is not served either.
    let (page, assets) = if state.services.limits.introspection {
        (get(graphiql::page), get(graphiql::asset))
    } else {
        (
            axum::routing::MethodRouter::new(),
            axum::routing::MethodRouter::new(),
        )
    };
    // One budget of requests in flight for GraphQL and REST alike.
    let permits = Arc::new(tokio::sync::Semaphore::new(
        config.max_concurrent_requests.max(1),
    ));
    let plain = || {
        tower::ServiceBuilder::new()
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::SERVICE_UNAVAILABLE,
                config.request_timeout,
            ))
            .layer(tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(
                permits.clone(),
            ))
    };
    let graphql = Router::new()
        .route("/graphql", page.post(graphql_request).layer(plain()))
        .route("/graphql/ws", get(graphql_ws))
        .route("/api/workflow", post(rest::submit).layer(plain()))
        .route("/api/workflow/{id}", get(rest::workflow).layer(plain()))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ))
        .layer(cors(&config));
    Router::new()
        .merge(graphql)
        .route("/graphql/assets/{name}", assets)
        .route("/", get(console::page))
        .route("/assets/{*path}", get(console::asset))
        .route("/console/config.json", get(console::config))
        .route("/health", get(health))
        .route("/api/health", get(rest::health))
        .route("/api/openapi.json", get(rest::openapi))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .route("/.well-known/agentledger-key", get(ledger_key))
        .route("/checkpoint", get(checkpoint))
        .route("/checkpoint/cosigned", get(cosigned_checkpoint))
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
        Ok(keys) => {
            let origin = &state.services.transparency.origin;
            let active = keys.iter().find(|k| k.retired_at.is_none());
            let listed: Vec<Value> = keys
                .iter()
                .map(|k| {
                    let mut key = json!(k);
                    key["verifier_key"] =
                        json!(graphql::types::note_verifier_key(&k.public_key, origin));
                    key
                })
                .collect();
            Json(json!({
                "active": active.map(|k| &k.key_id),
                "checkpoint_origin": origin,
                "verifier_key": active.map(|k| graphql::types::note_verifier_key(&k.public_key, origin)),
                "keys": listed,
            }))
            .into_response()
        }
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

/// The largest checkpoint witnesses cosigned, with every verified
/// cosignature of it appended (C2SP: extra signature lines on the note);
/// 404 until a witness whose key is in `[witness] keys` cosigned one.
async fn cosigned_checkpoint(State(state): State<AppState>) -> Response {
    let reports = state.services.transparency.witness_reports();
    let newest = reports
        .values()
        .filter_map(|r| r.cosigned.as_ref().map(|c| (r.cosigned_size, &c.0)))
        .max_by_key(|(size, _)| *size)
        .map(|(_, note)| note.clone());
    let Some(note) = newest else {
        return (
            axum::http::StatusCode::NOT_FOUND,
            "no checkpoint is cosigned yet: [witness] urls and keys name the witnesses\n",
        )
            .into_response();
    };
    let mut text = note.clone();
    for (_, lines) in reports
        .values()
        .filter_map(|r| r.cosigned.as_ref())
        .filter(|(cosigned, _)| *cosigned == note)
    {
        text.extend(lines.iter().map(String::as_str));
    }
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/plain; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "no-store"),
        ],
        text,
    )
        .into_response()
}

/// The latest checkpoint of the ledger's tree (C2SP `tlog-checkpoint`, a
/// signed note), for verifiers and witnesses: public, like the key.
async fn checkpoint(State(state): State<AppState>) -> Response {
    let services = &state.services;
    let signed = async {
        let tree = &services.transparency.tree;
        let size = tree.tree_size().await?;
        // A flood of requests signs at most once per size and second.
        if let Some((cached, at, note)) = &*services.transparency.signed.lock().expect("lock") {
            if *cached == size && at.elapsed() < std::time::Duration::from_secs(1) {
                return Ok(note.clone());
            }
        }
        let root = agentledger_eventstore::tlog::tree_root(&**tree, size).await?;
        let (_, key) = services.ledger_keys.active().await?;
        let note = agentledger_eventstore::checkpoint::signed_checkpoint(
            &services.transparency.origin,
            size,
            &root,
            &key,
        );
        *services.transparency.signed.lock().expect("lock") =
            Some((size, std::time::Instant::now(), note.clone()));
        Ok::<_, agentledger_eventstore::StoreError>(note)
    };
    match signed.await {
        Ok(note) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                ),
                (axum::http::header::CACHE_CONTROL, "no-store"),
            ],
            note,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "signing a checkpoint");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the checkpoint cannot be signed now\n",
            )
                .into_response()
        }
    }
}

/// The caller of a GraphQL request, found before its body is read: a
/// request with a bad credential (or none, where one is required) is
/// refused here. A WebSocket upgrade without one may still authenticate in
/// `connection_init`.
#[derive(Clone)]
struct Caller(Option<Principal>);

async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let auth = &state.services.auth;
    let rest = request.uri().path().starts_with("/api/");
    let address = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0.ip());
    if let Some(address) = address {
        if let Err(wait) = state.limiters.check_address(address) {
            return too_many(wait, rest);
        }
    }
    let headers = request.headers();
    // A page on another site can POST a form or text/plain without asking
    // first; it cannot send JSON without a CORS preflight. So a POST must be
    // JSON, and a browser elsewhere cannot drive the service.
    if request.method() == axum::http::Method::POST && !is_json(headers) {
        let message = format!(
            "POST {} takes a JSON body: send content-type: application/json",
            request.uri().path()
        );
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            error_body(rest, "BAD_INPUT", message),
        )
            .into_response();
    }
    let websocket = request.uri().path() == "/graphql/ws";
    // A browser page elsewhere must not open a socket with the user's
    // cookies or network position: WebSockets are not covered by CORS.
    if websocket {
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
            if !state.config.admits(origin, host) {
                return (
                    StatusCode::FORBIDDEN,
                    format!("WebSockets from the origin {origin} are not allowed"),
                )
                    .into_response();
            }
        }
    }
    let graphiql =
        request.method() == axum::http::Method::GET && request.uri().path() == "/graphql";
    let caller = if (websocket || graphiql) && !Authenticator::has_credential(headers) {
        // GraphiQL is a page; it sends its own credential with each request.
        None
    } else {
        match auth.authenticate_headers(headers).await {
            Ok(principal) => Some(principal),
            Err(e) => return refusal(&e, rest),
        }
    };
    if let Some(principal) = &caller {
        if let Err(wait) = state.limiters.check_credential(&principal.subject) {
            return too_many(wait, rest);
        }
    }
    request.extensions_mut().insert(Caller(caller));
    next.run(request).await
}

/// An error body: GraphQL's `{"errors": [...]}`, or for the REST door
/// (`rest`) `{"error": {"code", "message"}}`.
fn error_body(rest: bool, code: &str, message: String) -> Json<Value> {
    Json(if rest {
        json!({ "error": { "code": code, "message": message } })
    } else {
        json!({ "errors": [{ "message": message, "extensions": { "code": code } }] })
    })
}

/// 429 with `Retry-After` and the error `RATE_LIMITED`.
fn too_many(wait: limits::RetryAfter, rest: bool) -> Response {
    let mut response = (
        StatusCode::TOO_MANY_REQUESTS,
        error_body(
            rest,
            "RATE_LIMITED",
            format!("too many requests; retry in {} s", wait.seconds()),
        ),
    )
        .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        wait.seconds()
            .to_string()
            .parse()
            .expect("a number is a header value"),
    );
    response
}

/// The CORS policy: the allowed origins (and loopback ones in dev), JSON
/// POSTs with credentials in headers; no other origin gets an answer a
/// browser would let a page read.
fn cors(config: &HttpConfig) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let config = config.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, request| {
            let host = request
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok());
            origin.to_str().is_ok_and(|o| config.admits(o, host))
        }))
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            "x-api-key".parse().expect("a header name"),
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Whether the request's body is declared JSON (`application/json`, with
/// or without parameters such as a charset).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// A GraphQL error response for a caller that is not let in: 401 (with
/// `WWW-Authenticate`) or 503 when the credential could not be checked.
fn refusal(e: &auth::AuthError, rest: bool) -> Response {
    let (status, code) = match e {
        auth::AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        auth::AuthError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
    };
    let body = error_body(rest, code, e.to_string());
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    match e {
        auth::AuthError::Unauthenticated(_) => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("a header value"),
            );
        }
        auth::AuthError::Unavailable(_) => {
            headers.insert(header::RETRY_AFTER, "1".parse().expect("a header value"));
        }
    }
    response
}

async fn graphql_request(
    State(state): State<AppState>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    headers: axum::http::HeaderMap,
    request: GraphQLRequest,
) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let budget = state.services.limits.max_response_bytes;
    let Some(principal) = caller else {
        return refusal(
            &auth::AuthError::Unauthenticated("this server requires a credential".into()),
            false,
        );
    };
    let request = match auth::authorize(
        request.into_inner(),
        &principal,
        state.services.limits.shape,
    ) {
        Ok(request) => request,
        Err(refused) => return respond(&refused, accept.as_deref(), budget),
    };
    let (request, meter) = graphql::budget::Meter::attach(request, budget);
    let response = meter.settle(state.schema.execute(request).await);
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
    respond(&response, accept.as_deref(), budget)
}

/// A GraphQL response over HTTP as the GraphQL-over-HTTP spec has it: in
/// `application/graphql-response+json` to a client that accepts it (with a
/// 4xx status when the request failed before execution: 403 for a refused
/// field, 400 for the rest), else in `application/json` with 200. A body
/// over `budget` bytes is replaced by a `BAD_INPUT` error.
fn respond(response: &async_graphql::Response, accept: Option<&str>, budget: usize) -> Response {
    let accepts = |media: &str| {
        accept.is_some_and(|a| {
            a.split(',').any(|m| {
                m.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case(media))
            })
        })
    };
    let modern = accepts("application/graphql-response+json");
    let mut body = serde_json::to_vec(response).expect("a GraphQL response serialises");
    let mut failed_early =
        response.data == async_graphql::Value::Null && !response.errors.is_empty();
    let mut refused = response.errors.iter().any(|e| {
        e.extensions
            .as_ref()
            .and_then(|x| x.get("code"))
            .is_some_and(|c| *c == async_graphql::Value::String("FORBIDDEN".into()))
    });
    if body.len() > budget {
        let message = format!(
            "the response would be {} bytes; at most {budget}: ask for fewer fields or a smaller page",
            body.len()
        );
        body = serde_json::to_vec(&json!({
            "errors": [{ "message": message, "extensions": { "code": "BAD_INPUT" } }]
        }))
        .expect("JSON");
        failed_early = true;
        refused = false;
    }
    let status = match (modern, failed_early, refused) {
        (true, true, true) => StatusCode::FORBIDDEN,
        (true, true, false) => StatusCode::BAD_REQUEST,
        _ => StatusCode::OK,
    };
    let media = if modern {
        "application/graphql-response+json; charset=utf-8"
    } else {
        "application/json; charset=utf-8"
    };
    (status, [(header::CONTENT_TYPE, media)], body).into_response()
}

/// Buffers of one WebSocket connection. Subscription messages are small;
/// tungstenite's defaults (128 KiB to read) would cost ~128 MiB for 1,000
/// open subscriptions.
const WS_BUFFER_BYTES: usize = 8 * 1024;

/// Subscriptions over WebSocket, in the subprotocol the client asks for
/// (`graphql-transport-ws` or `graphql-ws`).
async fn graphql_ws(
    State(state): State<AppState>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    use std::str::FromStr;
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|value| value.to_str().ok())
        .and_then(|protocols| {
            protocols
                .split(',')
                .find_map(|p| async_graphql::http::WebSocketProtocols::from_str(p.trim()).ok())
        });
    let Some(protocol) = protocol else {
        return (
            StatusCode::BAD_REQUEST,
            "ask for the graphql-transport-ws or graphql-ws subprotocol",
        )
            .into_response();
    };
    let credential = Authenticator::credential_of(&headers)
        .ok()
        .flatten()
        .map(str::to_string);
    // Answer with the subprotocol this side will speak (the client's first
    // known one), not the server's first match in the client's list.
    upgrade
        .protocols([protocol.sec_websocket_protocol()])
        .read_buffer_size(WS_BUFFER_BYTES)
        .write_buffer_size(WS_BUFFER_BYTES)
        // tungstenite's defaults take 64 MiB messages and 16 MiB frames.
        .max_message_size(state.config.max_body_bytes)
        .max_frame_size(state.config.max_body_bytes)
        .on_upgrade(move |socket| {
            ws::serve(
                socket,
                state.schema,
                protocol,
                (caller, credential),
                state.services.auth.clone(),
                state.limiters.clone(),
            )
        })
}

/// What keeps the service from being ready (none: ready), and each
/// projection's lag.
async fn readiness(state: &AppState) -> (Vec<String>, serde_json::Map<String, Value>) {
    let services = &state.services;
    let mut problems = Vec::new();
    let mut lags = serde_json::Map::new();
    // A pooled connection the server closed earlier fails the first query
    // on it and leaves the pool: one more try on a fresh connection says
    // whether the database itself is gone, and why.
    let probe = match lag(&*services.read_models, &*services.store).await {
        Err(_) => lag(&*services.read_models, &*services.store).await,
        found => found,
    };
    match probe {
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
    for (task, health) in services.runtime.health().snapshot() {
        if let Some(problem) = health.problem {
            problems.push(format!("{task}: {problem}"));
        }
    }
    // A witness that refuses our checkpoint saw another history of this
    // ledger: serve nothing until someone looks.
    for (url, report) in &services.transparency.witness_reports() {
        if let Some(refused) = &report.refused {
            problems.push(format!("witness {url} refused the checkpoint: {refused}"));
        }
    }
    (problems, lags)
}

/// Ready when the store answers and, if a bound is set, every projection's
/// lag is within it; the body names what is not ready.
async fn ready(State(state): State<AppState>) -> Response {
    let (problems, lags) = readiness(&state).await;
    let ready = problems.is_empty();
    let witnesses = state.services.transparency.witness_reports();
    let body = Json(json!({
        "ready": ready,
        "problems": problems,
        "projection_lag": lags,
        "witnesses": witnesses,
    }));
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
    let (problems, _) = readiness(&state).await;
    let _ = writeln!(
        out,
        "# HELP agentledger_ready 1 when /ready answers 200 (the database answers and every projection is within its lag bound), else 0."
    );
    let _ = writeln!(out, "# TYPE agentledger_ready gauge");
    let _ = writeln!(out, "agentledger_ready {}", u8::from(problems.is_empty()));
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
    let _ = writeln!(
        out,
        "# HELP agentledger_task_restarts_total Restarts of a background task after it failed (projections: the runner; agents: a workflow's drive that panicked; tools: a tool attempt that panicked)."
    );
    let _ = writeln!(out, "# TYPE agentledger_task_restarts_total counter");
    for (task, health) in services.runtime.health().snapshot() {
        let _ = writeln!(
            out,
            "agentledger_task_restarts_total{{task=\"{task}\"}} {}",
            health.restarts
        );
    }
    let witnesses = services.transparency.witness_reports();
    // The families are declared with no witness too (no series then): the
    // alert rules name them on every deployment.
    {
        let _ = writeln!(out, "# HELP agentledger_witness_cosigned_size The largest tree a witness cosigned for this ledger.");
        let _ = writeln!(out, "# TYPE agentledger_witness_cosigned_size gauge");
        for (url, report) in &witnesses {
            let _ = writeln!(
                out,
                "agentledger_witness_cosigned_size{{witness=\"{url}\"}} {}",
                report.cosigned_size
            );
        }
        let _ = writeln!(out, "# HELP agentledger_witness_refused 1 while a witness refuses this ledger's checkpoint (its history does not extend what the witness cosigned).");
        let _ = writeln!(out, "# TYPE agentledger_witness_refused gauge");
        for (url, report) in &witnesses {
            let _ = writeln!(
                out,
                "agentledger_witness_refused{{witness=\"{url}\"}} {}",
                u8::from(report.refused.is_some())
            );
        }
        let _ = writeln!(out, "# HELP agentledger_witness_unreachable 1 when a witness could not be reached the last time.");
        let _ = writeln!(out, "# TYPE agentledger_witness_unreachable gauge");
        for (url, report) in &witnesses {
            let _ = writeln!(
                out,
                "agentledger_witness_unreachable{{witness=\"{url}\"}} {}",
                u8::from(report.unreachable.is_some())
            );
        }
    }
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
    if let Ok(counts) = services.read_models.count_by_state(None).await {
        let _ = writeln!(
            out,
            "# HELP agentledger_workflows Workflows by state (read model)."
        );
        let _ = writeln!(out, "# TYPE agentledger_workflows gauge");
        // Every state a workflow can be in, at zero too: alert rules find
        // a series for each.
        use agentledger_projections::model::status::STATES;
        for workflow_state in STATES
            .into_iter()
            .filter(|s| *s != agentledger_domain::workflow::WorkflowState::New)
        {
            let n = counts
                .iter()
                .find(|(state, _)| *state == workflow_state)
                .map_or(0, |(_, n)| *n);
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
    let cache = services.runtime.cache_stats();
    let _ = writeln!(
        out,
        "# HELP agentledger_cache_lookups_total Result cache lookups by kind (tool, model) and outcome."
    );
    let _ = writeln!(out, "# TYPE agentledger_cache_lookups_total counter");
    for (kind, outcome, n) in [
        ("tool", "hit", cache.tool_hits),
        ("tool", "miss", cache.tool_misses),
        ("model", "hit", cache.model_hits),
        ("model", "miss", cache.model_misses),
    ] {
        let _ = writeln!(
            out,
            "agentledger_cache_lookups_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP agentledger_cache_saved_seconds_total What the reused results took when first produced."
    );
    let _ = writeln!(out, "# TYPE agentledger_cache_saved_seconds_total counter");
    let _ = writeln!(
        out,
        "agentledger_cache_saved_seconds_total {}",
        cache.saved_ms as f64 / 1e3
    );
    let _ = writeln!(
        out,
        "# HELP agentledger_cache_entries Results in the cache."
    );
    let _ = writeln!(out, "# TYPE agentledger_cache_entries gauge");
    let _ = writeln!(out, "agentledger_cache_entries {}", cache.entries);
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

/// How connections are accepted: bounds that hold before a request exists.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// A client must send a request's whole header within this time, or
    /// the connection is closed (slow-header clients hold no socket longer).
    pub header_read_timeout: std::time::Duration,
    /// Open connections (HTTP and WebSocket) at once; more wait in the
    /// listen backlog.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: std::time::Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops
/// accepting and lets in-flight requests finish. Connections send small
/// frames (subscription events) at once: without `TCP_NODELAY`, Nagle's
/// algorithm holds them until the peer's delayed ACK, ~40 ms later.
///
/// The accept loop is hyper-util's connection builder rather than
/// `axum::serve`, which sets no timer and so has no header-read timeout.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = open.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = tower::ServiceBuilder::new()
            .map_request(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    request
                },
            )
            .service(router.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
