//! `serve`'s configuration: defaults, then an optional TOML file
//! (`--config` / `AGENTLEDGER_CONFIG`), then flags and environment
//! variables, which win. Unknown keys in the file are an error, so a typo
//! never passes silently.
//!
//! ```toml
//! [server]
//! max_body_bytes = 2097152   # GraphQL request body limit
//! ready_max_lag = 10000      # /ready fails when a projection lags more events
//!
//! [graphql]
//! max_page = 100
//! max_depth = 12
//! max_complexity = 2000
//! read_your_writes_ms = 5000
//!
//! [agents]
//! max_workflows = 64         # workflows driven at once by this process
//! lease_seconds = 30
//!
//! [privacy]
//! # Free text sealed under the data subject's key when a workflow is
//! # submitted with a subjectId (default: all of these).
//! personal_fields = ["request", "input", "subtask_title", "rationale", "comment", "output",
//!                    "cancel_reason", "reason", "error"]
//! ```

use std::path::Path;
use std::time::Duration;

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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlSection {
    pub max_page: Option<usize>,
    pub max_depth: Option<usize>,
    pub max_complexity: Option<usize>,
    pub read_your_writes_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSection {
    pub max_workflows: Option<usize>,
    pub lease_seconds: Option<u64>,
}

impl FileConfig {
    /// Reads `path`; a missing file or a bad key is an error naming it.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("in the configuration file {}", path.display()))
    }

    /// The HTTP settings.
    pub fn http(&self, ready_max_lag: Option<u64>) -> agentledger_api::HttpConfig {
        let defaults = agentledger_api::HttpConfig::default();
        agentledger_api::HttpConfig {
            max_body_bytes: self
                .server
                .max_body_bytes
                .unwrap_or(defaults.max_body_bytes),
            max_lag: ready_max_lag.or(self.server.ready_max_lag),
        }
    }

    /// The GraphQL limits.
    pub fn limits(&self) -> agentledger_api::Limits {
        let defaults = agentledger_api::Limits::default();
        let g = &self.graphql;
        agentledger_api::Limits {
            max_page: g.max_page.unwrap_or(defaults.max_page),
            max_depth: g.max_depth.unwrap_or(defaults.max_depth),
            max_complexity: g.max_complexity.unwrap_or(defaults.max_complexity),
            read_your_writes: g
                .read_your_writes_ms
                .map_or(defaults.read_your_writes, Duration::from_millis),
        }
    }

    /// The agent runtime's settings.
    pub fn runtime(&self, max_workflows: Option<usize>) -> agentledger_agents::RuntimeConfig {
        let defaults = agentledger_agents::RuntimeConfig::default();
        agentledger_agents::RuntimeConfig {
            max_workflows: max_workflows
                .or(self.agents.max_workflows)
                .unwrap_or(defaults.max_workflows),
            lease: self
                .agents
                .lease_seconds
                .map_or(defaults.lease, Duration::from_secs),
            personal_fields: self
                .privacy
                .personal_fields
                .clone()
                .unwrap_or(defaults.personal_fields.clone()),
            ..defaults
        }
    }
}
