//! End-to-end: who may do what, against a real `agentledger serve` with
//! authentication required, on real PostgreSQL, with keys made by the real
//! `agentledger apikey` command and HS256 tokens.
//!
//! The matrix takes every root field from the schema itself (a new field
//! without a sample here fails) and tries each with no credential, a wrong
//! role, the right role (API key and JWT), an expired JWT, a JWT for another
//! audience, a JWT with a bad signature, a revoked key and a key of another
//! tenant; every refusal gets its code and writes nothing.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use agentledger_eventstore::testing::TestDatabase;
use common::{agentledger, code, count_events, create_key, post, Server, TempFile};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ISSUER: &str = "https://id.agentledger.test";
const AUDIENCE: &str = "agentledger";
/// The database password in the service's URLs (never to be logged).
const DATABASE_PASSWORD: &str = "db-password-3f9c2e7a41d8b6059e1f";
const JWT_SECRET: &str = "a shared secret of more than thirty-two bytes, for tests";
/// Requests Lubit escalates to a person, and one that completes.
const ESCALATES: &str = "Delete the old notes.";
const COMPLETES: &str = "Count the words of this note. Then summarise it.";

/// A server requiring credentials, its database, and the secrets of its keys.
struct Deployment {
    db: TestDatabase,
    server: Server,
    keys: BTreeMap<String, String>,
    _secret_file: TempFile,
}

async fn deploy(extra_env: &[(&str, &str)], log: Option<std::fs::File>) -> Deployment {
    let db = TestDatabase::create().await;
    let mut keys = BTreeMap::new();
    for role in [
        "viewer",
        "submitter",
        "operator",
        "auditor",
        "admin",
        "agent",
    ] {
        keys.insert(role.to_string(), create_key(&db, role, &[role], "default"));
        let other = format!("other-{role}");
        keys.insert(other.clone(), create_key(&db, &other, &[role], "other"));
    }
    let everything = ["viewer", "submitter", "operator", "auditor", "admin"];
    keys.insert(
        "revoked".into(),
        create_key(&db, "revoked", &everything, "default"),
    );
    let out = agentledger(&["apikey", "revoke", "revoked"], db.admin_url());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret_file =
        TempFile(std::env::temp_dir().join(format!("agentledger-jwt-{}", uuid::Uuid::new_v4())));
    std::fs::write(&secret_file.0, JWT_SECRET).unwrap();
    // Trust authentication ignores the passwords; the log test looks for them.
    let with_password = |url: &str| {
        assert!(!url.starts_with("postgres"), "a key=value string: {url}");
        format!("{url} password='{DATABASE_PASSWORD}'")
    };
    let (service, admin) = (
        with_password(&db.service_url()),
        with_password(db.admin_url()),
    );
    let secret_path = secret_file.0.to_string_lossy().to_string();
    let mut env = vec![
        ("DATABASE_URL", service.as_str()),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", admin.as_str()),
        ("AGENTLEDGER_PROFILE", "test"),
        ("AGENTLEDGER_AUTH_MODE", "required"),
        (
            "AGENTLEDGER_AUTH_JWT_HS256_SECRET_FILE",
            secret_path.as_str(),
        ),
        ("AGENTLEDGER_AUTH_JWT_ISSUER", ISSUER),
        ("AGENTLEDGER_AUTH_JWT_AUDIENCE", AUDIENCE),
        ("RUST_LOG", "warn"),
    ];
    env.extend_from_slice(extra_env);
    let server = match log {
        Some(file) => Server::start_logging(&env, file),
        None => Server::start(&env),
    };
    Deployment {
        db,
        server,
        keys,
        _secret_file: secret_file,
    }
}

/// An HS256 token; `change` edits the standard claims first.
fn jwt(roles: &[&str], change: impl FnOnce(&mut Value), secret: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "u-417", "name": "Kim Minsu",
        "exp": now + 600, "iat": now, "roles": roles,
    });
    change(&mut claims);
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// What a WebSocket subscription attempt came to.
#[derive(Debug, PartialEq)]
enum WsOutcome {
    /// Closed by the server with this code.
    Closed(u16),
    /// The subscription answered an error with this code.
    Error(String),
    /// The subscription sent data.
    Data(Value),
}

/// Opens a graphql-transport-ws connection, authenticating with
/// `credential` in the upgrade header (`in_header`) or in
/// `connection_init`, and subscribes with `query`.
async fn subscribe(
    base: &str,
    credential: Option<&str>,
    in_header: bool,
    query: &str,
    variables: &Value,
) -> WsOutcome {
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    if let (Some(c), true) = (credential, in_header) {
        headers.insert("authorization", format!("Bearer {c}").parse().unwrap());
    }
    let (mut ws, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(ws) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            return WsOutcome::Closed(response.status().as_u16())
        }
        Err(e) => panic!("WebSocket: {e}"),
    };
    let payload = match (credential, in_header) {
        (Some(c), false) => json!({ "Authorization": format!("Bearer {c}") }),
        _ => json!({}),
    };
    let send = |v: Value| Message::Text(v.to_string().into());
    ws.send(send(
        json!({ "type": "connection_init", "payload": payload }),
    ))
    .await
    .unwrap();
    let mut subscribed = false;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an answer within 20 s");
        let message = match message {
            Some(Ok(m)) => m,
            other => panic!("connection ended without a close frame: {other:?}"),
        };
        match message {
            Message::Close(frame) => return WsOutcome::Closed(frame.map_or(0, |f| f.code.into())),
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).unwrap();
                match v["type"].as_str() {
                    Some("connection_ack") if !subscribed => {
                        subscribed = true;
                        ws.send(send(json!({"id": "1", "type": "subscribe",
                            "payload": {"query": query, "variables": variables}})))
                            .await
                            .unwrap();
                    }
                    Some("next") => {
                        if let Some(c) = v["payload"]["errors"][0]["extensions"]["code"].as_str() {
                            return WsOutcome::Error(c.to_string());
                        }
                        return WsOutcome::Data(v["payload"]["data"].clone());
                    }
                    Some("error") => {
                        let c = v["payload"][0]["extensions"]["code"].as_str().unwrap_or("");
                        return WsOutcome::Error(c.to_string());
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Who sees another tenant's thing how.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tenancy {
    /// Another tenant's workflow: NOT_FOUND (or null), never FORBIDDEN.
    Hidden,
    /// A list: another tenant's workflows are not in it.
    Filtered,
    /// Whole-ledger or the caller's own: works the same for any tenant.
    Whole,
}

struct Sample {
    query: &'static str,
    /// Which setup workflow `$id` names.
    target: Option<Target>,
    right: &'static str,
    wrong: Option<&'static str>,
    tenancy: Tenancy,
}

#[derive(Clone, Copy, Debug)]
enum Target {
    Completed,
    ToCancel,
    ToDecide,
    /// A task id naming the completed workflow (no such task is open).
    Task,
}

/// A call of every root field, with who may and may not make it.
fn samples() -> BTreeMap<&'static str, Sample> {
    use Target::*;
    use Tenancy::*;
    let s = |query, target, right, wrong, tenancy| Sample {
        query,
        target,
        right,
        wrong,
        tenancy,
    };
    BTreeMap::from([
        ("Query.me", s("{ me { subject } }", None, "agent", None, Whole)),
        ("Query.workflow", s("query($id: ID!) { workflow(id: $id) { id } }", Some(Completed), "viewer", Some("agent"), Hidden)),
        ("Query.workflows", s("{ workflows(first: 50) { edges { node { id } } } }", None, "viewer", Some("agent"), Filtered)),
        ("Query.workflowCounts", s("{ workflowCounts { state count } }", None, "viewer", Some("agent"), Whole)),
        ("Query.projectionLag", s("{ projectionLag { projection behindEvents } }", None, "viewer", Some("agent"), Whole)),
        ("Query.events", s("{ events(first: 100) { streamId } }", None, "viewer", Some("agent"), Filtered)),
        ("Query.agentMetrics", s("{ agentMetrics { agent } }", None, "viewer", Some("agent"), Whole)),
        ("Query.auditTrail", s("{ auditTrail(first: 100) { edges { node { workflowId } } } }", None, "auditor", Some("viewer"), Filtered)),
        ("Query.replay", s("query($id: ID!) { replay(workflowId: $id) { position } }", Some(Completed), "auditor", Some("submitter"), Hidden)),
        ("Query.verifyWorkflow", s("query($id: ID!) { verifyWorkflow(id: $id) { ok } }", Some(Completed), "auditor", Some("operator"), Hidden)),
        ("Query.verifyLedger", s("{ verifyLedger { ok } }", None, "auditor", Some("viewer"), Whole)),
        ("Query.ledgerDigest", s("{ ledgerDigest { position } }", None, "auditor", Some("operator"), Whole)),
        ("Query.ledgerKeys", s("{ ledgerKeys { keyId } }", None, "auditor", Some("submitter"), Whole)),
        ("Query.inclusionProof", s("{ inclusionProof(position: 1, treeSize: 1) { leafIndex } }", None, "auditor", Some("viewer"), Whole)),
        ("Query.workflowReceipt", s("query($id: ID!) { workflowReceipt(id: $id) }", Some(Completed), "auditor", Some("operator"), Hidden)),
        ("Query.consistencyProof", s("{ consistencyProof(fromSize: 1, toSize: 1) { hashes } }", None, "auditor", Some("operator"), Whole)),
        ("Mutation.submitWorkflow", s("mutation { submitWorkflow(request: \"Count the words of this line.\") { id } }", None, "submitter", Some("viewer"), Whole)),
        ("Mutation.cancelWorkflow", s("mutation($id: ID!) { cancelWorkflow(id: $id) { state } }", Some(ToCancel), "submitter", Some("viewer"), Hidden)),
        ("Mutation.decideEscalation", s("mutation($id: ID!) { decideEscalation(id: $id, approve: true, comment: \"checked\") { state } }", Some(ToDecide), "operator", Some("submitter"), Hidden)),
        ("Mutation.forgetSubject", s("mutation { forgetSubject(subjectId: \"nobody\") { destroyed } }", None, "admin", Some("auditor"), Whole)),
        ("Subscription.workflowProgress", s("subscription($id: ID!) { workflowProgress(id: $id) { state } }", Some(Completed), "viewer", Some("agent"), Hidden)),
        ("Subscription.workflowEvents", s("subscription($id: ID) { workflowEvents(workflowId: $id) { position } }", Some(Completed), "viewer", Some("agent"), Hidden)),
        ("Query.agentDecisionSchema", s("{ agentDecisionSchema(role: GATEKEEPER) }", None, "agent", None, Whole)),
        ("Mutation.claimAgentTask", s("mutation { claimAgentTask(role: GATEKEEPER, workerId: \"w-1\") { id } }", None, "agent", Some("operator"), Whole)),
        ("Mutation.renewAgentTask", s("mutation($id: ID!) { renewAgentTask(taskId: $id, workerId: \"w-1\") }", Some(Task), "agent", Some("submitter"), Whole)),
        ("Mutation.failAgentTask", s("mutation($id: ID!) { failAgentTask(taskId: $id, workerId: \"w-1\", error: \"no\") }", Some(Task), "agent", Some("viewer"), Whole)),
        ("Mutation.submitAgentDecision", s("mutation($id: ID!) { submitAgentDecision(taskId: $id, decision: {verdict: \"APPROVE\"}) { id } }", Some(Task), "agent", Some("operator"), Whole)),
        ("Subscription.agentTasks", s("subscription { agentTasks(role: GATEKEEPER) { role } }", None, "agent", Some("viewer"), Whole)),
        ("Mutation.claimToolCall", s("mutation { claimToolCall(tools: [\"crm_lookup\"], workerId: \"w-1\") { id } }", None, "agent", Some("submitter"), Whole)),
        ("Mutation.completeToolCall", s("mutation { completeToolCall(callId: \"6d1e0c59-51c4-4a8e-9f0b-3a2d7c41e5b8\", output: \"x\") }", None, "agent", Some("viewer"), Whole)),
    ])
}

/// What the right role meets where the call gets past access control but
/// has nothing to act on: this server decides every role itself and serves
/// no external tool, and the task or call named does not exist. The external-agent tests cover the rest.
fn right_role_refusals() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        ("Mutation.claimAgentTask", "BAD_INPUT"),
        ("Mutation.renewAgentTask", "CONFLICT"),
        ("Mutation.failAgentTask", "CONFLICT"),
        ("Mutation.submitAgentDecision", "NOT_FOUND"),
        ("Subscription.agentTasks", "BAD_INPUT"),
        ("Mutation.claimToolCall", "BAD_INPUT"),
        ("Mutation.completeToolCall", "CONFLICT"),
    ])
}

/// Every root field of the served schema, as `Type.field`.
fn schema_fields() -> Vec<String> {
    let sdl = agentledger_api::sdl();
    let mut fields = Vec::new();
    for (ty, name) in [
        ("Query", "Query"),
        ("Mutation", "Mutation"),
        ("SubscriptionRoot", "Subscription"),
    ] {
        let start = sdl
            .find(&format!("type {ty} {{"))
            .unwrap_or_else(|| panic!("type {ty}"));
        let body = &sdl[start..start + sdl[start..].find("\n}").unwrap()];
        let mut in_doc = false;
        for line in body.lines().skip(1) {
            let trimmed = line.trim();
            if trimmed.starts_with("\"\"\"") {
                // `"""one line"""` leaves a block as it was; a bare `"""`
                // opens or closes one.
                let one_line = trimmed.len() > 3 && trimmed.ends_with("\"\"\"");
                if !one_line {
                    in_doc = !in_doc;
                }
                continue;
            }
            if in_doc || !line.starts_with('\t') || line.starts_with("\t\t") {
                continue;
            }
            let field: String = line[1..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !field.is_empty() {
                fields.push(format!("{name}.{field}"));
            }
        }
    }
    fields
}

/// Waits until workflow `id` reaches `state`, as `viewer` sees it.
async fn wait_state(base: &str, viewer: &str, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = post(
            base,
            Some(viewer),
            "query($id: ID!) { workflow(id: $id) { state } }",
            &json!({"id": id}),
        )
        .await;
        if body["data"]["workflow"]["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {state}: {body}"
        );
        // The read model is polled: no event reaches this client otherwise.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit_as(base: &str, key: &str, request: &str) -> String {
    let (status, body) = post(
        base,
        Some(key),
        "mutation($r: String!) { submitWorkflow(request: $r) { id } }",
        &json!({"r": request}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_field_refuses_whoever_may_not_call_it_and_writes_nothing() {
    let d = deploy(&[], None).await;
    let base = d.server.base.clone();
    let key = |name: &str| d.keys[name].clone();
    let samples = samples();

    // The schema has no field the matrix does not cover, and the access
    // table has an entry for each.
    let fields = schema_fields();
    assert!(fields.len() >= 23, "{fields:?}");
    for field in &fields {
        assert!(
            samples.contains_key(field.as_str()),
            "{field} has no sample in the matrix: add one"
        );
        let (ty, name) = field.split_once('.').unwrap();
        assert!(
            agentledger_api::auth::access::access_of(ty, name).is_some(),
            "{field} has no access rule"
        );
    }
    assert_eq!(
        fields.len(),
        samples.len(),
        "samples for fields the schema lost: {fields:?}"
    );

    // Three workflows of the default tenant, submitted by `submitter`.
    let completed = submit_as(&base, &key("submitter"), COMPLETES).await;
    let to_cancel = submit_as(&base, &key("submitter"), ESCALATES).await;
    let to_decide = submit_as(&base, &key("submitter"), ESCALATES).await;
    wait_state(&base, &key("viewer"), &completed, "COMPLETED").await;
    wait_state(&base, &key("viewer"), &to_cancel, "AWAITING_HUMAN").await;
    wait_state(&base, &key("viewer"), &to_decide, "AWAITING_HUMAN").await;
    let target = |t: Option<Target>| match t {
        None => json!({}),
        Some(Target::Completed) => json!({"id": completed}),
        Some(Target::ToCancel) => json!({"id": to_cancel}),
        Some(Target::ToDecide) => json!({"id": to_decide}),
        Some(Target::Task) => json!({"id": format!("{completed}:3")}),
    };
    let refusals = right_role_refusals();
    let everything = ["viewer", "submitter", "operator", "auditor", "admin"];
    let expired = jwt(
        &everything,
        |c| c["exp"] = json!(chrono::Utc::now().timestamp() - 3600),
        JWT_SECRET,
    );
    let foreign = jwt(
        &everything,
        |c| c["aud"] = json!("another-service"),
        JWT_SECRET,
    );
    let forged = jwt(
        &everything,
        |_| {},
        "not the server's secret, but just as long as it",
    );
    let audienceless = jwt(
        &everything,
        |c| {
            c.as_object_mut().unwrap().remove("aud");
        },
        JWT_SECRET,
    );
    let unauthenticated: [(&str, Option<String>); 6] = [
        ("JWT without an audience", Some(audienceless)),
        ("no credential", None),
        ("expired JWT", Some(expired)),
        ("JWT for another audience", Some(foreign)),
        ("JWT with a bad signature", Some(forged)),
        ("revoked key", Some(key("revoked"))),
    ];

    // Phase 1: every refusal. Nothing may be written.
    let before = count_events(&d.db).await;
    let mut cases = 0;
    for (i, (field, sample)) in samples.iter().enumerate() {
        let vars = target(sample.target);
        let subscription = field.starts_with("Subscription.");
        for (case, credential) in &unauthenticated {
            cases += 1;
            if subscription {
                let got = subscribe(
                    &base,
                    credential.as_deref(),
                    i % 2 == 0,
                    sample.query,
                    &vars,
                )
                .await;
                // A bad header is refused at the upgrade (HTTP 401); a bad
                // or missing connection_init credential with close 4401.
                assert!(
                    matches!(got, WsOutcome::Closed(4401) | WsOutcome::Closed(401)),
                    "{field}, {case}: {got:?}"
                );
            } else {
                let (status, body) = post(&base, credential.as_deref(), sample.query, &vars).await;
                assert_eq!(
                    (status, code(&body)),
                    (401, Some("UNAUTHENTICATED")),
                    "{field}, {case}: {body}"
                );
            }
        }
        if let Some(wrong) = sample.wrong {
            cases += 1;
            if subscription {
                let got =
                    subscribe(&base, Some(&key(wrong)), i % 2 == 1, sample.query, &vars).await;
                // A credential that may subscribe to nothing is closed at
                // `connection_init`; one that may subscribe to something
                // else is refused this operation.
                assert!(
                    got == WsOutcome::Closed(4403) || got == WsOutcome::Error("FORBIDDEN".into()),
                    "{field} as {wrong}: {got:?}"
                );
            } else {
                let (status, body) = post(&base, Some(&key(wrong)), sample.query, &vars).await;
                assert_eq!(
                    code(&body),
                    Some("FORBIDDEN"),
                    "{field} as {wrong}: {status} {body}"
                );
            }
        }
        if sample.tenancy == Tenancy::Hidden {
            cases += 1;
            let other = key(&format!("other-{}", sample.right));
            if subscription {
                let got = subscribe(&base, Some(&other), true, sample.query, &vars).await;
                assert_eq!(
                    got,
                    WsOutcome::Error("NOT_FOUND".into()),
                    "{field} from another tenant"
                );
            } else {
                let (_, body) = post(&base, Some(&other), sample.query, &vars).await;
                let hidden = code(&body) == Some("NOT_FOUND")
                    || (body["errors"].is_null()
                        && body["data"]
                            .as_object()
                            .unwrap()
                            .values()
                            .all(Value::is_null));
                assert!(hidden, "{field} from another tenant: {body}");
            }
        }
    }
    assert_eq!(
        count_events(&d.db).await,
        before,
        "a refused request wrote events"
    );

    // Phase 2: the right role, by API key (and by JWT for the reads); and
    // other tenants' lists leave this tenant's workflows out.
    let reader = jwt(&everything, |_| {}, JWT_SECRET);
    for (i, (field, sample)) in samples.iter().enumerate() {
        let vars = target(sample.target);
        cases += 1;
        if field.starts_with("Subscription.") {
            let got = subscribe(
                &base,
                Some(&key(sample.right)),
                i % 2 == 0,
                sample.query,
                &vars,
            )
            .await;
            match refusals.get(field) {
                Some(expected) => assert_eq!(
                    got,
                    WsOutcome::Error(expected.to_string()),
                    "{field} as {}",
                    sample.right
                ),
                None => assert!(
                    matches!(got, WsOutcome::Data(_)),
                    "{field} as {}: {got:?}",
                    sample.right
                ),
            }
            continue;
        }
        let (status, body) = post(&base, Some(&key(sample.right)), sample.query, &vars).await;
        if let Some(expected) = refusals.get(field) {
            assert_eq!(
                code(&body),
                Some(*expected),
                "{field} as {}: {status} {body}",
                sample.right
            );
            continue;
        }
        assert!(
            status == 200 && body["errors"].is_null(),
            "{field} as {}: {status} {body}",
            sample.right
        );
        if field.starts_with("Query.") {
            cases += 1;
            let (status, body) = post(&base, Some(&reader), sample.query, &vars).await;
            assert!(
                status == 200 && body["errors"].is_null(),
                "{field} by JWT: {body}"
            );
        }
        if sample.tenancy == Tenancy::Filtered {
            cases += 1;
            let (_, body) = post(
                &base,
                Some(&key(&format!("other-{}", sample.right))),
                sample.query,
                &vars,
            )
            .await;
            assert!(
                body["errors"].is_null(),
                "{field} from another tenant: {body}"
            );
            let text = body.to_string();
            for id in [&completed, &to_cancel, &to_decide] {
                assert!(
                    !text.contains(id.as_str()),
                    "{field} shows another tenant's workflow {id}: {text}"
                );
            }
        }
    }
    println!("access matrix: {} fields, {cases} cases", samples.len());
    assert!(d.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_escalation_is_decided_by_another_person_and_the_ledger_names_them() {
    let d = deploy(&[], None).await;
    let base = d.server.base.clone();
    let both = create_key(&d.db, "Lee Jiwoo", &["submitter", "operator"], "default");
    let id = submit_as(&base, &both, ESCALATES).await;
    wait_state(&base, &d.keys["viewer"], &id, "AWAITING_HUMAN").await;
    let decide = "mutation($id: ID!, $at: Position) {
        decideEscalation(id: $id, approve: true, comment: \"두 번 확인했습니다\", expectedPosition: $at) { state } }";
    let before = count_events(&d.db).await;
    // The submitter may not approve its own request, even as an operator.
    let (_, body) = post(&base, Some(&both), decide, &json!({"id": id})).await;
    assert_eq!(code(&body), Some("FORBIDDEN"), "{body}");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("four eyes"),
        "{body}"
    );
    // A stale view is refused: the decision names what it approves.
    let (_, body) = post(
        &base,
        Some(&d.keys["operator"]),
        decide,
        &json!({"id": id, "at": 1}),
    )
    .await;
    assert_eq!(code(&body), Some("CONFLICT"), "{body}");
    assert_eq!(
        count_events(&d.db).await,
        before,
        "a refused decision wrote events"
    );
    // The workflow as the operator sees it, then the decision on that.
    let (_, seen) = post(
        &base,
        Some(&d.keys["operator"]),
        "query($id: ID!) { workflow(id: $id) { lastPosition } }",
        &json!({"id": id}),
    )
    .await;
    let at = seen["data"]["workflow"]["lastPosition"].clone();
    let (_, body) = post(
        &base,
        Some(&d.keys["operator"]),
        decide,
        &json!({"id": id, "at": at}),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");

    // The stored decision: the operator's key as actor, the gate answered.
    let (_, events) = post(&base, Some(&d.keys["auditor"]), "query($id: ID!) { events(workflowId: $id, first: 100) { position type payload metadata hash } }", &json!({"id": id})).await;
    let events = events["data"]["events"].as_array().unwrap().clone();
    let gate = events
        .iter()
        .rev()
        .find(|e| e["type"] == "GateDecided")
        .unwrap();
    let human = events
        .iter()
        .find(|e| e["type"] == "HumanDecisionRecorded")
        .unwrap();
    let actor = &human["metadata"]["actor"];
    assert_eq!(actor["kind"], "human");
    assert_eq!(actor["name"], "operator");
    assert!(
        actor["subject"].as_str().unwrap().starts_with("apikey:"),
        "{actor}"
    );
    assert_eq!(actor["method"], "api_key");
    assert_eq!(human["payload"]["answers"]["position"], gate["position"]);
    assert_eq!(human["payload"]["answers"]["hash"], gate["hash"]);
    let submitted = &events[0]["metadata"];
    assert_eq!(submitted["actor"]["name"], "Lee Jiwoo");
    assert_ne!(submitted["owner"], actor["subject"]);

    // The audit trail and the replay name the person.
    let (_, trail) = post(&base, Some(&d.keys["auditor"]), "query($id: ID) { auditTrail(workflowId: $id, kind: \"human.approve\") { edges { node { actor } } } }", &json!({"id": id})).await;
    assert_eq!(
        trail["data"]["auditTrail"]["edges"][0]["node"]["actor"], "operator",
        "{trail}"
    );
    let (_, replay) = post(
        &base,
        Some(&d.keys["auditor"]),
        "query($id: ID!) { replay(workflowId: $id) { actor event { type } } }",
        &json!({"id": id}),
    )
    .await;
    let step = replay["data"]["replay"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["event"]["type"] == "HumanDecisionRecorded")
        .cloned()
        .unwrap();
    assert_eq!(step["actor"], "operator");
    assert!(d.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_see_only_their_own_workflows_events_and_subscriptions() {
    let d = deploy(&[], None).await;
    let base = d.server.base.clone();
    let ours = submit_as(&base, &d.keys["submitter"], COMPLETES).await;
    let theirs = submit_as(&base, &d.keys["other-submitter"], COMPLETES).await;
    wait_state(&base, &d.keys["viewer"], &ours, "COMPLETED").await;
    wait_state(&base, &d.keys["other-viewer"], &theirs, "COMPLETED").await;
    // The dashboard's counts are each tenant's own: one completed workflow
    // each, though the ledger holds two.
    for viewer in ["viewer", "other-viewer"] {
        let (_, body) = post(
            &base,
            Some(&d.keys[viewer]),
            "{ workflowCounts { state count } }",
            &json!({}),
        )
        .await;
        let counts = body["data"]["workflowCounts"].as_array().unwrap();
        assert_eq!(counts.len(), 11, "every state listed: {body}");
        let total: i64 = counts.iter().map(|c| c["count"].as_i64().unwrap()).sum();
        assert_eq!(total, 1, "{viewer} counts only its tenant's: {body}");
    }
    // Each tenant's whole-ledger feed from the first position: its own
    // workflow's events and nothing of the other's.
    for (viewer, own, foreign) in [("viewer", &ours, &theirs), ("other-viewer", &theirs, &ours)] {
        let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let send = |v: Value| Message::Text(v.to_string().into());
        ws.send(send(
            json!({"type": "connection_init", "payload": {"X-API-Key": d.keys[viewer]}}),
        ))
        .await
        .unwrap();
        ws.send(send(
            json!({"id": "all", "type": "subscribe", "payload": {"query":
            "subscription { workflowEvents(fromPosition: 1) { streamId type } }"}}),
        ))
        .await
        .unwrap();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|(s, t): &(String, String)| s.ends_with(own.as_str()) && t == "WorkflowCompleted")
        {
            let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .expect("events")
                .unwrap()
                .unwrap();
            if let Message::Text(text) = m {
                let v: Value = serde_json::from_str(&text).unwrap();
                if v["type"] == "next" {
                    let e = &v["payload"]["data"]["workflowEvents"];
                    seen.push((
                        e["streamId"].as_str().unwrap().to_string(),
                        e["type"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        assert!(
            seen.iter().all(|(s, _)| !s.ends_with(foreign.as_str())),
            "{viewer} saw {foreign}: {seen:?}"
        );
        // And the reads: the other tenant's workflow does not exist.
        let (_, body) = post(
            &base,
            Some(&d.keys[viewer]),
            "query($id: ID!) { workflow(id: $id) { id } }",
            &json!({"id": foreign}),
        )
        .await;
        assert!(body["data"]["workflow"].is_null(), "{body}");
        let (_, body) = post(
            &base,
            Some(&d.keys[viewer]),
            "{ workflows { edges { node { id } } } }",
            &json!({}),
        )
        .await;
        assert!(!body.to_string().contains(foreign.as_str()), "{body}");
        assert!(body.to_string().contains(own.as_str()), "{body}");
    }
    // Agent metrics are per tenant: once each tenant sees Sena's analysis
    // of its own workflow, neither sees the other's.
    let sena = |body: &Value| {
        body["data"]["agentMetrics"]
            .as_array()
            .and_then(|agents| agents.iter().find(|a| a["agent"] == "sena"))
            .map_or(0, |a| a["decisions"].as_i64().unwrap())
    };
    let metrics = "{ agentMetrics { agent decisions } }";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ours) = post(&base, Some(&d.keys["viewer"]), metrics, &json!({})).await;
        let (_, theirs) = post(&base, Some(&d.keys["other-viewer"]), metrics, &json!({})).await;
        if sena(&ours) >= 1 && sena(&theirs) >= 1 {
            assert_eq!((sena(&ours), sena(&theirs)), (1, 1), "{ours} {theirs}");
            break;
        }
        assert!(Instant::now() < deadline, "{ours} {theirs}");
        // The metrics projection is polled: no event reaches this client.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Data subjects are per tenant too: another tenant's admin forgetting a
    // subject of the same name destroys nothing of this tenant's.
    let submit = "mutation { submitWorkflow(request: \"Count the words of alice's note.\", subjectId: \"alice\") { id } }";
    let (_, body) = post(&base, Some(&d.keys["submitter"]), submit, &json!({})).await;
    let sealed = body["data"]["submitWorkflow"]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string();
    let forget = "mutation { forgetSubject(subjectId: \"alice\") { destroyed } }";
    let (_, body) = post(&base, Some(&d.keys["other-admin"]), forget, &json!({})).await;
    assert_eq!(body["data"]["forgetSubject"]["destroyed"], false, "{body}");
    let read = "query($id: ID!) { workflow(id: $id) { request } }";
    let (_, body) = post(&base, Some(&d.keys["viewer"]), read, &json!({"id": sealed})).await;
    assert_eq!(
        body["data"]["workflow"]["request"], "Count the words of alice's note.",
        "{body}"
    );
    let (_, body) = post(&base, Some(&d.keys["admin"]), forget, &json!({})).await;
    assert_eq!(body["data"]["forgetSubject"]["destroyed"], true, "{body}");
    assert!(d.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_key_is_refused_within_two_seconds_and_secrets_stay_out_of_the_log() {
    let log_path = std::env::temp_dir().join(format!("agentledger-log-{}", uuid::Uuid::new_v4()));
    let log = std::fs::File::create(&log_path).unwrap();
    let d = deploy(&[("RUST_LOG", "debug")], Some(log)).await;
    let base = d.server.base.clone();
    let temporary = create_key(&d.db, "temporary", &["viewer"], "default");
    let me = "{ me { name tenant roles method } }";
    let (status, body) = post(&base, Some(&temporary), me, &json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["data"]["me"],
        json!({"name": "temporary", "tenant": "default", "roles": ["viewer"], "method": "api_key"})
    );
    let token = jwt(&["viewer"], |_| {}, JWT_SECRET);
    let (_, body) = post(&base, Some(&token), me, &json!({})).await;
    assert_eq!(body["data"]["me"]["name"], "Kim Minsu", "{body}");
    // Bad credentials are logged about too, by the server: not their text.
    let wrong = format!("{}x", &temporary[..temporary.len() - 1]);
    post(&base, Some(&wrong), me, &json!({})).await;

    // A socket opened with the key before it is revoked.
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "graphql-transport-ws".parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let init = json!({"type": "connection_init", "payload": {"X-API-Key": temporary}});
    ws.send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    let follow = json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { workflowEvents { position } }"}});
    ws.send(Message::Text(follow.to_string().into()))
        .await
        .unwrap();

    let out = agentledger(&["apikey", "revoke", "temporary"], d.db.admin_url());
    assert!(out.status.success());
    let revoked = Instant::now();
    loop {
        let (status, _) = post(&base, Some(&temporary), me, &json!({})).await;
        if status == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "the revoked key still works after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("revoked key refused after {:?}", revoked.elapsed());
    // ... and the socket it opened is closed, with 4401.
    let closed = loop {
        let m = tokio::time::timeout(Duration::from_secs(3), ws.next())
            .await
            .expect("closed within 3 s of the revocation");
        match m {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(closed, Some(4401));
    let took = revoked.elapsed();
    println!("its socket closed after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The ledger records who granted and revoked the key, never its secret.
    let listed = agentledger(&["apikey", "list", "--json"], d.db.admin_url());
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains("\"temporary\"") && !listed.contains(&temporary));
    let client = d.db.admin_client().await;
    let rows = client
        .query("SELECT event_type, payload::text FROM events WHERE stream_id = 'access-api-keys' AND payload->>'name' = 'temporary' ORDER BY global_position", &[])
        .await
        .unwrap();
    let types: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(types, ["ApiKeyCreated", "ApiKeyRevoked"]);
    let secret_part = &temporary[17..];
    assert!(rows
        .iter()
        .all(|r| !r.get::<_, String>(1).contains(secret_part)));

    assert!(d.server.stop().success());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(!log.is_empty(), "the server logged nothing at debug level");
    for secret in d
        .keys
        .values()
        .chain([&temporary, &token, &wrong])
        .map(|s| s.as_str())
        .chain([JWT_SECRET, DATABASE_PASSWORD])
    {
        let tail = &secret[secret.len() - 20..];
        assert!(!log.contains(tail), "a secret is in the server's log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_refuses_to_start_open_or_as_a_privileged_role() {
    let db = TestDatabase::create().await;
    let run = |env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentledger"))
            .args(["serve", "--listen", "127.0.0.1:0", "--profile", "staging"])
            .env_remove("DATABASE_URL")
            .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let (service, admin) = (db.service_url(), db.admin_url().to_string());
    let err = run(&[("DATABASE_URL", &service)]);
    assert!(err.contains("AGENTLEDGER_ADMIN_DATABASE_URL"), "{err}");
    let err = run(&[
        ("DATABASE_URL", &admin),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
    ]);
    assert!(err.contains("superuser"), "{err}");
    let err = run(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
    ]);
    assert!(err.contains("no caller could authenticate"), "{err}");
    let err = run(&[
        ("DATABASE_URL", &service),
        ("AGENTLEDGER_ADMIN_DATABASE_URL", &admin),
        ("AGENTLEDGER_AUTH_MODE", "off"),
    ]);
    assert!(err.contains("authentication off"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_aliases_of_verify_ledger_are_refused_and_work_goes_on() {
    let d = deploy(&[], None).await;
    let base = d.server.base.clone();
    let fields: String = (0..1000)
        .map(|i| format!("v{i}: verifyLedger {{ ok }} "))
        .collect();
    let started = Instant::now();
    let (status, body) = post(
        &base,
        Some(&d.keys["auditor"]),
        &format!("{{ {fields} }}"),
        &json!({}),
    )
    .await;
    assert_eq!(code(&body), Some("BAD_INPUT"), "{status} {body}");
    println!("aliased verifyLedger refused in {:?}", started.elapsed());
    // Several whole-ledger checks at once run one after another, while a
    // workflow submitted meanwhile completes.
    let checks: Vec<_> = (0..4)
        .map(|_| {
            let (base, key) = (base.clone(), d.keys["auditor"].clone());
            tokio::spawn(async move {
                post(
                    &base,
                    Some(&key),
                    "{ a: verifyLedger { ok } b: ledgerDigest { position } }",
                    &json!({}),
                )
                .await
            })
        })
        .collect();
    let submitted = Instant::now();
    let id = submit_as(&base, &d.keys["submitter"], COMPLETES).await;
    wait_state(&base, &d.keys["viewer"], &id, "COMPLETED").await;
    let took = submitted.elapsed();
    for check in checks {
        let (_, body) = check.await.unwrap();
        assert!(body["errors"].is_null(), "{body}");
    }
    println!("a workflow completed in {took:?} beside 4 whole-ledger checks");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(d.server.stop().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_can_be_followed_before_it_exists_and_only_by_its_tenant() {
    let d = deploy(&[], None).await;
    let base = d.server.base.clone();
    let (_, me) = post(
        &base,
        Some(&d.keys["submitter"]),
        "{ me { subject } }",
        &json!({}),
    )
    .await;
    let owner = me["data"]["me"]["subject"].as_str().unwrap().to_string();
    let id = agentledger_agents::workflow_id_for_key(&owner, "order-17").to_string();
    let follow = "subscription($id: ID) { workflowEvents(workflowId: $id) { type } }";
    let url = format!("{}/graphql/ws", base.replacen("http", "ws", 1));
    let mut sockets = Vec::new();
    for viewer in ["viewer", "other-viewer"] {
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            "graphql-transport-ws".parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let init = json!({"type": "connection_init", "payload": {"X-API-Key": d.keys[viewer]}});
        ws.send(Message::Text(init.to_string().into()))
            .await
            .unwrap();
        let sub = json!({"id": "1", "type": "subscribe", "payload": {"query": follow, "variables": {"id": id}}});
        ws.send(Message::Text(sub.to_string().into()))
            .await
            .unwrap();
        sockets.push(ws);
    }
    let (_, body) = post(&base, Some(&d.keys["submitter"]), "mutation { submitWorkflow(request: \"Count the words.\", idempotencyKey: \"order-17\") { id } }", &json!({})).await;
    assert_eq!(body["data"]["submitWorkflow"]["id"], id.as_str(), "{body}");
    // The owner's tenant sees the submission arrive.
    let first = loop {
        let m = tokio::time::timeout(Duration::from_secs(20), sockets[0].next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "next" {
                break v;
            }
        }
    };
    assert_eq!(
        first["payload"]["data"]["workflowEvents"]["type"], "WorkflowSubmitted",
        "{first}"
    );
    // Another tenant's subscriber gets nothing of it.
    let nothing = tokio::time::timeout(Duration::from_millis(1_500), async {
        loop {
            match sockets[1].next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"next\"") => return t.to_string(),
                Some(Ok(_)) => {}
                _ => return String::new(),
            }
        }
    })
    .await;
    assert!(
        nothing.is_err() || nothing.as_deref() == Ok(""),
        "{nothing:?}"
    );
    assert!(d.server.stop().success());
}
