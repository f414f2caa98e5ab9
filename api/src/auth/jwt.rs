//! JWT bearer tokens from the organisation's identity provider (Keycloak,
//! Auth0, Entra ID, Dex, …), verified with `jsonwebtoken`.
//!
//! RS256, ES256 and EdDSA tokens are checked against a JWKS (a file, or an
//! `https` URL fetched at start and again when a token names a key id the
//! set does not hold, at most once per [`REFETCH_AFTER`]); HS256 tokens
//! against a shared secret. `exp` is required; `exp`, `nbf`, `iss` and
//! `aud` are checked with [`LEEWAY_SECONDS`] of clock skew. Which claims
//! carry the roles and the tenant is configurable, nested ones included
//! (`realm_access.roles`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::{AuthError, Method, Principal, Role};

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 60;
/// Shortest time between two fetches of the JWKS for an unknown key id, so
/// that tokens with made-up key ids cannot make the service hammer the
/// identity provider.
pub const REFETCH_AFTER: Duration = Duration::from_secs(30);
/// Time allowed to fetch the JWKS.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the identity provider's public keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// `https://…` (plain `http` only to a loopback address, for tests).
    Url(String),
}

impl JwksSource {
    /// A URL when `text` looks like one, else a file path.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("https://") {
            return Ok(Self::Url(text.into()));
        }
        if let Some(rest) = text.strip_prefix("http://") {
            let host = rest.split(['/', ':']).next().unwrap_or_default();
            if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                return Ok(Self::Url(text.into()));
            }
            return Err(format!(
                "the JWKS URL {text} is not https: keys fetched in the clear could be replaced on the way"
            ));
        }
        Ok(Self::File(PathBuf::from(text)))
    }
}

/// How tokens are verified and read. Its `Debug` leaves the secret out.
#[derive(Clone)]
pub struct JwtConfig {
    /// The expected `iss` (required with a JWKS).
    pub issuer: Option<String>,
    /// The expected `aud` (checked when set).
    pub audience: Option<String>,
    pub jwks: Option<JwksSource>,
    /// The HS256 shared secret (for small setups).
    pub hs256_secret: Option<Vec<u8>>,
    /// The claim with the roles, dotted for nested claims (default `roles`):
    /// an array of strings or one space-separated string.
    pub roles_claim: String,
    /// The claim with the tenant (default `tenant`); `default` when absent.
    pub tenant_claim: String,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("jwks", &self.jwks)
            .field("hs256_secret", &self.hs256_secret.as_ref().map(|_| "…"))
            .field("roles_claim", &self.roles_claim)
            .field("tenant_claim", &self.tenant_claim)
            .finish()
    }
}

/// Verifies tokens against [`JwtConfig`].
pub struct JwtVerifier {
    config: JwtConfig,
    http: reqwest::Client,
    /// The key set and when it was read.
    keys: tokio::sync::RwLock<(JwkSet, Option<Instant>)>,
    refetch: tokio::sync::Mutex<()>,
}

impl JwtVerifier {
    /// A verifier; the key set is read on first use.
    pub fn new(config: JwtConfig) -> Result<Self, String> {
        if config.jwks.is_none() && config.hs256_secret.is_none() {
            return Err("JWT verification needs a JWKS or an HS256 secret".into());
        }
        if config.jwks.is_some() && config.issuer.is_none() {
            return Err(
                "JWT verification against a JWKS needs the expected issuer (jwt_issuer)".into(),
            );
        }
        if config.hs256_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("the HS256 secret has fewer than 32 bytes".into());
        }
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("HTTP client for the JWKS: {e}"))?;
        Ok(Self {
            config,
            http,
            keys: tokio::sync::RwLock::new((JwkSet { keys: Vec::new() }, None)),
            refetch: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether tokens are checked against a JWKS.
    pub fn has_jwks(&self) -> bool {
        self.config.jwks.is_some()
    }

    /// Reads the key set now (at start, so that a bad JWKS fails loudly).
    pub async fn load(&self) -> Result<usize, String> {
        let set = self.fetch().await?;
        let n = set.keys.len();
        *self.keys.write().await = (set, Some(Instant::now()));
        Ok(n)
    }

    async fn fetch(&self) -> Result<JwkSet, String> {
        let text = match &self.config.jwks {
            None => return Ok(JwkSet { keys: Vec::new() }),
            Some(JwksSource::File(path)) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("reading the JWKS {}: {e}", path.display()))?,
            Some(JwksSource::Url(url)) => {
                let response = self
                    .http
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| format!("fetching the JWKS {url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!(
                        "fetching the JWKS {url}: HTTP {}",
                        response.status()
                    ));
                }
                response
                    .text()
                    .await
                    .map_err(|e| format!("fetching the JWKS {url}: {e}"))?
            }
        };
        serde_json::from_str(&text).map_err(|e| format!("the JWKS is not a key set: {e}"))
    }

    /// The key for a token signed with `alg` under `kid`.
    async fn key(&self, alg: Algorithm, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        let refused = |why: &str| AuthError::Unauthenticated(why.into());
        if alg == Algorithm::HS256 {
            let secret = self
                .config
                .hs256_secret
                .as_ref()
                .ok_or_else(|| refused("HS256 tokens are not accepted here"))?;
            return Ok(DecodingKey::from_secret(secret));
        }
        if !matches!(alg, Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA) {
            return Err(refused(
                "the token's algorithm is not accepted (RS256, ES256, EdDSA, HS256)",
            ));
        }
        if self.config.jwks.is_none() {
            return Err(refused(
                "tokens signed with public keys are not accepted here",
            ));
        }
        if let Some(key) = self.find(kid).await? {
            return Ok(key);
        }
        // An unknown key id: the provider may have rotated its keys. Fetch
        // again, once per REFETCH_AFTER however many tokens ask.
        let _one = self.refetch.lock().await;
        let stale = self
            .keys
            .read()
            .await
            .1
            .is_none_or(|at| at.elapsed() >= REFETCH_AFTER);
        if stale {
            match self.fetch().await {
                Ok(set) => *self.keys.write().await = (set, Some(Instant::now())),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the JWKS");
                    // Do not ask again at once.
                    self.keys.write().await.1 = Some(Instant::now());
                    return Err(AuthError::Unavailable(
                        "the identity provider's keys cannot be read now; retry".into(),
                    ));
                }
            }
        }
        self.find(kid)
            .await?
            .ok_or_else(|| refused("the token's signing key is not one of the identity provider's"))
    }

    async fn find(&self, kid: Option<&str>) -> Result<Option<DecodingKey>, AuthError> {
        let keys = self.keys.read().await;
        let jwk = match kid {
            Some(kid) => keys.0.find(kid),
            None if keys.0.keys.len() == 1 => keys.0.keys.first(),
            None => None,
        };
        jwk.map(DecodingKey::from_jwk).transpose().map_err(|_| {
            AuthError::Unauthenticated("the identity provider's key is unusable".into())
        })
    }

    /// The principal `token` proves.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let refused = |why: String| AuthError::Unauthenticated(why);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| refused("malformed bearer token".into()))?;
        let key = self.key(header.alg, header.kid.as_deref()).await?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        // jsonwebtoken compares `iss` and `aud` only when a token has them:
        // a configured one must therefore also be required, or a token
        // without it (one minted for another client) would pass.
        let mut required = vec!["exp", "sub"];
        match &self.config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                refused(match e.kind() {
                    K::ExpiredSignature => "the token has expired".into(),
                    K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
                    K::InvalidAudience => "the token is for another audience".into(),
                    K::InvalidIssuer => "the token is from another issuer".into(),
                    K::InvalidSignature => "the token's signature does not verify".into(),
                    K::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
                    _ => "the token is not valid".into(),
                })
            })?
            .claims;
        self.principal(&claims)
    }

    fn principal(&self, claims: &Value) -> Result<Principal, AuthError> {
        let text = |name: &str| claims.get(name).and_then(Value::as_str);
        let sub = text("sub")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::Unauthenticated("the token has no sub claim".into()))?;
        // The configured issuer where there is one: then every token of
        // one person names the same subject.
        let issuer = self
            .config
            .issuer
            .as_deref()
            .or_else(|| text("iss"))
            .unwrap_or_default();
        let roles = match claim(claims, &self.config.roles_claim) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .filter_map(Role::parse)
                .collect(),
            Some(Value::String(names)) => {
                names.split_whitespace().filter_map(Role::parse).collect()
            }
            _ => super::Roles::default(),
        };
        let tenant = match claim(claims, &self.config.tenant_claim) {
            Some(Value::String(t)) if !t.is_empty() && t.len() <= 100 => t.clone(),
            None | Some(Value::Null) => "default".into(),
            Some(_) => {
                return Err(AuthError::Unauthenticated(
                    "the token's tenant claim is not a short string".into(),
                ))
            }
        };
        let name = text("name")
            .or_else(|| text("preferred_username"))
            .unwrap_or(sub);
        Ok(Principal {
            subject: format!("jwt:{issuer}#{sub}"),
            name: name.chars().take(200).collect(),
            tenant,
            roles,
            method: Method::Jwt,
        })
    }
}

/// The claim at a dotted `path` (`realm_access.roles`).
fn claim<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(claims, |value, part| value.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier(audience: Option<&str>, roles_claim: &str) -> JwtVerifier {
        JwtVerifier::new(JwtConfig {
            issuer: Some("https://id.example".into()),
            audience: audience.map(Into::into),
            jwks: None,
            hs256_secret: Some(SECRET.to_vec()),
            roles_claim: roles_claim.into(),
            tenant_claim: "tenant".into(),
        })
        .unwrap()
    }

    fn token(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    #[tokio::test]
    async fn a_valid_token_names_its_principal_with_nested_roles() {
        let v = verifier(Some("agentledger"), "realm_access.roles");
        let t = token(
            json!({"sub": "u-1", "iss": "https://id.example", "aud": "agentledger",
                   "exp": now() + 300, "preferred_username": "김민수",
                   "realm_access": {"roles": ["operator", "offline_access"]}, "tenant": "acme"}),
            SECRET,
        );
        let p = v.verify(&t).await.unwrap();
        assert_eq!(p.subject, "jwt:https://id.example#u-1");
        assert_eq!(p.name, "김민수");
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.roles.names(), vec!["operator"]);
    }

    #[tokio::test]
    async fn expired_foreign_and_forged_tokens_are_refused() {
        let v = verifier(Some("agentledger"), "roles");
        let base = json!({"sub": "u-1", "iss": "https://id.example", "aud": "agentledger",
                          "exp": now() + 300, "roles": ["viewer"]});
        let with = |k: &str, val: Value| {
            let mut c = base.clone();
            c[k] = val;
            c
        };
        let cases = [
            (token(with("exp", json!(now() - 120)), SECRET), "expired"),
            (
                token(with("nbf", json!(now() + 600)), SECRET),
                "not valid yet",
            ),
            (token(with("aud", json!("another")), SECRET), "audience"),
            (
                token(with("iss", json!("https://evil.example")), SECRET),
                "issuer",
            ),
            (
                token(base.clone(), b"another secret of at least 32 bytes!"),
                "signature",
            ),
        ];
        for (t, why) in cases {
            let refused = v.verify(&t).await.unwrap_err();
            assert!(refused.to_string().contains(why), "{why}: {refused}");
        }
        // A token without the configured audience or issuer is refused too.
        for missing in ["aud", "iss"] {
            let mut c = base.clone();
            c.as_object_mut().unwrap().remove(missing);
            let refused = v.verify(&token(c, SECRET)).await.unwrap_err();
            assert!(
                refused.to_string().contains(missing),
                "{missing}: {refused}"
            );
        }
        // Within the leeway an expired token still passes.
        assert!(v
            .verify(&token(with("exp", json!(now() - 30)), SECRET))
            .await
            .is_ok());
    }

    #[test]
    fn jwks_urls_must_be_https_except_on_loopback() {
        assert!(matches!(
            JwksSource::parse("https://id/keys"),
            Ok(JwksSource::Url(_))
        ));
        assert!(matches!(
            JwksSource::parse("http://127.0.0.1:9/k"),
            Ok(JwksSource::Url(_))
        ));
        assert!(JwksSource::parse("http://id.example/keys").is_err());
        assert!(matches!(
            JwksSource::parse("/etc/jwks.json"),
            Ok(JwksSource::File(_))
        ));
    }
}
