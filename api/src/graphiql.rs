//! GraphiQL, served from the binary. The page and everything it runs are
//! embedded at build time (`api/assets/graphiql`, fetched from the npm
//! registry by `ops/vendor-graphiql.sh`), so exploring the API needs no CDN
//! and the page's Content-Security-Policy can forbid every other origin.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// The page's policy: scripts, styles and connections to this origin only
/// (GraphiQL sets some styles inline; its fonts are inlined as data URLs).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     font-src 'self' data:; img-src 'self' data:; connect-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const PAGE: &[u8] = include_bytes!("../assets/graphiql/index.html");

/// The embedded assets by the name the page asks for.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "graphiql.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/graphiql.min.js"),
    ),
    (
        "graphiql.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/graphiql/graphiql.min.css"),
    ),
    (
        "react.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/react.production.min.js"),
    ),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/react-dom.production.min.js"),
    ),
    (
        "start.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/start.js"),
    ),
];

/// `GET /graphql`: the page.
pub(crate) async fn page() -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `GET /graphql/assets/{name}`: one embedded asset, or 404.
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    let Some((_, content_type, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            // The files change only with the binary; an hour spares the
            // reloads and a new release is picked up soon enough.
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        *body,
    )
        .into_response()
}
