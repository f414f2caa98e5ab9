//! Tools served by Model Context Protocol servers (`[[tools.mcp]]`), over
//! the streamable HTTP transport or a child process's stdio, through
//! `rmcp`. To the executor an [`McpTool`] is a tool like any other, run
//! under the attempt's deadline with its retries and backoff, with one
//! difference: its calls act outside the process where nothing can take
//! them back, so each is declared before it is made ([`Tool::intent`]).
//! The start of the attempt records the intent (server, tool, a hash of the
//! arguments, the idempotency key, which is that event's id and travels to
//! the server in the call's `_meta`), the result records the outcome, and a
//! call whose outcome a crash lost is retried only for a tool declared
//! `idempotent`; otherwise a person decides (see the executor's policy).
//!
//! One connection per server, shared by its tools, opened at start and
//! again whenever it is found closed. The server's tool list is read when
//! the connection opens and again when the server says it changed; it
//! gives the arguments' schema, against which every call is checked before
//! it is sent.

use std::collections::HashMap;
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
}

/// What a server's listing says about one of its tools.
struct Listed {
    schema: Value,
    validator: Option<jsonschema::Validator>,
}

type Listing = Arc<RwLock<HashMap<String, Listed>>>;

/// Keeps the listing current when the server says its tools changed.
#[derive(Clone)]
struct Listener {
    listing: Listing,
    server: Arc<str>,
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
        context: NotificationContext<RoleClient>,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        // Listed off the connection's own loop, which must go on reading
        // to see the answer.
        let (peer, listing, server) = (context.peer, self.listing.clone(), self.server.clone());
        tokio::spawn(async move {
            match peer.list_all_tools().await {
                Ok(tools) => {
                    store_listing(&listing, tools);
                    tracing::info!(server = %server, "the MCP server's tools changed; listed again");
                }
                Err(e) => {
                    tracing::warn!(server = %server, error = %e, "the MCP server's tools changed but could not be listed")
                }
            }
        });
        std::future::ready(())
    }
}

fn store_listing(listing: &Listing, tools: Vec<rmcp::model::Tool>) {
    let listed = tools
        .into_iter()
        .map(|tool| {
            let schema = Value::Object((*tool.input_schema).clone());
            let validator = jsonschema::validator_for(&schema).ok();
            (tool.name.to_string(), Listed { schema, validator })
        })
        .collect();
    *listing.write().expect("listing lock") = listed;
}

/// One server's connection, shared by its tools.
pub struct McpConnection {
    server: McpServer,
    label: Arc<str>,
    bearer_token_env: Option<String>,
    clock: Arc<dyn Clock>,
    client: Mutex<Option<RunningService<RoleClient, Listener>>>,
    listing: Listing,
}

impl McpConnection {
    fn new(server: McpServer, bearer_token_env: Option<String>, clock: Arc<dyn Clock>) -> Self {
        Self {
            label: server.label().into(),
            server,
            bearer_token_env,
            clock,
            client: Mutex::new(None),
            listing: Arc::new(RwLock::new(HashMap::new())),
        }
    }

    /// The server as the ledger names it.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The open connection's peer, connecting (and listing the tools)
    /// first when there is none or it closed; within `limit`.
    async fn peer(&self, limit: Duration) -> Result<Peer<RoleClient>, String> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(open.peer().clone());
        }
        *client = None;
        let limit = limit.min(CONNECT_TIMEOUT);
        // An I/O bound, like the HTTP client's own connect timeout: on the
        // runtime's timer, not its clock (a test's manual clock would
        // otherwise count it among the sleeps it waits for).
        let opened = tokio::time::timeout(limit, self.connect())
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())))
            .map_err(|e| format!("cannot reach the MCP server {}: {e}", self.label))?;
        let peer = opened.peer().clone();
        *client = Some(opened);
        Ok(peer)
    }

    async fn connect(&self) -> Result<RunningService<RoleClient, Listener>, String> {
        let listener = Listener {
            listing: self.listing.clone(),
            server: self.label.clone(),
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
                // stream answers come on. Each call has its deadline.
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
                command.args(args).kill_on_drop(true);
                let (transport, _) = TokioChildProcess::builder(command)
                    .spawn()
                    .map_err(|e| format!("cannot start {program}: {e}"))?;
                listener.serve(transport).await.map_err(|e| e.to_string())?
            }
        };
        let tools = service.list_all_tools().await.map_err(|e| e.to_string())?;
        let count = tools.len();
        store_listing(&self.listing, tools);
        tracing::info!(server = %self.label, tools = count, "connected to the MCP server");
        Ok(service)
    }

    /// Forgets a connection found broken, so that the next call reconnects.
    async fn drop_client(&self) {
        if let Some(mut client) = self.client.lock().await.take() {
            let _ = client.close().await;
        }
    }

    /// The listed input schema of `tool`, if the server lists it.
    fn schema(&self, tool: &str) -> Option<Value> {
        self.listing
            .read()
            .expect("listing lock")
            .get(tool)
            .map(|l| l.schema.clone())
    }

    /// Why `arguments` do not fit `tool`'s listed schema, if they don't.
    fn refuse(&self, tool: &str, arguments: &Value) -> Option<String> {
        let listing = self.listing.read().expect("listing lock");
        let validator = listing.get(tool)?.validator.as_ref()?;
        let why = validator.iter_errors(arguments).next().map(|e| {
            format!(
                "the arguments do not fit the schema of {tool} at {:?}: {e}",
                e.instance_path().to_string()
            )
        });
        why
    }
}

/// The connections of a runtime's MCP tools, one per server.
#[derive(Default)]
pub struct McpServers {
    connections: std::sync::Mutex<HashMap<McpServer, Arc<McpConnection>>>,
}

impl McpServers {
    /// The connection to `spec`'s server, made once per server.
    pub fn connection(&self, spec: &McpToolSpec, clock: Arc<dyn Clock>) -> Arc<McpConnection> {
        self.connections
            .lock()
            .expect("connections lock")
            .entry(spec.server.clone())
            .or_insert_with(|| {
                Arc::new(McpConnection::new(
                    spec.server.clone(),
                    spec.bearer_token_env.clone(),
                    clock,
                ))
            })
            .clone()
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
        let schema = self.connection.schema(tool).ok_or_else(|| {
            ToolFailure::Error(format!(
                "{} does not list a tool named {tool:?}",
                self.connection.label()
            ))
        })?;
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
        // The schema comes with the listing: connect first if need be.
        if let Err(e) = self.connection.peer(CONNECT_TIMEOUT).await {
            return Some(Err(ToolFailure::Error(e)));
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

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        let limit = (call.deadline - self.connection.clock.now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let peer = self
            .connection
            .peer(limit.max(Duration::from_millis(1)))
            .await
            .map_err(ToolFailure::Error)?;
        let (arguments, key) = match call.declared {
            Some(declared) => (declared.arguments, Some(declared.idempotency_key)),
            None => (self.arguments(&call.instruction, &call.input)?, None),
        };
        let meta = key.map(|key| {
            let mut meta = Meta::new();
            meta.insert(
                IDEMPOTENCY_META_KEY.to_string(),
                Value::String(key.to_string()),
            );
            meta
        });
        // The key goes with the request's options: the peer merges them
        // into the one `_meta` it sends (params' own `_meta` would be a
        // second one).
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(CallToolRequestParams {
            meta: None,
            name: self.spec.tool.clone().into(),
            arguments: Some(arguments),
            task: None,
        }));
        let options = PeerRequestOptions {
            timeout: None,
            meta,
        };
        let call_tool = async {
            match peer
                .send_request_with_option(request, options)
                .await?
                .await_response()
                .await?
            {
                ServerResult::CallToolResult(result) => Ok(result),
                _ => Err(ServiceError::UnexpectedResponse),
            }
        };
        let answer = tokio::select! {
            answer = call_tool => answer,
            () = call.cancel.cancelled() => return Err(ToolFailure::Error("cancelled".into())),
        };
        match answer {
            Ok(result) if result.is_error == Some(true) => {
                let text = result_text(&result);
                Err(ToolFailure::Error(if text.is_empty() {
                    "the tool reported an error".into()
                } else {
                    text
                }))
            }
            Ok(result) => Ok(result_text(&result)),
            Err(ServiceError::McpError(e))
                if e.code == ErrorCode::INVALID_PARAMS || e.code == ErrorCode::METHOD_NOT_FOUND =>
            {
                Err(ToolFailure::Invalid(e.message.to_string()))
            }
            Err(ServiceError::McpError(e)) => Err(ToolFailure::Error(e.message.to_string())),
            Err(e) => {
                // The connection may be gone: the next call opens another.
                self.connection.drop_client().await;
                Err(ToolFailure::Error(format!(
                    "the call to {} failed: {e}",
                    self.connection.label()
                )))
            }
        }
    }
}
