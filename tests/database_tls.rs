//! TLS to PostgreSQL: a private cluster that accepts TLS connections only
//! (`hostnossl … reject`), with a certificate from a CA this test makes.
//! A whole `agentledger serve` runs a workflow on it with
//! `sslmode=verify-full` (pool, writer lanes, tailer and its `LISTEN`,
//! projection leases, migrations: every connection must be encrypted or it
//! is refused), and the modes refuse what they should.

mod common;

use std::process::Command;
use std::time::Duration;

use agentledger_eventstore::postgres::DatabaseUrl;
use common::{post, Server};
use futures::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A certificate authority and a server certificate it signed.
struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key_pem: String,
}

fn authority(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (params.self_signed(&key).unwrap(), key)
}

fn pki() -> Pki {
    let (ca, ca_key) = authority("agentledger test CA");
    // The name is `localhost` only: 127.0.0.1 is not on the certificate.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = params.signed_by(&key, &ca, &ca_key).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: server.pem(),
        server_key_pem: key.serialize_pem(),
    }
}

/// A private cluster that accepts TLS connections only, with `pki`'s
/// server certificate.
struct Cluster(common::cluster::Cluster);

impl Cluster {
    /// `None` (with the reason printed) when no PostgreSQL server binaries
    /// are installed on this machine.
    fn start(pki: &Pki) -> Option<Self> {
        common::cluster::Cluster::start_with(|dir| {
            std::fs::write(dir.join("server.crt"), &pki.server_pem).unwrap();
            std::fs::write(dir.join("server.key"), &pki.server_key_pem).unwrap();
            std::fs::write(dir.join("ca.crt"), &pki.ca_pem).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("server.key"), PermissionsExt::from_mode(0o600))
                .unwrap();
            common::cluster::Setup {
                conf: format!(
                    "ssl = on\nssl_cert_file = '{dir}/server.crt'\n\
                     ssl_key_file = '{dir}/server.key'\nfsync = off\n",
                    dir = dir.display()
                ),
                hba: Some(
                    "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
                     hostnossl all all 0.0.0.0/0 reject\n"
                        .into(),
                ),
            }
        })
        .map(Self)
    }

    fn url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres{query}",
            self.0.port()
        )
    }

    fn file(&self, name: &str) -> String {
        self.0.dir().join(name).display().to_string()
    }
}

async fn try_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let url = DatabaseUrl::parse(url).map_err(|e| e.to_string())?;
    url.connect_spawned().await.map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })
}

/// Follows `workflowProgress` until the workflow's state is final.
async fn final_state(base: &str, id: &str) -> String {
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(json!({"type": "connection_init"})))
        .await
        .unwrap();
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription($id: ID!) { workflowProgress(id: $id) { state } }",
        "variables": {"id": id}}});
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("progress within 30 s")
            .expect("socket open")
            .unwrap();
        if let Message::Text(text) = message {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["type"] != "error" && v["type"] != "complete", "{v}");
            assert!(v["payload"]["errors"].is_null(), "{v}");
            if v["type"] == "connection_ack" {
                ws.send(send(subscribe.clone())).await.unwrap();
            }
            if let Some(state) = v["payload"]["data"]["workflowProgress"]["state"].as_str() {
                if matches!(state, "COMPLETED" | "FAILED" | "REJECTED" | "CANCELLED") {
                    return state.to_string();
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_is_encrypted_and_verified_with_verify_full() {
    let pki = pki();
    let Some(cluster) = Cluster::start(&pki) else {
        eprintln!("SKIPPED: no PostgreSQL server binaries under /usr/lib/postgresql");
        return;
    };
    let ca = cluster.file("ca.crt");
    let verify_full = cluster.url(
        "localhost",
        &format!("?sslmode=verify-full&sslrootcert={ca}&application_name=agentledger-tls"),
    );

    // The cluster refuses plain connections, so the service can only work
    // if every one of its connections is TLS.
    let plain = try_connect(&cluster.url("127.0.0.1", ""))
        .await
        .unwrap_err();
    assert!(
        plain.contains("no encryption") || plain.contains("pg_hba"),
        "{plain}"
    );

    let server = Server::start(&[("DATABASE_URL", verify_full.as_str()), ("RUST_LOG", "warn")]);
    let (status, body) = post(
        &server.base,
        None,
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &json!({"r": "Count the words of this line, then summarise it."}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(final_state(&server.base, &id).await, "COMPLETED");

    // Every client connection the service holds is TLS (the refusal above
    // says the same; this names them).
    let owner = try_connect(&verify_full).await.unwrap();
    let rows = owner
        .query(
            "SELECT s.ssl, count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.backend_type = 'client backend' AND a.application_name = 'agentledger-tls' \
             AND a.pid <> pg_backend_pid() GROUP BY s.ssl",
            &[],
        )
        .await
        .unwrap();
    let count = |ssl: bool| {
        rows.iter()
            .find(|r| r.get::<_, bool>(0) == ssl)
            .map_or(0, |r| r.get::<_, i64>(1))
    };
    assert_eq!(count(false), 0);
    // The pool, the writer lanes, the tailer's LISTEN, the checkpoint
    // listener and the projection leases at least.
    assert!(count(true) >= 5, "{} TLS connections", count(true));
    drop(server);

    // verify-full checks the name: 127.0.0.1 is not on the certificate.
    let wrong_name = try_connect(&cluster.url(
        "127.0.0.1",
        &format!("?sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .unwrap_err();
    assert!(wrong_name.contains("certificate"), "{wrong_name}");
    // verify-ca checks only the chain.
    try_connect(&cluster.url("127.0.0.1", &format!("?sslmode=verify-ca&sslrootcert={ca}")))
        .await
        .unwrap();
    // A certificate from another authority is refused by both.
    let (other, _) = authority("someone else's CA");
    let other_ca = cluster.file("other-ca.crt");
    std::fs::write(&other_ca, other.pem()).unwrap();
    for mode in ["verify-ca", "verify-full"] {
        let refused = try_connect(&cluster.url(
            "localhost",
            &format!("?sslmode={mode}&sslrootcert={other_ca}"),
        ))
        .await
        .unwrap_err();
        assert!(refused.contains("certificate"), "{mode}: {refused}");
    }
    // require encrypts without checking who answers (as libpq does)…
    try_connect(&cluster.url("127.0.0.1", "?sslmode=require"))
        .await
        .unwrap();
    // …unless a root is named, then it checks the chain.
    let refused = try_connect(&cluster.url(
        "localhost",
        &format!("?sslmode=require&sslrootcert={other_ca}"),
    ))
    .await
    .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    // The key=value form carries the same options.
    try_connect(&format!(
        "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert='{ca}'",
        cluster.0.port()
    ))
    .await
    .unwrap();
}

#[test]
fn serve_names_a_bad_tls_option_and_writes_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_agentledger"))
        .args(["migrate"])
        .env(
            "DATABASE_URL",
            "postgres://postgres:s3cret-pw@127.0.0.1:5432/postgres?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}
