//! Database URLs with libpq's TLS options, and the connector every
//! connection of the store (pool, writer lanes, tailer and its `LISTEN`,
//! projection leases, migrations) is made with.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and nothing of
//! certificates; libpq's `verify-ca`, `verify-full`, `sslrootcert`,
//! `sslcert` and `sslkey` are taken out of the URL here and turned into a
//! rustls client configuration:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! | --- | --- | --- |
//! | absent, `disable` | no | — |
//! | `allow`, `prefer` | if the server offers TLS | no |
//! | `require` | yes | only against `sslrootcert` if one is given (libpq does the same) |
//! | `verify-ca` | yes | chain to `sslrootcert` |
//! | `verify-full` | yes | chain to `sslrootcert` and the host name |
//!
//! Unlike libpq, a URL without `sslmode` does not try TLS: an unverified
//! attempt protects against nobody who can intercept, and a silent change
//! of what the URL meant would be worse. `sslrootcert=system` trusts the
//! operating system's roots; without `sslrootcert`, the `verify-*` modes
//! use `~/.postgresql/root.crt` as libpq does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// The keys taken out of a URL before tokio-postgres parses the rest.
const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

/// How a connection is protected: libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(bad(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    /// Whether the server's certificate is checked against a trusted root.
    pub fn verifies(self) -> bool {
        matches!(self, Self::VerifyCa | Self::VerifyFull)
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        })
    }
}

/// The TLS part of a URL, as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TlsOptions {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsOptions {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            _ => return false,
        };
        *slot = Some(value);
        true
    }

    fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        TLS_KEYS
            .into_iter()
            .zip([&self.mode, &self.root_cert, &self.cert, &self.key])
            .filter_map(|(key, value)| value.as_deref().map(|v| (key, v)))
    }
}

/// A parsed database URL: what tokio-postgres connects to and the TLS
/// connector that protects it. Cheap to clone.
#[derive(Clone)]
pub struct DatabaseUrl {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    mode: TlsMode,
    options: TlsOptions,
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config's own Debug hides the password.
        f.debug_struct("DatabaseUrl")
            .field("config", &self.config)
            .field("tls", &self.mode)
            .finish()
    }
}

/// The stream type of every connection the store makes.
pub type TlsStream = <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
/// A connection future to drive (spawn it, or poll it for notifications).
pub type Connection = tokio_postgres::Connection<Socket, TlsStream>;

impl DatabaseUrl {
    /// Parses a `postgres://` URL or a `key=value` connection string and
    /// loads the certificates it names. Errors never contain the password.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let (rest, options) = split_tls_options(url)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(format!("database URL: {e}")))?;
        let mode = match options.mode.as_deref() {
            None => TlsMode::Disable,
            Some(mode) => TlsMode::parse(mode)?,
        };
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        });
        let tls = MakeRustlsConnect::new(client_config(mode, &options)?);
        Ok(Self {
            config,
            tls,
            mode,
            options,
        })
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    pub fn tls_mode(&self) -> TlsMode {
        self.mode
    }

    /// The connector, for pools that make their own connections.
    pub fn connector(&self) -> MakeRustlsConnect {
        self.tls.clone()
    }

    /// Opens one connection; the caller drives the returned future.
    pub async fn connect(&self) -> Result<(Client, Connection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    /// Opens one connection and drives it in the background.
    pub async fn connect_spawned(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.connect().await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection closed with an error");
            }
        });
        Ok(client)
    }

    /// The TLS options as `key=value` pairs (quoted), to carry them over
    /// to a connection string for another database on the same server.
    pub fn tls_pairs(&self) -> Vec<String> {
        self.options
            .pairs()
            .map(|(key, value)| format!("{key}={}", quote(value)))
            .collect()
    }
}

impl FromStr for DatabaseUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        Self::parse(url)
    }
}

fn bad(message: String) -> StoreError {
    StoreError::BadInput(message)
}

/// A value quoted for a `key=value` connection string.
pub(crate) fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Takes the TLS keys out of `url` and returns the rest, in the same form.
fn split_tls_options(url: &str) -> Result<(String, TlsOptions), StoreError> {
    let mut options = TlsOptions::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), options));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| bad(format!("database URL: {key} is not UTF-8")))?;
            if !options.take(key, value.into_owned()) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, options));
    }
    let mut kept = Vec::new();
    for (key, value) in key_value_pairs(url)? {
        if !options.take(&key, value.clone()) {
            kept.push(format!("{key}={}", quote(&value)));
        }
    }
    Ok((kept.join(" "), options))
}

/// Splits a libpq `key=value` string: values may be single-quoted, with
/// `\'` and `\\` escapes; spaces around `=` are allowed.
fn key_value_pairs(s: &str) -> Result<Vec<(String, String)>, StoreError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(bad(format!("connection string: `{key}` has no value")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        return Err(bad(format!(
                            "connection string: `{key}` has an unterminated quote"
                        )))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(mode: TlsMode, options: &TlsOptions) -> Result<ClientConfig, StoreError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS: {e}")))?;
    let roots = match (mode, options.root_cert.as_deref()) {
        (TlsMode::Disable | TlsMode::Prefer, _) | (TlsMode::Require, None) => None,
        (_, Some(root)) => Some(load_roots(root)?),
        (_, None) => {
            let default = home_root_cert()
                .filter(|path| path.exists())
                .ok_or_else(|| {
                    bad(format!(
                        "sslmode={mode} needs the certificate of a trusted root: \
                     sslrootcert=FILE (PEM) or sslrootcert=system"
                    ))
                })?;
            Some(load_roots(&default.display().to_string())?)
        }
    };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(Unverified(provider)),
        Some(roots) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(format!("sslrootcert: {e}")))?;
            if mode == TlsMode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (options.cert.as_deref(), options.key.as_deref()) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| bad(format!("sslcert {cert}: {e}")))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| bad(format!("sslkey {key}: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(format!("sslcert/sslkey: {e}")))
        }
        _ => Err(bad("sslcert and sslkey go together".to_string())),
    }
}

fn home_root_cert() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".postgresql/root.crt"))
}

fn load_roots(root: &str) -> Result<RootCertStore, StoreError> {
    let mut store = RootCertStore::empty();
    if root == "system" {
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A system store may hold certificates rustls cannot use; skip those.
            let _ = store.add(cert);
        }
    } else {
        let certs = CertificateDer::pem_file_iter(root)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
        for cert in certs {
            store
                .add(cert)
                .map_err(|e| bad(format!("sslrootcert {root}: {e}")))?;
        }
    }
    if store.is_empty() {
        return Err(bad(format!("sslrootcert {root}: no certificate in it")));
    }
    Ok(store)
}

/// `require` and `prefer` without a root: the channel is encrypted and the
/// handshake's signatures are checked, but anyone may present a
/// certificate. libpq behaves the same.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name on the
/// certificate is not compared with the host.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain before the name, so a name error means
        // the chain was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_tls_keys_and_keep_the_rest() {
        let (rest, options) = split_tls_options(
            "postgres://u:p%40ss@db.example:5433/ledger?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p%40ss@db.example:5433/ledger?application_name=x"
        );
        assert_eq!(options.mode.as_deref(), Some("verify-full"));
        assert_eq!(options.root_cert.as_deref(), Some("/etc/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"p@ss"[..]));
    }

    #[test]
    fn key_value_strings_are_split_with_quotes_and_escapes() {
        let (rest, options) = split_tls_options(
            "host=localhost  user = 'o\\'neil' sslmode=require sslrootcert='/a b/ca.pem' dbname=x",
        )
        .unwrap();
        assert_eq!(rest, "host='localhost' user='o\\'neil' dbname='x'");
        assert_eq!(options.mode.as_deref(), Some("require"));
        assert_eq!(options.root_cert.as_deref(), Some("/a b/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_user(), Some("o'neil"));
        assert!(split_tls_options("host='open").is_err());
        assert!(split_tls_options("host").is_err());
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_enforces() {
        let url = |q: &str| DatabaseUrl::parse(&format!("postgres://u@h/d{q}"));
        assert_eq!(url("").unwrap().config().get_ssl_mode(), SslMode::Disable);
        assert_eq!(
            url("?sslmode=prefer").unwrap().config().get_ssl_mode(),
            SslMode::Prefer
        );
        assert_eq!(
            url("?sslmode=require").unwrap().config().get_ssl_mode(),
            SslMode::Require
        );
        let error = url("?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");
        let error = url("?sslmode=sometimes").unwrap_err();
        assert!(error.to_string().contains("sometimes"), "{error}");
        let error = url("?sslmode=require&sslcert=/c.pem").unwrap_err();
        assert!(error.to_string().contains("together"), "{error}");
    }

    #[test]
    fn parse_errors_do_not_show_the_password() {
        let error = DatabaseUrl::parse("postgres://u:hunter2@h:notaport/d").unwrap_err();
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let url = DatabaseUrl::parse("postgres://u:hunter2@h/d?sslmode=require").unwrap();
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
