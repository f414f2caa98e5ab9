//! The REST door for clients of the system agentledger replaces:
//! `POST /api/workflow`, `GET /api/workflow/{id}`, `GET /api/health`, and
//! the OpenAPI document of these at `/api/openapi.json`.
//!
//! A thin layer: each call runs one fixed GraphQL operation through the
//! same schema, with the same credential check, role guard, tenant, rate
//! limits and body limit as `POST /graphql`, and answers its result in
//! snake_case JSON; a GraphQL error becomes the HTTP status of its code
//! with `{"error": {"code", "message"}}`.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{OpenApi, ToSchema};

use crate::{auth, AppState, Caller};

/// The body of `POST /api/workflow`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SubmitRequest {
    /// What to do, in words (UTF-8, at most 32 KiB).
    #[schema(example = "요약해 주세요. 그다음 단어 수를 세어 주세요.")]
    pub request: String,
    /// `low`, `normal` (the default), `high` or `critical` (operators
    /// only); either case.
    pub priority: Option<String>,
    /// A document the subtasks work on (at most 1 MiB).
    pub input: Option<String>,
    /// The same key with the same request answers the first workflow and
    /// starts nothing; with another request it is a conflict (409).
    pub idempotency_key: Option<String>,
}

/// A workflow as `POST /api/workflow` answers it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all(serialize = "snake_case", deserialize = "camelCase"))]
pub struct Submitted {
    pub id: String,
    /// Where it stands as of the answer: usually `SUBMITTED`, or a later
    /// state if the agents were quicker; `GET /api/workflow/{id}` follows it.
    pub state: String,
}

/// A subtask of a workflow's plan and how it went.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all(serialize = "snake_case", deserialize = "camelCase"))]
pub struct SubtaskView {
    pub id: String,
    pub title: String,
    pub tool: String,
    pub depends_on: Vec<String>,
    /// `PENDING`, `RUNNING`, `RETRYING`, `SUCCEEDED`, `FAILED` or `SKIPPED`.
    pub state: String,
    pub attempts: i32,
    pub output: Option<String>,
}

/// Subtasks done and in all.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    pub done: i32,
    pub total: i32,
}

/// RUNE's review.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EthicsView {
    pub transparency: f64,
    pub collaboration: f64,
    pub autonomy: f64,
    pub fairness: f64,
    pub passed: bool,
    pub findings: Vec<String>,
}

/// A workflow's state and results, as `GET /api/workflow/{id}` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all(serialize = "snake_case", deserialize = "camelCase"))]
pub struct WorkflowView {
    pub id: String,
    /// `SUBMITTED`, `ANALYSING`, `GATING`, `AWAITING_HUMAN`, `EXECUTING`,
    /// `REVIEWING`, or a final one: `COMPLETED`, `REJECTED`, `FAILED`,
    /// `FLAGGED`, `CANCELLED`.
    pub state: String,
    pub priority: String,
    pub request: String,
    pub progress: ProgressView,
    pub subtasks: Vec<SubtaskView>,
    pub ethics: Option<EthicsView>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub updated_at: String,
    pub completed_at: Option<String>,
}

/// What went wrong; nothing was written.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// `BAD_INPUT` (400), `UNAUTHENTICATED` (401), `FORBIDDEN` (403),
    /// `NOT_FOUND` (404), `CONFLICT` (409), `RATE_LIMITED` (429),
    /// `UNAVAILABLE` (503), `INTERNAL` (500).
    pub code: String,
    pub message: String,
}

/// The service's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct HealthView {
    /// `ok`.
    pub status: String,
    pub version: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentledger REST",
        description = "The REST door for clients of the system agentledger replaces. Every call but \
                       /api/health carries an API key or a JWT: `Authorization: Bearer …` or `X-API-Key`."
    ),
    paths(submit, workflow, health),
    components(schemas(
        SubmitRequest,
        Submitted,
        WorkflowView,
        SubtaskView,
        ProgressView,
        EthicsView,
        ErrorBody,
        ErrorDetail,
        HealthView
    )),
    modifiers(&Credential)
)]
struct Document;

/// Declares the bearer credential every call but the health check needs.
struct Credential;

impl utoipa::Modify for Credential {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The OpenAPI document of the REST door, generated from this module.
pub fn openapi_json() -> String {
    Document::openapi()
        .to_pretty_json()
        .expect("the document serialises")
}

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json()).into_response()
}

fn failure(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
        },
    };
    (status, Json(body)).into_response()
}

/// The status of a GraphQL error code.
fn status_of(code: &str) -> StatusCode {
    match code {
        "BAD_INPUT" => StatusCode::BAD_REQUEST,
        "UNAUTHENTICATED" => StatusCode::UNAUTHORIZED,
        "FORBIDDEN" => StatusCode::FORBIDDEN,
        "NOT_FOUND" => StatusCode::NOT_FOUND,
        "CONFLICT" => StatusCode::CONFLICT,
        "RATE_LIMITED" => StatusCode::TOO_MANY_REQUESTS,
        "UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Runs `query` with `variables` as the caller; the data of its one root
/// field, or the response for its first error.
async fn run(
    state: &AppState,
    caller: Option<auth::Principal>,
    query: &str,
    variables: Value,
) -> Result<Value, Response> {
    let Some(principal) = caller else {
        return Err(failure(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "this server requires a credential",
        ));
    };
    let request = async_graphql::Request::new(query)
        .variables(async_graphql::Variables::from_json(variables));
    let request = auth::authorize(request, &principal, state.services.limits.shape)
        .map_err(|refused| from_errors(&refused))?;
    // The response budget of POST /graphql, and its counters.
    let budget = state.services.limits.max_response_bytes;
    let (request, meter) = crate::graphql::budget::Meter::attach(request, budget);
    let response = meter.settle_exactly(state.schema.execute(request).await);
    state
        .counters
        .graphql_requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if response.is_err() {
        state
            .counters
            .graphql_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(from_errors(&response));
    }
    let data = response.data.into_json().unwrap_or(Value::Null);
    Ok(data
        .as_object()
        .and_then(|o| o.values().next().cloned())
        .unwrap_or(Value::Null))
}

fn from_errors(response: &async_graphql::Response) -> Response {
    let Some(first) = response.errors.first() else {
        return failure(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "no answer");
    };
    let code = first
        .extensions
        .as_ref()
        .and_then(|x| x.get("code"))
        .and_then(|c| match c {
            async_graphql::Value::String(code) => Some(code.clone()),
            async_graphql::Value::Enum(code) => Some(code.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| "BAD_INPUT".into());
    failure(status_of(&code), &code, first.message.clone())
}

const SUBMIT: &str = "mutation($request: String!, $priority: Priority, $input: String, $key: String) {
  submitWorkflow(request: $request, priority: $priority, input: $input, idempotencyKey: $key) { id state }
}";

const WORKFLOW: &str = "query($id: ID!) {
  workflow(id: $id) {
    id state priority request progress { done total }
    subtasks { id title tool dependsOn state attempts output }
    ethics { transparency collaboration autonomy fairness passed findings }
    createdAt updatedAt completedAt
  }
}";

/// Starts a workflow.
#[utoipa::path(
    post,
    path = "/api/workflow",
    request_body = SubmitRequest,
    responses(
        (status = 201, description = "Started (or, with a key seen before, the workflow it started)", body = Submitted,
         headers(("location" = String, description = "/api/workflow/{id}"))),
        (status = 400, description = "Bad input; nothing was written", body = ErrorBody),
        (status = 401, description = "No credential or a bad one", body = ErrorBody),
        (status = 403, description = "The credential's role may not submit", body = ErrorBody),
        (status = 409, description = "The idempotency key was used for another request", body = ErrorBody),
        (status = 413, description = "The body is over the limit (2 MiB by default)"),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody),
        (status = 503, description = "The database cannot be reached now; retry", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    body: Bytes,
) -> Response {
    let body: SubmitRequest = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BAD_INPUT",
                format!("the body must be JSON with a string `request`: {e}"),
            )
        }
    };
    let priority = match body.priority.as_deref().map(str::to_ascii_uppercase) {
        None => Value::Null,
        Some(p) if matches!(p.as_str(), "LOW" | "NORMAL" | "HIGH" | "CRITICAL") => Value::String(p),
        Some(other) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "BAD_INPUT",
                format!("priority {other:?}: use low, normal, high or critical"),
            )
        }
    };
    let variables = json!({
        "request": body.request,
        "priority": priority,
        "input": body.input,
        "key": body.idempotency_key,
    });
    let data = match run(&state, caller, SUBMIT, variables).await {
        Ok(data) => data,
        Err(response) => return response,
    };
    match serde_json::from_value::<Submitted>(data) {
        Ok(submitted) => {
            let location = format!("/api/workflow/{}", submitted.id);
            (
                StatusCode::CREATED,
                [(header::LOCATION, location)],
                Json(submitted),
            )
                .into_response()
        }
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()),
    }
}

/// A workflow's state and results.
#[utoipa::path(
    get,
    path = "/api/workflow/{id}",
    params(("id" = String, Path, description = "The workflow's id (a UUID)")),
    responses(
        (status = 200, description = "The workflow", body = WorkflowView),
        (status = 400, description = "Not a workflow id", body = ErrorBody),
        (status = 401, description = "No credential or a bad one", body = ErrorBody),
        (status = 404, description = "No such workflow in the caller's tenant", body = ErrorBody),
        (status = 429, description = "Too many requests; see Retry-After", body = ErrorBody),
        (status = 503, description = "The database cannot be reached now; retry", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn workflow(
    State(state): State<AppState>,
    axum::Extension(Caller(caller)): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let data = match run(&state, caller, WORKFLOW, json!({ "id": id })).await {
        Ok(data) => data,
        Err(response) => return response,
    };
    if data.is_null() {
        return failure(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no workflow {id} in your tenant"),
        );
    }
    match serde_json::from_value::<WorkflowView>(data) {
        Ok(view) => Json(view).into_response(),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string()),
    }
}

/// The service's health (no credential needed).
#[utoipa::path(
    get,
    path = "/api/health",
    responses((status = 200, description = "The service answers", body = HealthView))
)]
pub(crate) async fn health() -> Json<HealthView> {
    Json(HealthView {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}
