//! `serve`'s configuration: defaults, then an optional TOML file
//! (`--config` / `AGENTLEDGER_CONFIG`), then flags and environment
//! variables, which win. Unknown keys in the file are an error, so a typo
//! never passes silently.
//!
//! ```toml
//! [server]
//! max_body_bytes = 2097152   # GraphQL request body limit
//! ready_max_lag = 10000      # /ready fails when a projection lags more events
//! request_timeout_ms = 30000 # longest a plain request may take
//! max_concurrent_requests = 512
//! allowed_origins = ["https://console.example.com"]  # CORS and WebSocket Origin allow-list
//! max_response_bytes = 8388608   # a larger GraphQL response (or subscription message) is refused with BAD_INPUT
//! header_read_timeout_ms = 10000 # a request's header must arrive within this
//! max_connections = 10000        # open connections at once; more wait in the backlog
//! checkpoint_origin = "ledger.example.com/agentledger"  # names this ledger in its checkpoints (GET /checkpoint)
//!
//! [limits]                   # 0 turns a rate off
//! credential_per_second = 1000   # requests and socket operations per credential
//! credential_burst = 2000
//! address_per_second = 2000      # requests per client address
//! address_burst = 4000
//! subscriptions_per_connection = 100
//! connections_per_credential = 1000
//! init_timeout_ms = 10000        # to send connection_init
//! ping_interval_ms = 30000
//!
//! [graphql]
//! max_page = 100
//! max_depth = 12
//! max_complexity = 2000
//! read_your_writes_ms = 5000
//! introspection = true       # default: true, false in the prod profile
//!
//! [agents]
//! max_workflows = 64         # workflows driven at once by this process
//! lease_seconds = 30
//! max_tool_output_bytes = 1048576  # a larger tool output fails its subtask, with no retry
//! record_every_start = false # true: the start of every tool attempt is recorded before it runs, pure built-ins too
//! attempt_timeout_ms = 10000 # a tool attempt's deadline (external tools' calls too); then it is retried
//! orphan_grace_ms = 30000    # a workflow waiting for an agent with no queue row this long is queued again
//! analyst = "builtin"        # or "external": workers decide through the API (claimAgentTask), or "llm":
//! gatekeeper = "builtin"     #   the model of [llm] decides; the same for gatekeeper and ethics (the
//! ethics = "builtin"         #   executor's scheduling stays built in)
//!
//! [llm]                      # an OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, vLLM, llama.cpp)
//! base_url = "http://127.0.0.1:11434/v1"
//! model = "llama3.1"
//! api_key_env = "OPENAI_API_KEY"   # the variable holding the key (none: no Authorization header)
//! timeout_ms = 30000         # per request; past it the reference policy decides
//! max_tokens = 1024
//! retries = 2                # more requests after a 429 (honouring Retry-After), a 5xx or a refused connection
//!
//! [[tools.external]]         # a tool served by workers through the API (claimToolCall); repeat per tool
//! name = "crm_lookup"        # 1 to 64 of a-z, 0-9, _ and -; replaces a built-in of the same name
//! description = "Looks a customer up in the CRM"
//! keywords = ["customer", "crm", "고객"]   # Sena picks the tool whose keywords the request mentions
//! deterministic = false      # true: the same instruction and input always give the same output (cacheable)
//!
//! [[tools.mcp]]              # a tool of an MCP server; repeat per tool (tools of one server share its connection)
//! name = "open_ticket"       # its name here, as [[tools.external]]
//! url = "https://mcp.example.com/mcp"   # streamable HTTP, or instead:
//! # command = ["python3", "server.py"]  # a child process speaking over stdio
//! tool = "create_ticket"     # its name on the server (default: name)
//! keywords = ["ticket", "티켓"]
//! description = "Opens a helpdesk ticket"   # default: "<tool> on <server>"
//! idempotent = false         # true: a call whose outcome a crash lost is made again; false: a person decides
//! deterministic = false      # true: results may be reused by the cache
//! input_argument = "text"    # the argument that takes the subtask's input (default: "input", or the only string one)
//! instruction_argument = "instruction"  # the one that takes the subtask's title (default: "instruction" if it has one)
//! bearer_token_env = "HELPDESK_TOKEN"   # for url: the variable holding a bearer token (https:// or loopback only)
//! env = ["HELPDESK_DB"]      # for command: variables it gets besides PATH, HOME, LANG, LC_ALL, TZ, TMPDIR (no others)
//!
//! [cache]                    # reuse recorded results of deterministic tools and model answers
//! enabled = false
//! max_entries = 10000
//! max_age_seconds = 86400
//! tools_off = ["fetch_rates"]   # never reuse these tools' results
//! roles_off = ["ethics"]        # never reuse these roles' model answers
//!
//! [witness]                  # C2SP witnesses this ledger's checkpoints are pushed to
//! urls = ["https://witness.example.net"]   # AGENTLEDGER_WITNESS_URLS (comma-separated) replaces it
//! interval_seconds = 60      # push at least this often
//! every_events = 1000        # and whenever the tree grew by this many events
//! keys = ["witness.example.net+1f2e3d4c+BAs…"]  # their verifier keys (AGENTLEDGER_WITNESS_KEYS):
//!                            # cosignatures that verify are published at /checkpoint/cosigned
//!
//! [retention]                # read-model rows past the window are archived, then pruned
//! archive_dir = "/var/lib/agentledger/archive"  # AGENTLEDGER_RETENTION_ARCHIVE_DIR; unset: no retention
//! window_days = 365          # workflows finished longer ago (and metrics of older minutes)
//! min_window_days = 183      # the floor: a shorter window is refused (lower it only where the law allows)
//! interval_hours = 24        # how often a node runs it (one node at a time)
//!
//! [auth]
//! mode = "required"          # "off" (every caller anonymous, every role: dev only) or "required"
//! jwt_issuer = "https://id.example.com/realms/acme"
//! jwt_audience = "agentledger"
//! jwks = "https://id.example.com/realms/acme/protocol/openid-connect/certs"  # or a file
//! jwt_hs256_secret_file = "/run/secrets/jwt"   # HS256 for small setups
//! roles_claim = "realm_access.roles"           # default "roles"
//! tenant_claim = "tenant"                      # default "tenant"
//! allow_self_approval = false                  # the submitter may decide its own escalation
//! console_client_id = "agentledger-console"    # the web console signs in at jwt_issuer (PKCE)
//! console_scope = "openid"                     # default "openid"
//! # Each key may also be set as AGENTLEDGER_AUTH_<KEY>, e.g. AGENTLEDGER_AUTH_JWKS.
//!
//! [privacy]
//! # Free text sealed under the data subject's key when a workflow is
//! # submitted with a subjectId (default: all of these).
//! personal_fields = ["request", "input", "subtask_title", "rationale", "comment", "output",
//!                    "cancel_reason", "reason", "error"]
//! ```

use std::path::Path;
use std::time::Duration;

use agentledger_domain::names::AgentRole;
use anyhow::Context;
use serde::Deserialize;

/// The file's sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub graphql: GraphqlSection,
    #[serde(default)]
    pub agents: AgentsSection,
    #[serde(default)]
    pub privacy: PrivacySection,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub tools: ToolsSection,
    pub llm: Option<LlmSection>,
    #[serde(default)]
    pub cache: CacheSection,
    #[serde(default)]
    pub witness: WitnessSection,
    #[serde(default)]
    pub retention: RetentionSection,
}

/// `[retention]`: archiving and pruning read-model rows past a window.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    pub archive_dir: Option<std::path::PathBuf>,
    pub window_days: Option<u32>,
    pub min_window_days: Option<u32>,
    pub interval_hours: Option<u64>,
}

impl RetentionSection {
    /// The policy `serve` runs on its schedule; `None` without an archive
    /// directory (`AGENTLEDGER_RETENTION_ARCHIVE_DIR` replaces the file's).
    /// A window under the floor is refused here, before the service starts.
    pub fn policy(&self) -> anyhow::Result<Option<crate::retention::Policy>> {
        let dir = match std::env::var_os("AGENTLEDGER_RETENTION_ARCHIVE_DIR") {
            Some(dir) if !dir.is_empty() => Some(std::path::PathBuf::from(dir)),
            _ => self.archive_dir.clone(),
        };
        let Some(dir) = dir else {
            if self.window_days.is_some() || self.interval_hours.is_some() {
                anyhow::bail!("[retention] needs archive_dir: where archived rows are written");
            }
            return Ok(None);
        };
        let mut policy =
            crate::retention::Policy::new(dir, self.window_days, self.min_window_days)?;
        if let Some(hours) = self.interval_hours {
            policy.interval = Duration::from_secs(hours.max(1) * 3600);
        }
        Ok(Some(policy))
    }
}

/// `[witness]`: the witnesses `serve` pushes its checkpoints to.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    #[serde(default)]
    pub urls: Vec<String>,
    /// The witnesses' verifier keys (`name+keyid+base64`, cosignature/v1):
    /// cosignatures that verify under one are published at
    /// `/checkpoint/cosigned`.
    #[serde(default)]
    pub keys: Vec<String>,
    pub interval_seconds: Option<u64>,
    pub every_events: Option<u64>,
}

/// A comma-separated environment variable, when set, replaces the file's
/// list (blank items dropped).
fn env_list(name: &str, file: &[String]) -> Vec<String> {
    match std::env::var(name) {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(String::from)
            .collect(),
        Err(_) => file.to_vec(),
    }
}

impl WitnessSection {
    /// What to push where; `AGENTLEDGER_WITNESS_URLS` and
    /// `AGENTLEDGER_WITNESS_KEYS` (comma-separated) replace the file's
    /// lists. `None` when there is no witness.
    pub fn witnessing(&self) -> anyhow::Result<Option<crate::witnessing::Witnessing>> {
        let urls = env_list("AGENTLEDGER_WITNESS_URLS", &self.urls);
        for url in &urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                anyhow::bail!("[witness] urls: {url:?} is not an http(s) URL");
            }
        }
        let keys = env_list("AGENTLEDGER_WITNESS_KEYS", &self.keys);
        for key in &keys {
            agentledger_eventstore::checkpoint::parse_cosigner_key(key)
                .map_err(|e| anyhow::anyhow!("[witness] keys: {e}"))?;
        }
        Ok((!urls.is_empty()).then(|| crate::witnessing::Witnessing {
            urls,
            keys,
            interval: std::time::Duration::from_secs(self.interval_seconds.unwrap_or(60).max(1)),
            every_events: self.every_events.unwrap_or(1_000),
        }))
    }
}

/// `[cache]`: the result cache.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub enabled: Option<bool>,
    pub max_entries: Option<usize>,
    pub max_age_seconds: Option<u64>,
    #[serde(default)]
    pub tools_off: Vec<String>,
    #[serde(default)]
    pub roles_off: Vec<CacheRole>,
}

/// A role named in `roles_off`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheRole {
    Analyst,
    Gatekeeper,
    Ethics,
}

/// `[llm]`: the model behind roles served by `"llm"`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSection {
    pub base_url: String,
    pub model: String,
    pub api_key_env: Option<String>,
    pub timeout_ms: Option<u64>,
    pub max_tokens: Option<u32>,
    pub retries: Option<u8>,
}

/// `[tools]`: tools beside the built-ins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolsSection {
    #[serde(default)]
    pub external: Vec<ExternalTool>,
    #[serde(default)]
    pub mcp: Vec<McpTool>,
}

/// `[[tools.mcp]]`: a tool of an MCP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpTool {
    pub name: String,
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    pub tool: Option<String>,
    pub description: Option<String>,
    pub keywords: Vec<String>,
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default)]
    pub deterministic: bool,
    pub input_argument: Option<String>,
    pub instruction_argument: Option<String>,
    pub bearer_token_env: Option<String>,
    #[serde(default)]
    pub env: Vec<String>,
}

impl McpTool {
    /// As the runtime takes it.
    pub fn spec(&self) -> agentledger_agents::McpToolSpec {
        let server = match (&self.url, &self.command) {
            (Some(url), _) => agentledger_agents::McpServer::Url(url.trim().to_string()),
            (None, command) => {
                agentledger_agents::McpServer::Command(command.clone().unwrap_or_default())
            }
        };
        let tool = self.tool.clone().unwrap_or_else(|| self.name.clone());
        agentledger_agents::McpToolSpec {
            description: self
                .description
                .clone()
                .unwrap_or_else(|| format!("{tool} on {}", server.label())),
            name: self.name.clone(),
            server,
            tool,
            keywords: self.keywords.clone(),
            idempotent: self.idempotent,
            deterministic: self.deterministic,
            input_argument: self.input_argument.clone(),
            instruction_argument: self.instruction_argument.clone(),
            bearer_token_env: self.bearer_token_env.clone(),
            env: self.env.clone(),
        }
    }
}

/// `[[tools.external]]`: a tool served by external workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalTool {
    pub name: String,
    pub description: String,
    pub keywords: Vec<String>,
    #[serde(default)]
    pub deterministic: bool,
}

impl ToolsSection {
    /// Names are short identifiers, unique, each tool with a description
    /// and 1 to 32 keywords.
    fn check(&self) -> anyhow::Result<()> {
        let mut seen = std::collections::HashSet::new();
        let mut named = |section: &str, name: &String, keywords: &[String]| {
            let fine = (1..=64).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            anyhow::ensure!(
                fine,
                "[[{section}]] name {name:?}: use 1 to 64 of a-z, 0-9, _ and -"
            );
            anyhow::ensure!(
                seen.insert(name.clone()),
                "[[{section}]] {name:?} is named twice"
            );
            anyhow::ensure!(
                (1..=32).contains(&keywords.len())
                    && keywords
                        .iter()
                        .all(|k| !k.trim().is_empty() && k.len() <= 64),
                "[[{section}]] {name:?}: give 1 to 32 keywords, each 1 to 64 bytes"
            );
            Ok(())
        };
        for tool in &self.external {
            named("tools.external", &tool.name, &tool.keywords)?;
            anyhow::ensure!(
                !tool.description.trim().is_empty() && tool.description.len() <= 1024,
                "[[tools.external]] {:?}: give a description of at most 1024 bytes",
                tool.name
            );
        }
        for tool in &self.mcp {
            let name = &tool.name;
            named("tools.mcp", name, &tool.keywords)?;
            match (&tool.url, &tool.command) {
                (Some(url), None) => {
                    let url = url.trim();
                    let authority = url
                        .strip_prefix("http://")
                        .or_else(|| url.strip_prefix("https://"))
                        .map(|rest| rest.split(['/', '?', '#']).next().unwrap_or(""));
                    anyhow::ensure!(
                        authority.is_some_and(|a| !a.is_empty() && !a.contains('@'))
                            && !url.contains(['?', '#'])
                            && !url.contains(char::is_whitespace),
                        "[[tools.mcp]] {name:?}: url {url:?} must be http:// or https:// without \
                         credentials, query or fragment (it is recorded with every call; a token \
                         goes in the variable bearer_token_env names)"
                    );
                    let host = authority.unwrap_or("");
                    let loopback = ["127.0.0.1", "localhost", "[::1]"]
                        .iter()
                        .any(|l| host == *l || host.starts_with(&format!("{l}:")));
                    anyhow::ensure!(
                        tool.bearer_token_env.is_none() || url.starts_with("https://") || loopback,
                        "[[tools.mcp]] {name:?}: a bearer token goes only to an https:// url \
                         (or one on this machine)"
                    );
                    anyhow::ensure!(
                        tool.env.is_empty(),
                        "[[tools.mcp]] {name:?}: env is for a server started as a command"
                    );
                }
                (None, Some(command)) => anyhow::ensure!(
                    command.first().is_some_and(|p| !p.trim().is_empty()),
                    "[[tools.mcp]] {name:?}: command needs a program"
                ),
                _ => anyhow::bail!("[[tools.mcp]] {name:?}: give either url or command"),
            }
            // Tools of one server share its connection, and so its settings.
            if let Some(other) = self.mcp.iter().find(|o| {
                (&o.url, &o.command) == (&tool.url, &tool.command)
                    && (&o.bearer_token_env, &o.env) != (&tool.bearer_token_env, &tool.env)
            }) {
                anyhow::bail!(
                    "[[tools.mcp]] {name:?} and {:?} name one server with different \
                     bearer_token_env or env",
                    other.name
                );
            }
            if let Some(var) = &tool.bearer_token_env {
                anyhow::ensure!(
                    tool.url.is_some(),
                    "[[tools.mcp]] {name:?}: bearer_token_env is for a server at a url"
                );
                anyhow::ensure!(
                    std::env::var_os(var).is_some(),
                    "[[tools.mcp]] {name:?}: the variable {var} (bearer_token_env) is not set"
                );
            }
            for (key, value) in [
                ("tool", &tool.tool),
                ("input_argument", &tool.input_argument),
                ("instruction_argument", &tool.instruction_argument),
            ] {
                anyhow::ensure!(
                    value.as_ref().is_none_or(|v| (1..=128).contains(&v.len())),
                    "[[tools.mcp]] {name:?}: {key} must be 1 to 128 bytes"
                );
            }
            anyhow::ensure!(
                tool.description
                    .as_ref()
                    .is_none_or(|d| !d.trim().is_empty() && d.len() <= 1024),
                "[[tools.mcp]] {name:?}: give a description of at most 1024 bytes"
            );
        }
        Ok(())
    }
}

/// `[limits]`: rates and socket caps.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub credential_per_second: Option<u32>,
    pub credential_burst: Option<u32>,
    pub address_per_second: Option<u32>,
    pub address_burst: Option<u32>,
    pub subscriptions_per_connection: Option<usize>,
    pub connections_per_credential: Option<usize>,
    pub init_timeout_ms: Option<u64>,
    pub ping_interval_ms: Option<u64>,
}

/// `[auth]`: who may call (docs/security.md).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub mode: Option<AuthMode>,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwks: Option<String>,
    pub jwt_hs256_secret_file: Option<std::path::PathBuf>,
    pub roles_claim: Option<String>,
    pub tenant_claim: Option<String>,
    pub allow_self_approval: Option<bool>,
    /// The web console's client id at `jwt_issuer`: with both set, the
    /// console offers sign-in there (authorization code with PKCE).
    pub console_client_id: Option<String>,
    /// The scopes the console asks for (default `openid`).
    pub console_scope: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Off,
    Required,
}

impl AuthSection {
    /// The file's section with `AGENTLEDGER_AUTH_<KEY>` variables over it.
    pub fn with_env(mut self) -> anyhow::Result<Self> {
        let var = |key: &str| std::env::var(format!("AGENTLEDGER_AUTH_{key}")).ok();
        if let Some(mode) = var("MODE") {
            self.mode = Some(match mode.to_ascii_lowercase().as_str() {
                "off" => AuthMode::Off,
                "required" => AuthMode::Required,
                other => anyhow::bail!("AGENTLEDGER_AUTH_MODE is {other:?}: use off or required"),
            });
        }
        let text = |field: &mut Option<String>, key: &str| {
            if let Some(value) = var(key) {
                *field = Some(value);
            }
        };
        text(&mut self.jwt_issuer, "JWT_ISSUER");
        text(&mut self.jwt_audience, "JWT_AUDIENCE");
        text(&mut self.jwks, "JWKS");
        text(&mut self.roles_claim, "ROLES_CLAIM");
        text(&mut self.tenant_claim, "TENANT_CLAIM");
        text(&mut self.console_client_id, "CONSOLE_CLIENT_ID");
        text(&mut self.console_scope, "CONSOLE_SCOPE");
        if let Some(path) = var("JWT_HS256_SECRET_FILE") {
            self.jwt_hs256_secret_file = Some(path.into());
        }
        if let Some(allow) = var("ALLOW_SELF_APPROVAL") {
            self.allow_self_approval = Some(allow.parse().map_err(|_| {
                anyhow::anyhow!(
                    "AGENTLEDGER_AUTH_ALLOW_SELF_APPROVAL is {allow:?}: use true or false"
                )
            })?);
        }
        Ok(self)
    }

    /// The console's sign-in at the issuer, where one is configured.
    pub fn console_oidc(&self) -> Option<agentledger_api::ConsoleOidc> {
        let issuer = self.jwt_issuer.clone()?;
        let client_id = self.console_client_id.clone()?;
        // The button names the issuer's host (`Sign in with id.example.com`).
        let name = reqwest::Url::parse(&issuer)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_else(|| issuer.clone());
        Some(agentledger_api::ConsoleOidc {
            issuer,
            client_id,
            scope: self
                .console_scope
                .clone()
                .unwrap_or_else(|| "openid".into()),
            name,
        })
    }

    /// The authentication settings. Defaults: required in staging and prod
    /// (`hardened`), off otherwise; self-approval only in dev.
    pub fn config(&self, hardened: bool, dev: bool) -> anyhow::Result<agentledger_api::AuthConfig> {
        use agentledger_api::auth::{JwksSource, JwtConfig, Mode};
        let mode = match self.mode {
            Some(AuthMode::Off) => Mode::Off,
            Some(AuthMode::Required) => Mode::Required,
            None if hardened => Mode::Required,
            None => Mode::Off,
        };
        let hs256_secret = match &self.jwt_hs256_secret_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading the HS256 secret {}", path.display()))?
                    .trim_ascii()
                    .to_vec(),
            ),
            None => None,
        };
        let jwks = self
            .jwks
            .as_deref()
            .map(JwksSource::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let jwt = (jwks.is_some() || hs256_secret.is_some()).then(|| JwtConfig {
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            jwks,
            hs256_secret,
            roles_claim: self.roles_claim.clone().unwrap_or_else(|| "roles".into()),
            tenant_claim: self.tenant_claim.clone().unwrap_or_else(|| "tenant".into()),
        });
        Ok(agentledger_api::AuthConfig {
            mode,
            jwt,
            allow_self_approval: self.allow_self_approval.unwrap_or(dev),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    pub personal_fields: Option<Vec<agentledger_domain::privacy::TextField>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub max_body_bytes: Option<usize>,
    pub ready_max_lag: Option<u64>,
    pub request_timeout_ms: Option<u64>,
    pub max_concurrent_requests: Option<usize>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_response_bytes: Option<usize>,
    pub header_read_timeout_ms: Option<u64>,
    pub max_connections: Option<usize>,
    pub checkpoint_origin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlSection {
    pub max_page: Option<usize>,
    pub max_depth: Option<usize>,
    pub max_complexity: Option<usize>,
    pub read_your_writes_ms: Option<u64>,
    /// Answer introspection (`__schema`); default: yes, but not in prod.
    pub introspection: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSection {
    pub max_workflows: Option<usize>,
    pub lease_seconds: Option<u64>,
    pub max_tool_output_bytes: Option<usize>,
    pub orphan_grace_ms: Option<u64>,
    pub record_every_start: Option<bool>,
    pub attempt_timeout_ms: Option<u64>,
    pub analyst: Option<Serving>,
    pub gatekeeper: Option<Serving>,
    pub ethics: Option<Serving>,
}

/// Who makes a role's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Serving {
    /// The reference policy, in the service.
    Builtin,
    /// Workers outside the service, through `claimAgentTask` and
    /// `submitAgentDecision` (role `agent`).
    External,
    /// The model of `[llm]`, with the reference policy as its fallback.
    Llm,
}

impl FileConfig {
    /// Reads `path`; a missing file or a bad key is an error naming it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("in the configuration file {}", path.display()))?;
        config
            .tools
            .check()
            .with_context(|| format!("in the configuration file {}", path.display()))?;
        Ok(config)
    }

    /// The HTTP settings; `dev` also allows loopback browser origins.
    pub fn http(&self, ready_max_lag: Option<u64>, dev: bool) -> agentledger_api::HttpConfig {
        let defaults = agentledger_api::HttpConfig::default();
        let l = &self.limits;
        let d = defaults.limits.clone();
        let rate =
            |per_second: Option<u32>, burst: Option<u32>, d: agentledger_api::limits::Rate| {
                agentledger_api::limits::Rate {
                    per_second: per_second.unwrap_or(d.per_second),
                    burst: burst
                        .or(per_second.map(|p| p.saturating_mul(2)))
                        .unwrap_or(d.burst),
                }
            };
        agentledger_api::HttpConfig {
            max_body_bytes: self
                .server
                .max_body_bytes
                .unwrap_or(defaults.max_body_bytes),
            max_lag: ready_max_lag.or(self.server.ready_max_lag),
            limits: agentledger_api::limits::LimitsConfig {
                per_credential: rate(
                    l.credential_per_second,
                    l.credential_burst,
                    d.per_credential,
                ),
                per_address: rate(l.address_per_second, l.address_burst, d.per_address),
                subscriptions_per_connection: l
                    .subscriptions_per_connection
                    .unwrap_or(d.subscriptions_per_connection),
                connections_per_credential: l
                    .connections_per_credential
                    .unwrap_or(d.connections_per_credential),
                init_timeout: l
                    .init_timeout_ms
                    .map_or(d.init_timeout, Duration::from_millis),
                ping_interval: l
                    .ping_interval_ms
                    .map_or(d.ping_interval, Duration::from_millis),
            },
            request_timeout: self
                .server
                .request_timeout_ms
                .map_or(defaults.request_timeout, Duration::from_millis),
            max_concurrent_requests: self
                .server
                .max_concurrent_requests
                .unwrap_or(defaults.max_concurrent_requests),
            allowed_origins: self.server.allowed_origins.clone().unwrap_or_default(),
            loopback_origins: dev,
            console_oidc: None,
        }
    }

    /// How connections are accepted.
    pub fn connections(&self) -> agentledger_api::ConnectionLimits {
        let defaults = agentledger_api::ConnectionLimits::default();
        agentledger_api::ConnectionLimits {
            header_read_timeout: self
                .server
                .header_read_timeout_ms
                .map_or(defaults.header_read_timeout, Duration::from_millis),
            max_connections: self
                .server
                .max_connections
                .unwrap_or(defaults.max_connections),
        }
    }

    /// The GraphQL limits; introspection is off in prod unless enabled.
    pub fn limits(&self, prod: bool) -> agentledger_api::Limits {
        let defaults = agentledger_api::Limits::default();
        let g = &self.graphql;
        agentledger_api::Limits {
            max_page: g.max_page.unwrap_or(defaults.max_page),
            max_depth: g.max_depth.unwrap_or(defaults.max_depth),
            max_complexity: g.max_complexity.unwrap_or(defaults.max_complexity),
            read_your_writes: g
                .read_your_writes_ms
                .map_or(defaults.read_your_writes, Duration::from_millis),
            introspection: g.introspection.unwrap_or(!prod),
            max_response_bytes: self
                .server
                .max_response_bytes
                .unwrap_or(defaults.max_response_bytes),
            ..defaults
        }
    }

    /// The result cache's settings.
    fn cache(&self) -> agentledger_agents::cache::CacheConfig {
        let defaults = agentledger_agents::cache::CacheConfig::default();
        let c = &self.cache;
        agentledger_agents::cache::CacheConfig {
            enabled: c.enabled.unwrap_or(defaults.enabled),
            max_entries: c.max_entries.unwrap_or(defaults.max_entries),
            max_age: c
                .max_age_seconds
                .map_or(defaults.max_age, Duration::from_secs),
            tools_off: c.tools_off.iter().cloned().collect(),
            roles_off: c
                .roles_off
                .iter()
                .map(|r| match r {
                    CacheRole::Analyst => AgentRole::Analyst,
                    CacheRole::Gatekeeper => AgentRole::Gatekeeper,
                    CacheRole::Ethics => AgentRole::Ethics,
                })
                .collect(),
        }
    }

    /// The model's endpoint, with its key read from `api_key_env`.
    fn llm(&self) -> anyhow::Result<Option<agentledger_agents::LlmConfig>> {
        let Some(llm) = &self.llm else {
            return Ok(None);
        };
        let defaults = agentledger_agents::LlmConfig::default();
        let url = llm.base_url.trim();
        anyhow::ensure!(
            (url.starts_with("http://") || url.starts_with("https://"))
                && !url.contains(['@', '?', '#'])
                && !url.contains(char::is_whitespace),
            "[llm] base_url {url:?}: give an http:// or https:// URL without credentials, query \
             or fragment in it (the key goes in the variable api_key_env names)"
        );
        let retries = llm.retries.unwrap_or(defaults.retries);
        anyhow::ensure!(
            retries <= agentledger_agents::llm::MAX_RETRIES,
            "[llm] retries = {retries}: at most {}",
            agentledger_agents::llm::MAX_RETRIES
        );
        anyhow::ensure!(!llm.model.trim().is_empty(), "[llm] model is empty");
        let api_key = match &llm.api_key_env {
            None => None,
            Some(name) => Some(
                std::env::var(name)
                    .with_context(|| format!("[llm] api_key_env names {name}, which is not set"))?,
            ),
        };
        Ok(Some(agentledger_agents::LlmConfig {
            base_url: url.to_string(),
            model: llm.model.clone(),
            api_key,
            timeout: llm
                .timeout_ms
                .map_or(defaults.timeout, Duration::from_millis),
            max_tokens: llm.max_tokens.unwrap_or(defaults.max_tokens),
            retries,
        }))
    }

    /// The agent runtime's settings; an error for a role served by `"llm"`
    /// without a usable `[llm]`.
    pub fn runtime(
        &self,
        max_workflows: Option<usize>,
    ) -> anyhow::Result<agentledger_agents::RuntimeConfig> {
        let defaults = agentledger_agents::RuntimeConfig::default();
        let llm = self.llm()?;
        anyhow::ensure!(
            self.agents.attempt_timeout_ms != Some(0),
            "[agents] attempt_timeout_ms must be at least 1"
        );
        let serving = [
            (AgentRole::Analyst, self.agents.analyst),
            (AgentRole::Gatekeeper, self.agents.gatekeeper),
            (AgentRole::Ethics, self.agents.ethics),
        ];
        let llm_roles: std::collections::BTreeSet<AgentRole> = serving
            .iter()
            .filter(|(_, s)| *s == Some(Serving::Llm))
            .map(|(role, _)| *role)
            .collect();
        if let (Some(role), None) = (llm_roles.first(), &llm) {
            let key = match role {
                AgentRole::Analyst => "analyst",
                AgentRole::Gatekeeper => "gatekeeper",
                _ => "ethics",
            };
            anyhow::bail!("[agents] {key} = \"llm\" needs an [llm] section (base_url, model)");
        }
        Ok(agentledger_agents::RuntimeConfig {
            llm_roles,
            llm,
            max_workflows: max_workflows
                .or(self.agents.max_workflows)
                .unwrap_or(defaults.max_workflows),
            lease: self
                .agents
                .lease_seconds
                .map_or(defaults.lease, Duration::from_secs),
            orphan_grace: self
                .agents
                .orphan_grace_ms
                .map_or(defaults.orphan_grace, Duration::from_millis),
            personal_fields: self
                .privacy
                .personal_fields
                .clone()
                .unwrap_or(defaults.personal_fields.clone()),
            gitcode: agentledger_domain::policy::gitcode::GitCodeConfig {
                max_output_bytes: self
                    .agents
                    .max_tool_output_bytes
                    .unwrap_or(defaults.gitcode.max_output_bytes),
                attempt_timeout_ms: self
                    .agents
                    .attempt_timeout_ms
                    .unwrap_or(defaults.gitcode.attempt_timeout_ms),
                inline_pure_tools: !self
                    .agents
                    .record_every_start
                    .unwrap_or(!defaults.gitcode.inline_pure_tools),
                ..defaults.gitcode.clone()
            },
            external: serving
                .into_iter()
                .filter(|(_, serving)| *serving == Some(Serving::External))
                .map(|(role, _)| role)
                .collect(),
            external_tools: self
                .tools
                .external
                .iter()
                .map(|t| agentledger_agents::ExternalToolSpec {
                    name: t.name.clone(),
                    description: t.description.clone(),
                    keywords: t.keywords.clone(),
                    deterministic: t.deterministic,
                })
                .collect(),
            mcp_tools: self.tools.mcp.iter().map(McpTool::spec).collect(),
            cache: self.cache(),
            ..defaults
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(toml_text: &str) -> anyhow::Result<Vec<ExternalTool>> {
        let config: FileConfig = toml::from_str(toml_text)?;
        config.tools.check()?;
        Ok(config.tools.external)
    }

    #[test]
    fn external_tools_are_read_and_bad_ones_refused_by_name() {
        let good = tools(
            "[[tools.external]]\nname = \"crm_lookup\"\ndescription = \"CRM\"\nkeywords = [\"고객\"]\n",
        )
        .unwrap();
        assert_eq!(good[0].name, "crm_lookup");
        assert_eq!(good[0].keywords, vec!["고객"]);
        for (text, says) in [
            (
                "name = \"CRM Lookup\"\ndescription = \"x\"\nkeywords = [\"a\"]",
                "a-z",
            ),
            (
                "name = \"crm\"\ndescription = \" \"\nkeywords = [\"a\"]",
                "description",
            ),
            (
                "name = \"crm\"\ndescription = \"x\"\nkeywords = []",
                "keywords",
            ),
            (
                "name = \"crm\"\ndescription = \"x\"\nkeywords = [\"a\"]\nurl = \"x\"",
                "unknown field",
            ),
        ] {
            let error = tools(&format!("[[tools.external]]\n{text}\n")).unwrap_err();
            assert!(format!("{error:#}").contains(says), "{text}: {error:#}");
        }
        let twice = "[[tools.external]]\nname = \"crm\"\ndescription = \"x\"\nkeywords = [\"a\"]\n";
        let error = tools(&format!("{twice}{twice}")).unwrap_err();
        assert!(error.to_string().contains("named twice"), "{error}");
    }

    #[test]
    fn mcp_tools_are_read_and_bad_ones_refused_by_name() {
        let config: FileConfig = toml::from_str(
            "[[tools.mcp]]\nname = \"open_ticket\"\ncommand = [\"python3\", \"server.py\"]\n\
             keywords = [\"ticket\", \"티켓\"]\n\n\
             [[tools.mcp]]\nname = \"search\"\nurl = \"http://127.0.0.1:9000/mcp\"\n\
             tool = \"web_search\"\nkeywords = [\"search\"]\nidempotent = true\n",
        )
        .unwrap();
        config.tools.check().unwrap();
        let specs: Vec<_> = config.tools.mcp.iter().map(McpTool::spec).collect();
        assert_eq!(specs[0].tool, "open_ticket");
        assert_eq!(
            specs[0].description,
            "open_ticket on stdio:python3 server.py"
        );
        assert!(!specs[0].idempotent);
        assert_eq!(specs[1].tool, "web_search");
        assert!(specs[1].idempotent);
        let check = |text: &str| {
            toml::from_str::<FileConfig>(&format!("[[tools.mcp]]\n{text}\n"))
                .map_err(anyhow::Error::from)
                .and_then(|c| c.tools.check())
        };
        for (text, says) in [
            ("name = \"a\"\nkeywords = [\"a\"]", "either url or command"),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"http://x/mcp\"\ncommand = [\"y\"]",
                "either url or command",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"http://user:pw@x/mcp\"",
                "without credentials",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"ftp://x/mcp\"",
                "http:// or https://",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\ncommand = []",
                "needs a program",
            ),
            ("name = \"a\"\nkeywords = []\ncommand = [\"y\"]", "keywords"),
            (
                "name = \"a\"\nkeywords = [\"a\"]\ncommand = [\"y\"]\nbearer_token_env = \"T\"",
                "bearer_token_env is for a server at a url",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"https://x/mcp\"\n\
                 bearer_token_env = \"AGENTLEDGER_TEST_SURELY_UNSET\"",
                "is not set",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\ncommand = [\"y\"]\nheaders = 1",
                "unknown field",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"https://x/mcp?token=s\"",
                "without credentials, query",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"http://mcp.example.com/mcp\"\n\
                 bearer_token_env = \"PATH\"",
                "only to an https:// url",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\nurl = \"https://x/mcp\"\nenv = [\"HOME\"]",
                "env is for a server started as a command",
            ),
            (
                "name = \"a\"\nkeywords = [\"a\"]\ncommand = [\"y\"]\n\n\
                 [[tools.mcp]]\nname = \"b\"\nkeywords = [\"b\"]\ncommand = [\"y\"]\nenv = [\"X\"]",
                "different bearer_token_env or env",
            ),
        ] {
            let error = check(text).unwrap_err();
            assert!(format!("{error:#}").contains(says), "{text}: {error:#}");
        }
        // One name for an external tool and an MCP tool is one too many.
        let error = toml::from_str::<FileConfig>(
            "[[tools.external]]\nname = \"a\"\ndescription = \"x\"\nkeywords = [\"a\"]\n\
             [[tools.mcp]]\nname = \"a\"\ncommand = [\"y\"]\nkeywords = [\"a\"]\n",
        )
        .unwrap()
        .tools
        .check()
        .unwrap_err();
        assert!(error.to_string().contains("named twice"), "{error}");
    }

    #[test]
    fn llm_roles_need_an_endpoint_and_its_key_variable() {
        let runtime = |text: &str| {
            toml::from_str::<FileConfig>(text)
                .map_err(anyhow::Error::from)
                .and_then(|c| c.runtime(None))
        };
        let error = runtime("[agents]\nanalyst = \"llm\"\n").unwrap_err();
        assert!(
            error.to_string().contains("needs an [llm] section"),
            "{error}"
        );
        let endpoint = "[llm]\nbase_url = \"http://127.0.0.1:11434/v1\"\nmodel = \"m\"\n";
        let error = runtime(&format!(
            "[agents]\ngatekeeper = \"llm\"\n{endpoint}api_key_env = \"AGENTLEDGER_TEST_UNSET_KEY_VAR\"\n"
        ))
        .unwrap_err();
        assert!(
            error.to_string().contains("AGENTLEDGER_TEST_UNSET_KEY_VAR"),
            "{error}"
        );
        let error = runtime(
            "[llm]\nbase_url = \"https://user:secret@api.example.com/v1\"\nmodel = \"m\"\n",
        )
        .unwrap_err();
        assert!(error.to_string().contains("without credentials"), "{error}");
        let config = runtime(&format!(
            "[agents]\ngatekeeper = \"llm\"\nethics = \"external\"\n{endpoint}timeout_ms = 1500\n"
        ))
        .unwrap();
        assert_eq!(
            config.llm_roles.into_iter().collect::<Vec<_>>(),
            vec![AgentRole::Gatekeeper]
        );
        let llm = config.llm.unwrap();
        assert_eq!(
            (llm.model.as_str(), llm.timeout),
            ("m", Duration::from_millis(1500))
        );
        assert!(llm.api_key.is_none());
        assert!(config.external.contains(&AgentRole::Ethics));
    }
}
