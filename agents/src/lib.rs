//! The agentledger agent runtime: it makes workflows run. Workers claim
//! workflows from a task queue (PostgreSQL with `FOR UPDATE SKIP LOCKED`, or
//! in memory), fold each one's stream, run the agent whose turn it is (the
//! reference policies of `agentledger-domain`, tools through the async
//! [`Tool`] trait with deadlines and cancellation), and append the decision
//! with the version they read.
//!
//! Depends on `agentledger-domain` and `agentledger-eventstore`. Must never:
//! decide anything itself (decisions are the policies'), record a decision
//! without the expected version it read, or read the wall clock directly
//! (time comes from the injected [`Clock`]).

pub mod cache;
pub mod clock;
pub mod decision;
pub mod faults;
pub mod llm;
pub mod mcp;
pub mod queue;
pub mod runtime;
pub mod tool;
pub mod trace;

pub use clock::{Clock, ManualClock, SystemClock};
pub use faults::{FaultPlan, FaultPoint};
pub use llm::LlmConfig;
pub use mcp::{McpServer, McpToolSpec};
pub use queue::{InMemoryWorkQueue, PostgresWorkQueue, WorkQueue};
pub use runtime::{
    call_id, fingerprint, stream_of, workflow_id_for_key, AgentTask, CallAnswer, DeclaredPolicy,
    ExternalToolSpec, History, HumanDecision, Runtime, RuntimeConfig, RuntimeError, Submission,
    Submitted, TaskId, Worker, MAX_CALL_ERROR, MAX_CLAIM_TOOLS, PRIVACY_STREAM, STREAM_PREFIX,
};
pub use tool::{CallPlan, DeclaredCall, Tool, ToolCall, ToolFailure, ToolRegistry};
