//! The web console, served at `/`: a page built from `console/` (Vite,
//! Preact, Chart.js, graphql-ws) into `api/assets/console` and embedded
//! in the binary, so serving it needs no Node and no CDN. Every figure it
//! shows comes from the same GraphQL API, with the signed-in caller's
//! credential, roles and tenant; the page itself holds no data.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rust_embed::Embed;
use serde_json::json;

use crate::AppState;

#[derive(Embed)]
#[folder = "assets/console/"]
struct Assets;

/// Scripts, styles and connections to this origin only, and to the
/// configured issuer for the sign-in's token exchange.
fn policy(state: &AppState) -> String {
    let issuer = state
        .config
        .console_oidc
        .as_ref()
        .and_then(|o| origin_of(&o.issuer))
        .map(|o| format!(" {o}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'{issuer}; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// `scheme://host[:port]` of a URL, or `None` for anything else.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
    (matches!(scheme, "http" | "https") && !authority.is_empty() && authority.chars().all(plain))
        .then(|| format!("{scheme}://{authority}"))
}

/// `GET /`: the console's page.
pub(crate) async fn page(State(state): State<AppState>) -> Response {
    let Some(file) = Assets::get("index.html") else {
        return (StatusCode::NOT_FOUND, "this build has no console").into_response();
    };
    let mut response = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        file.data.into_owned(),
    )
        .into_response();
    let headers = response.headers_mut();
    if let Ok(policy) = HeaderValue::from_str(&policy(&state)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// `GET /assets/{path}`: a built script or stylesheet. Their names carry a
/// hash of their content, so they are cached for good.
pub(crate) async fn asset(Path(path): Path<String>) -> Response {
    let content_type = match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    };
    let Some(file) = Assets::get(&format!("assets/{path}")) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        file.data.into_owned(),
    )
        .into_response()
}

/// `GET /console/config.json`: how the console may sign in (with
/// authentication off, in dev, it needs no credential at all).
pub(crate) async fn config(State(state): State<AppState>) -> Response {
    let required = state.services.auth.mode() == crate::auth::Mode::Required;
    (
        [(header::CACHE_CONTROL, "no-cache")],
        Json(json!({
            "authentication": if required { "required" } else { "off" },
            "oidc": state.config.console_oidc,
        })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_assets_are_embedded() {
        let page = Assets::get("index.html").expect("built console");
        let page = std::str::from_utf8(&page.data).unwrap();
        let scripts: Vec<&str> = page
            .split("src=\"/")
            .skip(1)
            .chain(page.split("href=\"/").skip(1))
            .map(|rest| rest.split('"').next().unwrap())
            .filter(|p| p.starts_with("assets/"))
            .collect();
        assert!(scripts.iter().any(|p| p.ends_with(".js")), "{page}");
        for path in scripts {
            assert!(Assets::get(path).is_some(), "{path} is not embedded");
        }
        // Nothing inline: the page's policy forbids it.
        assert!(
            !page.contains("<script>") && !page.contains("<style"),
            "{page}"
        );
    }

    #[test]
    fn only_a_plain_origin_enters_the_policy() {
        assert_eq!(
            origin_of("https://id.example.com/realms/acme").as_deref(),
            Some("https://id.example.com")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8081").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(origin_of("https://evil.example; script-src *"), None);
        assert_eq!(origin_of("javascript:alert(1)"), None);
    }
}
