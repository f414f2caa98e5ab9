//! Tools served by Model Context Protocol servers (`[[tools.mcp]]`), over
//! the streamable HTTP transport or a child process's stdio, through
//! `rmcp`. To the executor an [`McpTool`] is a tool like any other, run
//! under the attempt's deadline with its retries and backoff, with one
//! difference: its calls act outside the process where nothing can take
//! them back, so each is declared before it is made ([`Tool::intent`]).
//! The start of the attempt records the intent (server, tool, a hash of the
//! arguments, the idempotency key, which is that event's id and travels to
//! the server in the call's `_meta`), the result records the outcome, and a
//! call whose outcome was lost (a crash, a timeout, a broken connection
//! after sending) is made again by itself only for a tool declared
//! `idempotent`, under the same key; otherwise a person decides.
//!
//! One connection per server, shared by its tools, opened at start and
//! again whenever it is found closed or a call on it went unanswered. The
//! server's tool list is read when the connection opens and again when the
//! server says it changed; it gives the arguments' schema, against which
//! every call is checked before it is sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentledger_domain::tools::ToolSpec;
use async_trait::async_trait;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientInfo, ClientRequest, ErrorCode,
    Implementation, Meta, ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::{ClientHandler, Peer, RoleClient, ServiceError, ServiceExt};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use crate::clock::Clock;
use crate::tool::{CallPlan, Tool, ToolCall, ToolFailure};

/// The `_meta` key that carries a call's idempotency key to the server.
pub const IDEMPOTENCY_META_KEY: &str = "io.agentledger/idempotency-key";

/// Longest wait for a server to connect and answer its first listing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an MCP server is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum McpServer {
    /// Streamable HTTP at this URL.
    Url(String),
    /// A child process speaking over its stdin and stdout: program, then
    /// its arguments.
    Command(Vec<String>),
}

impl McpServer {
    /// How the ledger names the server in intents and errors.
    pub fn label(&self) -> String {
        match self {
            Self::Url(url) => url.clone(),
            Self::Command(argv) => format!("stdio:{}", argv.join(" ")),
        }
    }
}

/// A tool of an MCP server, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct McpToolSpec {
    /// Its name here (what Sena's plans say).
    pub name: String,
    pub server: McpServer,
    /// Its name on the server.
    pub tool: String,
    pub description: String,
    pub keywords: Vec<String>,
    /// Safe to call again with the same arguments: a call whose outcome a
    /// crash lost is retried; otherwise a person decides.
    pub idempotent: bool,
    /// The same arguments always give the same output (cacheable).
    pub deterministic: bool,
    /// The argument that takes the subtask's input (by default `input`, or
    /// the schema's only string argument).
    pub input_argument: Option<String>,
    /// The argument that takes the subtask's title (by default
    /// `instruction`, when the schema has it).
    pub instruction_argument: Option<String>,
    /// The environment variable holding a bearer token for an HTTP server.
    /// Not part of the fingerprint: it changes no decision.
    #[serde(skip)]
    pub bearer_token_env: Option<String>,
    /// For a command: the variables of the service's environment it gets
    /// beside `PATH`, `HOME`, `LANG`, `LC_ALL`, `TZ` and `TMPDIR` (it gets
    /// no other).
    #[serde(skip)]
    pub env: Vec<String>,
}

/// What a server's listing says about one of the configured tools: its
/// input schema, compiled, or why it cannot be used.
struct Listed {
    schema: Value,
    validator: Result<jsonschema::Validator, String>,
}

/// The configured tools the server lists, by their names there.
type Listing = Arc<RwLock<HashMap<String, Listed>>>;

/// Largest input schema kept for a tool (bytes of JSON).
const MAX_SCHEMA_BYTES: usize = 256 * 1024;

/// Longest text kept from a server's error (bytes of UTF-8).
const MAX_ERROR_BYTES: usize = 8 * 1024;

/// Variables a stdio server is given besides those its entry names; it
/// gets nothing else of the service's environment (database URLs, keys).
const BASE_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// `text` cut to [`MAX_ERROR_BYTES`] at a character boundary.
fn capped(text: &str) -> String {
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_string();
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Keeps the listing current when the server says its tools changed.
#[derive(Clone)]
struct Listener {
    shared: Arc<Shared>,
    /// The connection this listener belongs to.
    generation: u64,
}

/// What a connection shares with the listeners of its successive clients.
struct Shared {
    label: Arc<str>,
    listing: Listing,
    /// The configured tools of this server, by their names there.
    wanted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The generation of the open client.
    current: AtomicU64,
    /// The server said its tools changed: list them again before the next
    /// call is built.
    stale: AtomicBool,
    /// Counts the changes announced by any server of the runtime.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Shared {
    /// Keeps the configured tools of `tools`, each schema compiled once.
    fn store(&self, generation: u64, tools: Vec<rmcp::model::Tool>) {
        if self.current.load(Ordering::Acquire) != generation {
            return; // a listing from a connection since replaced
        }
        let wanted = self.wanted.lock().expect("wanted lock").clone();
        let listed = tools
            .into_iter()
            .filter(|tool| wanted.contains(tool.name.as_ref()))
            .map(|tool| {
                let schema = Value::Object((*tool.input_schema).clone());
                let size = schema.to_string().len();
                let validator = if size > MAX_SCHEMA_BYTES {
                    Err(format!("its input schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are taken"))
                } else {
                    jsonschema::validator_for(&schema)
                        .map_err(|e| format!("its input schema cannot be checked: {}", capped(&e.to_string())))
                };
                if let Err(why) = &validator {
                    tracing::warn!(server = %self.label, tool = %tool.name, %why, "an MCP tool cannot be called");
                }
                (tool.name.to_string(), Listed { schema, validator })
            })
            .collect();
        *self.listing.write().expect("listing lock") = listed;
    }
}

impl ClientHandler for Listener {
    fn get_info(&self) -> ClientInfo {
        ClientInfo {
            client_info: Implementation {
                name: "agentledger".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                ..Implementation::from_build_env()
            },
            ..ClientInfo::default()
        }
    }

    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        // Listed again before the next call is built, on the caller's path
        // (a listing asked for from here, beside the connection's own loop,
        // was seen to get no answer).
        if self.shared.current.load(Ordering::Acquire) == self.generation {
            self.shared.stale.store(true, Ordering::Release);
            self.shared.changes.send_modify(|n| *n += 1);
            tracing::info!(server = %self.shared.label, "the MCP server's tools changed; they are listed again before the next call");
        }
        std::future::ready(())
    }
}

/// One server's connection, shared by its tools.
pub struct McpConnection {
    server: McpServer,
    bearer_token_env: Option<String>,
    /// Variables passed to a stdio server, beyond [`BASE_ENV`].
    env: Vec<String>,
    clock: Arc<dyn Clock>,
    shared: Arc<Shared>,
    /// The open client and its generation. Held only to look or to swap,
    /// and while connecting (bounded by [`CONNECT_TIMEOUT`]).
    client: Mutex<Option<(u64, RunningService<RoleClient, Listener>)>>,
    generations: AtomicU64,
}

impl McpConnection {
    fn new(
        spec: &McpToolSpec,
        clock: Arc<dyn Clock>,
        changes: Arc<tokio::sync::watch::Sender<u64>>,
    ) -> Self {
        Self {
            server: spec.server.clone(),
            bearer_token_env: spec.bearer_token_env.clone(),
            env: spec.env.clone(),
            clock,
            shared: Arc::new(Shared {
                label: spec.server.label().into(),
                listing: Arc::new(RwLock::new(HashMap::new())),
                wanted: std::sync::Mutex::new(std::collections::HashSet::new()),
                current: AtomicU64::new(0),
                stale: AtomicBool::new(false),
                changes,
            }),
            client: Mutex::new(None),
            generations: AtomicU64::new(0),
        }
    }

    /// The server as the ledger names it.
    pub fn label(&self) -> &str {
        &self.shared.label
    }

    /// The open connection's peer and generation, connecting (and listing
    /// the tools) first when there is none or it closed; within `limit`.
    async fn peer(&self, limit: Duration) -> Result<(Peer<RoleClient>, u64), String> {
        let mut client = self.client.lock().await;
        if let Some((generation, open)) = client.as_ref() {
            if !open.is_closed() && !open.peer().is_transport_closed() {
                return Ok((open.peer().clone(), *generation));
            }
        }
        if let Some((_, closed)) = client.take() {
            close_later(closed);
        }
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        self.shared.current.store(generation, Ordering::Release);
        let limit = limit.min(CONNECT_TIMEOUT);
        // An I/O bound, like the HTTP client's own connect timeout: on the
        // runtime's timer, not its clock (a test's manual clock would
        // otherwise count it among the sleeps it waits for).
        let opened = tokio::time::timeout(limit, self.connect(generation))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())))
            .map_err(|e| {
                format!(
                    "cannot reach the MCP server {}: {}",
                    self.label(),
                    capped(&e)
                )
            })?;
        let peer = opened.peer().clone();
        *client = Some((generation, opened));
        Ok((peer, generation))
    }

    async fn connect(
        &self,
        generation: u64,
    ) -> Result<RunningService<RoleClient, Listener>, String> {
        let listener = Listener {
            shared: self.shared.clone(),
            generation,
        };
        let service = match &self.server {
            McpServer::Url(url) => {
                use rmcp::transport::streamable_http_client::{
                    StreamableHttpClientTransport, StreamableHttpClientTransportConfig,
                };
                let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                if let Some(var) = &self.bearer_token_env {
                    config.auth_header = Some(
                        std::env::var(var)
                            .map_err(|_| format!("the variable {var} (its token) is not set"))?,
                    );
                }
                // No overall timeout on the client: it would cut the event
                // stream answers come on. Each call has its deadline, and a
                // call that misses it drops the connection.
                let http = reqwest::Client::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?;
                let transport = StreamableHttpClientTransport::with_client(http, config);
                listener.serve(transport).await.map_err(|e| e.to_string())?
            }
            McpServer::Command(argv) => {
                use rmcp::transport::TokioChildProcess;
                let (program, args) = argv.split_first().ok_or("the command is empty")?;
                let mut command = tokio::process::Command::new(program);
                command.args(args).kill_on_drop(true).env_clear();
                for var in BASE_ENV
                    .iter()
                    .copied()
                    .chain(self.env.iter().map(String::as_str))
                {
                    if let Some(value) = std::env::var_os(var) {
                        command.env(var, value);
                    }
                }
                let (transport, _) = TokioChildProcess::builder(command)
                    .spawn()
                    .map_err(|e| format!("cannot start {program}: {e}"))?;
                listener.serve(transport).await.map_err(|e| e.to_string())?
            }
        };
        let tools = service.list_all_tools().await.map_err(|e| e.to_string())?;
        let count = tools.len();
        self.shared.store(generation, tools);
        tracing::info!(server = %self.label(), tools = count, "connected to the MCP server");
        Ok(service)
    }

    /// Forgets connection `generation` (found broken, or a call on it
    /// missed its deadline), so that the next call opens another; a newer
    /// connection stays.
    async fn drop_client(&self, generation: u64) {
        let taken = {
            let mut client = self.client.lock().await;
            match client.as_ref() {
                Some((current, _)) if *current == generation => client.take(),
                _ => None,
            }
        };
        if let Some((_, closed)) = taken {
            close_later(closed);
        }
    }

    /// The listed input schema of `tool`, or why the tool cannot be called.
    fn schema(&self, tool: &str) -> Result<Value, ToolFailure> {
        let listing = self.shared.listing.read().expect("listing lock");
        match listing.get(tool) {
            None => Err(ToolFailure::Error(format!(
                "{} does not list a tool named {tool:?}",
                self.label()
            ))),
            Some(Listed {
                validator: Err(why),
                ..
            }) => Err(ToolFailure::Invalid(format!(
                "{tool} on {}: {why}",
                self.label()
            ))),
            Some(listed) => Ok(listed.schema.clone()),
        }
    }

    /// Why `arguments` do not fit `tool`'s listed schema, if they don't.
    fn refuse(&self, tool: &str, arguments: &Value) -> Option<String> {
        let listing = self.shared.listing.read().expect("listing lock");
        let Ok(validator) = &listing.get(tool)?.validator else {
            return Some(format!("{tool}'s input schema cannot be checked"));
        };
        let why = validator.iter_errors(arguments).next().map(|e| {
            capped(&format!(
                "the arguments do not fit the schema of {tool} at {:?}: {e}",
                e.instance_path().to_string()
            ))
        });
        why
    }
}

/// Closes a client off the caller's path, giving it a second to say so.
fn close_later(mut client: RunningService<RoleClient, Listener>) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = client.close_with_timeout(Duration::from_secs(1)).await;
        });
    }
}

/// The connections of a runtime's MCP tools, one per server.
pub struct McpServers {
    connections: std::sync::Mutex<HashMap<McpServer, Arc<McpConnection>>>,
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for McpServers {
    fn default() -> Self {
        Self {
            connections: std::sync::Mutex::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl McpServers {
    /// How many times a server said its tools changed, as it grows.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The connection to `spec`'s server, made once per server, which
    /// will keep `spec`'s tool in its listing.
    pub fn connection(&self, spec: &McpToolSpec, clock: Arc<dyn Clock>) -> Arc<McpConnection> {
        let connection = self
            .connections
            .lock()
            .expect("connections lock")
            .entry(spec.server.clone())
            .or_insert_with(|| Arc::new(McpConnection::new(spec, clock, self.changes.clone())))
            .clone();
        connection
            .shared
            .wanted
            .lock()
            .expect("wanted lock")
            .insert(spec.tool.clone());
        connection
    }

    /// Connects to every server and lists its tools; a server that does not
    /// answer is tried again at its tool's next call.
    pub async fn connect_all(&self) {
        let all: Vec<Arc<McpConnection>> = self
            .connections
            .lock()
            .expect("connections lock")
            .values()
            .cloned()
            .collect();
        futures::future::join_all(all.iter().map(|c| async move {
            if let Err(e) = c.peer(CONNECT_TIMEOUT).await {
                tracing::warn!(server = %c.label(), error = %e, "the MCP server did not answer at start; its tools' calls will try again");
            }
        }))
        .await;
    }
}

/// Drops the connection a call was on when the call ends without an answer
/// (the executor's deadline dropped it): a server that does not answer in
/// time may have stalled the connection for every later call.
struct Abandoned<'a> {
    connection: &'a Arc<McpConnection>,
    generation: u64,
    answered: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let (connection, generation) = (self.connection.clone(), self.generation);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move { connection.drop_client(generation).await });
        }
    }
}

/// A tool of an MCP server, as the executor runs it.
pub struct McpTool {
    spec: McpToolSpec,
    leaked: ToolSpec,
    connection: Arc<McpConnection>,
}

impl McpTool {
    pub fn new(spec: &McpToolSpec, connection: Arc<McpConnection>) -> Self {
        let keywords: Vec<&'static str> = spec
            .keywords
            .iter()
            .map(|k| &*Box::leak(k.clone().into_boxed_str()))
            .collect();
        Self {
            leaked: ToolSpec {
                name: Box::leak(spec.name.clone().into_boxed_str()),
                description: Box::leak(spec.description.clone().into_boxed_str()),
                keywords: Box::leak(keywords.into_boxed_slice()),
            },
            spec: spec.clone(),
            connection,
        }
    }

    /// The arguments for a subtask's title and input, after the tool's
    /// listed schema: the input goes to `input_argument` (by default
    /// `input`, else the schema's only string argument), the title to
    /// `instruction_argument` (by default `instruction`, if the schema has
    /// it); with no argument for the input, an input that is a JSON object
    /// is the arguments. Checked against the schema before anything is sent.
    fn arguments(&self, instruction: &str, input: &str) -> Result<Map<String, Value>, ToolFailure> {
        let tool = &self.spec.tool;
        let schema = self.connection.schema(tool)?;
        let properties = schema
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let named = |wanted: &Option<String>, default: &str| {
            wanted.clone().or_else(|| {
                properties
                    .contains_key(default)
                    .then(|| default.to_string())
            })
        };
        let input_argument = named(&self.spec.input_argument, "input").or_else(|| {
            let strings: Vec<&String> = properties
                .iter()
                .filter(|(name, p)| {
                    p.get("type").and_then(Value::as_str) == Some("string")
                        && Some(name.as_str()) != self.spec.instruction_argument.as_deref()
                        && name.as_str() != "instruction"
                })
                .map(|(name, _)| name)
                .collect();
            match strings.as_slice() {
                [only] => Some((*only).clone()),
                _ => None,
            }
        });
        let mut arguments = match &input_argument {
            Some(name) => Map::from_iter([(name.clone(), Value::String(input.to_string()))]),
            None => match serde_json::from_str::<Value>(input) {
                Ok(Value::Object(object)) => object,
                _ => {
                    return Err(ToolFailure::Invalid(format!(
                        "cannot tell which argument of {tool} takes the input: set input_argument \
                         (its arguments are {:?})",
                        properties.keys().collect::<Vec<_>>()
                    )))
                }
            },
        };
        if let Some(name) = named(&self.spec.instruction_argument, "instruction") {
            arguments.insert(name, Value::String(instruction.to_string()));
        }
        let value = Value::Object(arguments);
        if let Some(why) = self.connection.refuse(tool, &value) {
            return Err(ToolFailure::Invalid(why));
        }
        let Value::Object(arguments) = value else {
            unreachable!("built as an object")
        };
        Ok(arguments)
    }
}

/// The text of a tool's result: its text parts, one per line, or else its
/// structured content as JSON.
fn result_text(result: &CallToolResult) -> String {
    let texts: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.raw.as_text().map(|t| t.text.as_str()))
        .collect();
    if texts.is_empty() {
        if let Some(structured) = &result.structured_content {
            return structured.to_string();
        }
    }
    texts.join("\n")
}

#[async_trait]
impl Tool for McpTool {
    fn spec(&self) -> ToolSpec {
        self.leaked
    }

    fn deterministic(&self) -> bool {
        self.spec.deterministic
    }

    async fn intent(
        &self,
        instruction: &str,
        input: &str,
    ) -> Option<Result<CallPlan, ToolFailure>> {
        // The schema comes with the listing: connect first if need be, and
        // list again if the server said its tools changed.
        let (peer, generation) = match self.connection.peer(CONNECT_TIMEOUT).await {
            Ok(open) => open,
            Err(e) => return Some(Err(ToolFailure::Error(e))),
        };
        let shared = &self.connection.shared;
        if shared.stale.swap(false, Ordering::AcqRel) {
            match tokio::time::timeout(CONNECT_TIMEOUT, peer.list_all_tools()).await {
                Ok(Ok(tools)) => shared.store(generation, tools),
                failed => {
                    shared.stale.store(true, Ordering::Release);
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer in time".to_string(),
                    };
                    return Some(Err(ToolFailure::Error(capped(&format!(
                        "the tools of {} changed and could not be listed again: {why}",
                        self.connection.label()
                    )))));
                }
            }
        }
        Some(
            self.arguments(instruction, input)
                .map(|arguments| CallPlan {
                    server: self.connection.label().to_string(),
                    tool: self.spec.tool.clone(),
                    arguments,
                    idempotent: self.spec.idempotent,
                }),
        )
    }

    fn origin(&self) -> String {
        format!("mcp:{}", self.connection.label())
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        // Only a call whose intent is recorded goes out.
        let Some(declared) = call.declared else {
            return Err(ToolFailure::Error(
                "an MCP call goes out only once its intent is recorded".into(),
            ));
        };
        let limit = (call.deadline - self.connection.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_millis(1));
        let (peer, generation) = self
            .connection
            .peer(limit)
            .await
            .map_err(ToolFailure::Error)?;
        let mut meta = Meta::new();
        meta.insert(
            IDEMPOTENCY_META_KEY.to_string(),
            Value::String(declared.idempotency_key.to_string()),
        );
        // The key goes with the request's options: the peer merges them
        // into the one `_meta` it sends (params' own `_meta` would be a
        // second one, and the request unreadable).
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(CallToolRequestParams {
            meta: None,
            name: self.spec.tool.clone().into(),
            arguments: Some(declared.arguments),
            task: None,
        }));
        let options = PeerRequestOptions {
            timeout: Some(limit),
            meta: Some(meta),
        };
        let mut watch = Abandoned {
            connection: &self.connection,
            generation,
            answered: false,
        };
        let handle = match peer.send_request_with_option(request, options).await {
            Ok(handle) => handle,
            Err(e) => {
                // Not sent: the connection is gone; the next call reconnects.
                watch.answered = true;
                self.connection.drop_client(generation).await;
                return Err(ToolFailure::Error(capped(&format!(
                    "the call to {} could not be sent: {e}",
                    self.connection.label()
                ))));
            }
        };
        let answer = tokio::select! {
            answer = handle.await_response() => answer,
            () = call.cancel.cancelled() => {
                return Err(ToolFailure::Unknown("cancelled after the call was sent".into()));
            }
        };
        watch.answered = true;
        match answer {
            Ok(ServerResult::CallToolResult(result)) if result.is_error == Some(true) => {
                let text = result_text(&result);
                Err(ToolFailure::Error(if text.is_empty() {
                    "the tool reported an error".into()
                } else {
                    capped(&text)
                }))
            }
            Ok(ServerResult::CallToolResult(result)) => Ok(result_text(&result)),
            Ok(_) => Err(ToolFailure::Error(
                "the server answered something else than a tool result".into(),
            )),
            Err(ServiceError::McpError(e))
                if e.code == ErrorCode::INVALID_PARAMS || e.code == ErrorCode::METHOD_NOT_FOUND =>
            {
                Err(ToolFailure::Invalid(capped(&e.message)))
            }
            Err(ServiceError::McpError(e)) => Err(ToolFailure::Error(capped(&e.message))),
            Err(e) => {
                // Sent, and no answer came back: it may have acted.
                self.connection.drop_client(generation).await;
                Err(ToolFailure::Unknown(capped(&format!(
                    "the call to {} was sent and its answer lost: {e}",
                    self.connection.label()
                ))))
            }
        }
    }
}
