//! Who is calling and what they may do (issue #12, docs/security.md).
//!
//! Every request is authenticated before it reaches GraphQL: an API key
//! (`Authorization: Bearer alk_…` or `X-API-Key: alk_…`) or a JWT from the
//! organisation's identity provider (`Authorization: Bearer eyJ…`). The
//! result is a [`Principal`]: a stable subject, a display name, a tenant
//! and a set of [`Role`]s. What each role may call is one table,
//! [`access::ACCESS`], enforced for every operation before it runs.
//!
//! With `mode = off` (the dev profile's default) every caller is the
//! anonymous principal with every role.

pub mod access;
pub mod jwt;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use agentledger_eventstore::api_keys::{ApiKey, ApiKeys, PresentedKey};
use agentledger_eventstore::{Actor, ActorKind};
use axum::http::HeaderMap;
use chrono::Utc;

pub use access::{authorize, Access};
pub use jwt::{JwksSource, JwtConfig, JwtVerifier};

/// A role, as named in keys, tokens and the docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Reads workflows, events and metrics; follows subscriptions.
    Viewer,
    /// Viewer, and submits workflows and cancels its own.
    Submitter,
    /// Viewer, and cancels any workflow and decides escalations.
    Operator,
    /// Viewer, and the audit tools: trail, replay, verification, digests.
    Auditor,
    /// Everything, and alone: forgetting subjects, key management.
    Admin,
    /// External agent workers (a later issue); nothing else.
    Agent,
}

impl Role {
    /// Every role, in the order of the docs.
    pub const ALL: [Role; 6] = [
        Role::Viewer,
        Role::Submitter,
        Role::Operator,
        Role::Auditor,
        Role::Admin,
        Role::Agent,
    ];

    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Submitter => "submitter",
            Role::Operator => "operator",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }

    /// The role named `name` (case-insensitive).
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str().eq_ignore_ascii_case(name.trim()))
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// Every role (the anonymous caller of `mode = off`).
    pub fn all() -> Self {
        Role::ALL.into_iter().collect()
    }

    /// Whether `role` is in the set.
    pub fn has(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The roles' names.
    pub fn names(self) -> Vec<&'static str> {
        Role::ALL
            .into_iter()
            .filter(|r| self.has(*r))
            .map(Role::as_str)
            .collect()
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(roles: I) -> Self {
        Roles(roles.into_iter().fold(0, |bits, r| bits | r.bit()))
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    ApiKey,
    Jwt,
    /// Authentication is off (dev).
    None,
}

impl Method {
    /// As recorded in an actor's `method`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::ApiKey => "api_key",
            Method::Jwt => "jwt",
            Method::None => "none",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Stable and unique: `apikey:<key id>`, `jwt:<issuer>#<sub>`, or
    /// `anonymous`. A workflow's owner is its submitter's subject.
    pub subject: String,
    /// For people to read: a token's `name` or `preferred_username`, an API
    /// key's name.
    pub name: String,
    /// Every read and write is confined to it.
    pub tenant: String,
    pub roles: Roles,
    pub method: Method,
}

impl Principal {
    /// The caller of `mode = off`: anonymous, default tenant, every role.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            name: "anonymous".into(),
            tenant: "default".into(),
            roles: Roles::all(),
            method: Method::None,
        }
    }

    /// The principal as the actor of what it records.
    pub fn actor(&self) -> Actor {
        Actor {
            kind: ActorKind::Human,
            name: self.name.clone(),
            version: String::new(),
            subject: self.subject.clone(),
            method: self.method.as_str().into(),
            role: String::new(),
        }
    }

    fn of_key(key: &ApiKey) -> Self {
        Self {
            subject: format!("apikey:{}", key.key_id),
            name: key.name.clone(),
            tenant: key.tenant.clone(),
            roles: key.roles.iter().filter_map(|r| Role::parse(r)).collect(),
            method: Method::ApiKey,
        }
    }
}

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every caller is [`Principal::anonymous`] (dev only).
    Off,
    /// Every request carries a valid credential.
    Required,
}

/// Why a caller is not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one that is not valid (unknown, revoked, expired,
    /// bad signature, wrong issuer or audience): `UNAUTHENTICATED`, HTTP 401,
    /// WebSocket close 4401. The message says which, never the secret.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential could not be checked now (the database or the
    /// identity provider did not answer): `UNAVAILABLE`, retry.
    #[error("{0}")]
    Unavailable(String),
}

impl AuthError {
    fn unauthenticated(why: impl Into<String>) -> Self {
        Self::Unauthenticated(why.into())
    }
}

/// The authentication settings (`Debug` leaves secrets out).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: Mode,
    /// JWT verification, when tokens are accepted.
    pub jwt: Option<JwtConfig>,
    /// Whether the submitter of a workflow may decide its escalation.
    pub allow_self_approval: bool,
}

impl AuthConfig {
    /// Authentication off, self-approval allowed: the dev profile.
    pub fn off() -> Self {
        Self {
            mode: Mode::Off,
            jwt: None,
            allow_self_approval: true,
        }
    }
}

/// How long a looked-up API key is trusted before it is read again: the
/// bound on how late a revocation reaches this process.
const KEY_CACHE_TTL: Duration = Duration::from_secs(1);
/// How often a key's `last_used_at` is written.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Cached lookups kept at most (the cache is cleared when it is full).
const KEY_CACHE_MAX: usize = 10_000;

struct CachedKey {
    key: Option<ApiKey>,
    read_at: Instant,
}

/// Checks credentials: API keys against the key store (cached for
/// [`KEY_CACHE_TTL`], so a revoked key stops working on every node within
/// about a second), JWTs against the configured issuer's keys.
pub struct Authenticator {
    config: AuthConfig,
    keys: Arc<dyn ApiKeys>,
    jwt: Option<JwtVerifier>,
    cache: Mutex<HashMap<(String, [u8; 32]), CachedKey>>,
    touched: Mutex<HashMap<uuid::Uuid, Instant>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.config.mode)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Whether requests must authenticate.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// An authenticator over `keys`; fails when the JWT settings are unusable.
    pub fn new(config: AuthConfig, keys: Arc<dyn ApiKeys>) -> Result<Self, String> {
        let jwt = config.jwt.clone().map(JwtVerifier::new).transpose()?;
        Ok(Self {
            config,
            keys,
            jwt,
            cache: Mutex::default(),
            touched: Mutex::default(),
        })
    }

    /// Authentication off (tests and dev).
    pub fn off() -> Self {
        Self::new(
            AuthConfig::off(),
            Arc::new(agentledger_eventstore::api_keys::InMemoryApiKeys::default()),
        )
        .expect("no JWT settings to check")
    }

    /// Reads the JWKS now, when one is configured (so that a bad one fails
    /// at start): how many keys it holds.
    pub async fn load_jwks(&self) -> Result<Option<usize>, String> {
        match &self.jwt {
            Some(jwt) if jwt.has_jwks() => jwt.load().await.map(Some),
            _ => Ok(None),
        }
    }

    /// The settings.
    pub fn config(&self) -> &AuthConfig {
        &self.config
    }

    /// The caller of a request with `headers`.
    pub async fn authenticate_headers(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        if self.config.mode == Mode::Off {
            return Ok(Principal::anonymous());
        }
        let credential = Self::credential_of(headers)?;
        self.authenticate(credential).await
    }

    /// The credential `headers` carry: `Authorization: Bearer …` or
    /// `X-API-Key`.
    pub fn credential_of(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
        let header = |name: &str| -> Result<Option<&str>, AuthError> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str().map_err(|_| {
                        AuthError::unauthenticated(format!("the {name} header is not text"))
                    })
                })
                .transpose()
        };
        Ok(match (header("authorization")?, header("x-api-key")?) {
            (Some(authorization), _) => Some(bearer(authorization)?),
            (None, Some(key)) => Some(key.trim()),
            (None, None) => None,
        })
    }

    /// The caller of a WebSocket connection: the upgrade request's headers
    /// or, when they carry none, the `connection_init` payload
    /// (`{"Authorization": "Bearer …"}` or `{"X-API-Key": "…"}`, any case).
    pub async fn authenticate_init(
        &self,
        payload: &serde_json::Value,
    ) -> Result<Principal, AuthError> {
        if self.config.mode == Mode::Off {
            return Ok(Principal::anonymous());
        }
        let field = |wanted: &str| {
            payload.as_object().and_then(|o| {
                o.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(wanted))
                    .map(|(_, v)| v)
            })
        };
        fn text(v: &serde_json::Value) -> Result<&str, AuthError> {
            v.as_str().ok_or_else(|| {
                AuthError::unauthenticated("a credential in connection_init is a string")
            })
        }
        let credential = match (field("authorization"), field("x-api-key")) {
            (Some(v), _) => Some(bearer(text(v)?)?),
            (None, Some(v)) => Some(text(v)?.trim()),
            (None, None) => None,
        };
        self.authenticate(credential).await
    }

    /// The credential in a `connection_init` payload, if it carries one.
    pub fn credential_in_init(payload: &serde_json::Value) -> Option<String> {
        let object = payload.as_object()?;
        let field = |wanted: &str| {
            object
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(wanted))
                .and_then(|(_, v)| v.as_str())
        };
        match (field("authorization"), field("x-api-key")) {
            (Some(authorization), _) => bearer(authorization).ok().map(str::to_string),
            (None, Some(key)) => Some(key.trim().to_string()),
            (None, None) => None,
        }
    }

    /// Whether a request with `headers` carries a credential at all.
    pub fn has_credential(headers: &HeaderMap) -> bool {
        headers.contains_key("authorization") || headers.contains_key("x-api-key")
    }

    /// The caller presenting `credential` (an API key or a JWT).
    pub async fn authenticate(&self, credential: Option<&str>) -> Result<Principal, AuthError> {
        if self.config.mode == Mode::Off {
            return Ok(Principal::anonymous());
        }
        let credential = credential.filter(|c| !c.is_empty()).ok_or_else(|| {
            AuthError::unauthenticated(
                "this server requires a credential: an API key or a bearer token",
            )
        })?;
        if credential.starts_with(agentledger_eventstore::api_keys::KEY_PREFIX) {
            let presented = PresentedKey::parse(credential)
                .ok_or_else(|| AuthError::unauthenticated("malformed API key"))?;
            return self.api_key(&presented).await;
        }
        match &self.jwt {
            Some(jwt) => jwt.verify(credential).await,
            None => Err(AuthError::unauthenticated(
                "not an API key, and this server accepts no bearer tokens",
            )),
        }
    }

    async fn api_key(&self, presented: &PresentedKey) -> Result<Principal, AuthError> {
        let cache_key = (presented.lookup().to_string(), presented.fingerprint());
        let cached = {
            let cache = self.cache.lock().expect("key cache lock");
            cache
                .get(&cache_key)
                .filter(|c| c.read_at.elapsed() < KEY_CACHE_TTL)
                .map(|c| c.key.clone())
        };
        let key = match cached {
            Some(key) => key,
            None => {
                let key = self.keys.authenticate(presented).await.map_err(|e| {
                    tracing::warn!(error = %e, "cannot check an API key");
                    AuthError::Unavailable("cannot check the API key now; retry".into())
                })?;
                // Only keys that exist are cached: made-up ones cannot push
                // real ones out (they cost a lookup each, within the
                // address's rate limit).
                if key.is_some() {
                    let mut cache = self.cache.lock().expect("key cache lock");
                    if cache.len() >= KEY_CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(
                        cache_key,
                        CachedKey {
                            key: key.clone(),
                            read_at: Instant::now(),
                        },
                    );
                }
                key
            }
        };
        let key = key.ok_or_else(|| AuthError::unauthenticated("unknown API key"))?;
        if key.revoked_at.is_some() {
            return Err(AuthError::unauthenticated("this API key was revoked"));
        }
        if !key.usable_at(Utc::now()) {
            return Err(AuthError::unauthenticated("this API key has expired"));
        }
        self.touch(&key);
        Ok(Principal::of_key(&key))
    }

    /// Notes the key's use, at most once a minute per key and process, in
    /// the background (a slow write never delays a request).
    fn touch(&self, key: &ApiKey) {
        let due = {
            let mut touched = self.touched.lock().expect("touched lock");
            let due = touched
                .get(&key.key_id)
                .is_none_or(|at| at.elapsed() >= TOUCH_EVERY);
            if due {
                if touched.len() >= KEY_CACHE_MAX {
                    touched.clear();
                }
                touched.insert(key.key_id, Instant::now());
            }
            due
        };
        if due {
            let (keys, id) = (self.keys.clone(), key.key_id);
            tokio::spawn(async move {
                if let Err(e) = keys.touch(id, Utc::now()).await {
                    tracing::debug!(error = %e, "cannot note an API key's use");
                }
            });
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(authorization: &str) -> Result<&str, AuthError> {
    let (scheme, token) = authorization.trim().split_once(' ').ok_or_else(|| {
        AuthError::unauthenticated("the Authorization header is `Bearer <credential>`")
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::unauthenticated(
            "the Authorization header is `Bearer <credential>`",
        ));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentledger_eventstore::api_keys::{InMemoryApiKeys, NewApiKey};

    async fn required_with_key(roles: &[&str]) -> (Authenticator, Arc<InMemoryApiKeys>, String) {
        let keys = Arc::new(InMemoryApiKeys::default());
        let (_, secret) = keys
            .create(NewApiKey {
                name: "app".into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                tenant: "acme".into(),
                expires_at: None,
            })
            .await
            .unwrap();
        let config = AuthConfig {
            mode: Mode::Required,
            jwt: None,
            allow_self_approval: false,
        };
        (
            Authenticator::new(config, keys.clone()).unwrap(),
            keys,
            secret,
        )
    }

    #[tokio::test]
    async fn a_key_in_either_header_is_its_principal() {
        let (auth, _, secret) = required_with_key(&["submitter", "auditor"]).await;
        for (name, value) in [
            ("authorization", format!("Bearer {secret}")),
            ("x-api-key", secret.clone()),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(name, value.parse().unwrap());
            let principal = auth.authenticate_headers(&headers).await.unwrap();
            assert_eq!(principal.name, "app");
            assert_eq!(principal.tenant, "acme");
            assert!(principal.subject.starts_with("apikey:"));
            assert!(principal.roles.has(Role::Submitter) && principal.roles.has(Role::Auditor));
            assert!(!principal.roles.has(Role::Admin));
        }
    }

    #[tokio::test]
    async fn no_or_bad_credentials_are_unauthenticated() {
        let (auth, _, secret) = required_with_key(&["viewer"]).await;
        let refused =
            |r: Result<Principal, AuthError>| matches!(r, Err(AuthError::Unauthenticated(_)));
        assert!(refused(auth.authenticate(None).await));
        assert!(refused(auth.authenticate(Some("")).await));
        assert!(refused(auth.authenticate(Some("alk_nonsense")).await));
        assert!(refused(
            auth.authenticate(Some("eyJhbGciOiJub25lIn0.e30.")).await
        ));
        let mut forged = secret.clone();
        forged.replace_range(secret.len() - 3.., "zzz");
        assert!(refused(auth.authenticate(Some(&forged)).await));
        let mut headers = HeaderMap::new();
        headers.insert("authorization", format!("Basic {secret}").parse().unwrap());
        assert!(refused(auth.authenticate_headers(&headers).await));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_key_stops_working_within_the_cache_time() {
        let (auth, keys, secret) = required_with_key(&["viewer"]).await;
        auth.authenticate(Some(&secret)).await.unwrap();
        keys.revoke("app").await.unwrap();
        // The cached lookup may serve for up to KEY_CACHE_TTL; not longer.
        tokio::time::advance(KEY_CACHE_TTL).await;
        let refused = auth.authenticate(Some(&secret)).await.unwrap_err();
        assert!(refused.to_string().contains("revoked"), "{refused}");
    }

    #[tokio::test]
    async fn connection_init_carries_the_credential_in_any_case() {
        let (auth, _, secret) = required_with_key(&["viewer"]).await;
        for payload in [
            serde_json::json!({ "Authorization": format!("Bearer {secret}") }),
            serde_json::json!({ "authorization": format!("bearer {secret}") }),
            serde_json::json!({ "X-API-Key": secret }),
        ] {
            assert_eq!(auth.authenticate_init(&payload).await.unwrap().name, "app");
        }
        assert!(auth
            .authenticate_init(&serde_json::json!({}))
            .await
            .is_err());
        assert!(auth
            .authenticate_init(&serde_json::json!({ "Authorization": 7 }))
            .await
            .is_err());
    }

    #[test]
    fn roles_parse_by_name_and_sets_hold_them() {
        assert_eq!(Role::parse("Operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
        let roles: Roles = [Role::Viewer, Role::Agent].into_iter().collect();
        assert_eq!(roles.names(), vec!["viewer", "agent"]);
        assert!(!roles.has(Role::Admin));
        assert_eq!(Roles::all().names().len(), Role::ALL.len());
    }
}
