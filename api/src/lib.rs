//! The HTTP surface of agentledger. Today: `GET /health`. Issue #5 adds the
//! GraphQL schema, subscriptions, readiness and metrics here.
//!
//! This is the only crate that will know axum and async-graphql; it converts
//! domain types at its edge and never talks SQL itself.

use std::future::Future;

use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// What `/health` reports besides being alive.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    /// `postgres` or `in-memory`.
    pub store: &'static str,
    /// The configuration profile.
    pub profile: String,
}

/// The service's routes.
pub fn router(info: ServiceInfo) -> Router {
    Router::new().route("/health", get(move || health(info.clone())))
}

async fn health(info: ServiceInfo) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "store": info.store,
        "profile": info.profile,
    }))
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets
/// in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}
