//! Tools as the runtime runs them: an async trait with a deadline and a
//! cancellation token, a registry of the built-in tools plus any a
//! deployment adds.

use std::sync::Arc;

use agentledger_domain::tools::{BuiltinTool, ToolError, ToolInput, ToolSpec, BUILTIN_TOOLS};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a tool is asked to do.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub workflow: Uuid,
    pub subtask: String,
    /// 1 to 3.
    pub attempt: u8,
    /// The workflow's tenant.
    pub tenant: String,
    /// The subtask's title.
    pub instruction: String,
    /// The dependencies' outputs, else the input document, else the request.
    pub input: String,
    /// When the executor stops waiting for this attempt.
    pub deadline: chrono::DateTime<chrono::Utc>,
    /// Cancelled when the attempt's deadline passes or the runtime stops; a
    /// tool doing slow work should stop when it fires.
    pub cancel: CancellationToken,
    /// For a tool that declares its calls ([`Tool::intent`]): the call as
    /// recorded before this attempt started. The tool must send exactly
    /// these arguments, with this key.
    pub declared: Option<DeclaredCall>,
}

/// A call a tool will make outside the process, as it declares it before
/// the attempt starts ([`Tool::intent`]); the executor records its hash.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPlan {
    /// Where the call goes (the server's URL or command line).
    pub server: String,
    /// The tool's name there.
    pub tool: String,
    pub arguments: serde_json::Map<String, serde_json::Value>,
    /// Declared safe to call again with the same arguments.
    pub idempotent: bool,
}

/// A declared call as recorded: its arguments and the idempotency key to
/// send with them (the id of the event recording the intent).
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredCall {
    pub idempotency_key: Uuid,
    pub arguments: serde_json::Map<String, serde_json::Value>,
}

/// Why a tool gave no output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolFailure {
    /// Something went wrong; another attempt may succeed.
    #[error("{0}")]
    Error(String),
    /// The input cannot be processed; another attempt would fail the same way.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The call went out and its answer was lost (the connection broke):
    /// whether it acted is unknown. Recorded as abandoned; a declared call
    /// of a tool not idempotent then waits for a person.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

/// A tool the executor can run. Implement it to plug in your own (an HTTP
/// call, a model); its [`ToolSpec`] keywords make Sena choose it.
#[async_trait]
pub trait Tool: Send + Sync + 'static {
    /// Name, description and keywords.
    fn spec(&self) -> ToolSpec;
    /// Runs one attempt. The executor enforces the deadline; the tool should
    /// also watch [`ToolCall::cancel`] if it can stop early.
    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure>;
    /// True for a tool without side effects whose output depends on its
    /// call alone (the built-ins): the executor may run it before recording
    /// its start, and record start and result in one append, since a crash
    /// in between only means it runs again. The default is false: the start
    /// of every attempt is recorded before the tool is called.
    fn pure(&self) -> bool {
        false
    }
    /// True for a tool served by external workers through the API
    /// (`claimToolCall`); the runtime registers these itself.
    fn external(&self) -> bool {
        false
    }
    /// True when the same instruction and input always give the same
    /// output, so that the result cache may reuse a recorded one (when it
    /// is on). Pure tools are.
    fn deterministic(&self) -> bool {
        self.pure()
    }
    /// Where its results come from, as the result cache keys them apart:
    /// `builtin`, `external`, or (an MCP tool) `mcp:<server>`.
    fn origin(&self) -> String {
        if self.external() {
            "external"
        } else {
            "builtin"
        }
        .to_string()
    }
    /// For a tool whose calls act outside the process where nothing can
    /// take them back (an MCP server's): the call it would make for this
    /// instruction and input. The executor records it as the attempt's
    /// intent (server, tool, a hash of the arguments, an idempotency key)
    /// before the attempt starts, and hands it to [`Tool::run`] in
    /// [`ToolCall::declared`]. An error here fails the attempt as [`run`]
    /// would. The default, `None`, records no intent.
    ///
    /// [`run`]: Tool::run
    async fn intent(
        &self,
        instruction: &str,
        input: &str,
    ) -> Option<Result<CallPlan, ToolFailure>> {
        let _ = (instruction, input);
        None
    }
}

/// Inputs above this size run on the blocking pool, off the async workers.
const BLOCKING_INPUT_BYTES: usize = 64 * 1024;

struct Builtin(&'static BuiltinTool);

#[async_trait]
impl Tool for Builtin {
    fn spec(&self) -> ToolSpec {
        self.0.spec
    }

    fn pure(&self) -> bool {
        true
    }

    async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
        let run = self.0.run;
        let blocking = call.input.len() >= BLOCKING_INPUT_BYTES;
        let invoke = move || {
            run(&ToolInput {
                instruction: &call.instruction,
                input: &call.input,
            })
            .map_err(|ToolError::BadInput(why)| ToolFailure::Invalid(why))
        };
        if !blocking {
            invoke()
        } else {
            tokio::task::spawn_blocking(invoke)
                .await
                .map_err(|e| ToolFailure::Error(format!("the tool stopped: {e}")))?
        }
    }
}

/// The tools Sena may choose from and GitCode runs, by name.
#[derive(Clone)]
pub struct ToolRegistry {
    tools: Vec<Arc<dyn Tool>>,
}

impl Default for ToolRegistry {
    /// The built-in tools.
    fn default() -> Self {
        Self {
            tools: BUILTIN_TOOLS
                .iter()
                .map(|t| Arc::new(Builtin(t)) as Arc<dyn Tool>)
                .collect(),
        }
    }
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.tools.iter().map(|t| t.spec().name))
            .finish()
    }
}

impl ToolRegistry {
    /// No tools at all.
    pub fn empty() -> Self {
        Self { tools: Vec::new() }
    }

    /// Adds `tool`, replacing one of the same name. Added tools come first
    /// when Sena breaks a tie.
    pub fn register(mut self, tool: impl Tool) -> Self {
        let name = tool.spec().name;
        self.tools.retain(|t| t.spec().name != name);
        self.tools.insert(0, Arc::new(tool));
        self
    }

    /// The tool named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools.iter().find(|t| t.spec().name == name)
    }

    /// Every tool's spec, in selection order.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec()).collect()
    }

    /// Every tool's name, in selection order.
    pub fn names(&self) -> Vec<&'static str> {
        self.tools.iter().map(|t| t.spec().name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(instruction: &str, input: &str) -> ToolCall {
        ToolCall {
            workflow: Uuid::nil(),
            subtask: "st-1".into(),
            attempt: 1,
            tenant: "default".into(),
            instruction: instruction.into(),
            deadline: chrono::Utc::now(),
            input: input.into(),
            cancel: CancellationToken::new(),
            declared: None,
        }
    }

    struct Echo;

    #[async_trait]
    impl Tool for Echo {
        fn spec(&self) -> ToolSpec {
            ToolSpec {
                name: "summarize",
                description: "echo",
                keywords: &["echo"],
            }
        }
        async fn run(&self, call: ToolCall) -> Result<String, ToolFailure> {
            Ok(call.input)
        }
    }

    #[tokio::test]
    async fn builtins_run_and_refuse_bad_input_as_invalid() {
        let registry = ToolRegistry::default();
        let calc = registry.get("calculate").unwrap();
        assert_eq!(calc.run(call("Compute 2 + 3", "")).await.unwrap(), "5");
        assert!(matches!(
            calc.run(call("nothing", "")).await,
            Err(ToolFailure::Invalid(_))
        ));
        let big = "숫자 1. ".repeat(20_000);
        let stats = registry.get("text_stats").unwrap();
        assert!(stats
            .run(call("count", &big))
            .await
            .unwrap()
            .contains("words"));
    }

    #[tokio::test]
    async fn a_registered_tool_replaces_one_of_the_same_name() {
        let registry = ToolRegistry::default().register(Echo);
        assert_eq!(registry.names().len(), BUILTIN_TOOLS.len());
        assert_eq!(registry.names()[0], "summarize");
        let out = registry
            .get("summarize")
            .unwrap()
            .run(call("x", "안녕"))
            .await;
        assert_eq!(out.unwrap(), "안녕");
    }
}
