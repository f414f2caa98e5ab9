//! What an agent outside the service may decide, per role: the JSON Schema
//! published to workers (`agentDecisionSchema`), and the checks that turn a
//! decision into the domain's command, or into an [`InvalidDecision`] that
//! names the path that failed. Nothing is written for a refused decision.
//!
//! The schema bounds every list and text (a hostile worker cannot send a
//! million subtasks); what a schema cannot say (unique ids, known and
//! acyclic dependencies) is checked after it.

use std::collections::HashMap;

use agentledger_domain::names::AgentRole;
use agentledger_domain::policy::lubit;
use agentledger_domain::workflow::{
    Command, EthicsScores, Priority, SubtaskPlan, Text, Verdict, MAX_REVISIONS,
};
use serde_json::{json, Value};

/// Most subtasks in one analysis (the gatekeeper's own limit may be lower).
pub const MAX_SUBTASKS: usize = 100;
/// Most items in a list of reasons or findings.
pub const MAX_ITEMS: usize = 50;
/// Longest rationale, title, reason or finding, in characters.
pub const MAX_TEXT: usize = 8 * 1024;

/// A decision that breaks its role's schema or rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the decision is invalid at {path} ({schema_path}): {message}")]
pub struct InvalidDecision {
    /// JSON Pointer into the decision (`/subtasks/0/tool`; empty for the whole).
    pub path: String,
    /// JSON Pointer into the schema of the rule that failed.
    pub schema_path: String,
    pub message: String,
}

/// The schemas of the three decision roles, compiled once per runtime
/// (the analyst's names the tools this server has).
pub struct Decisions {
    roles: HashMap<AgentRole, (Value, jsonschema::Validator)>,
}

impl std::fmt::Debug for Decisions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decisions").finish_non_exhaustive()
    }
}

/// The roles an agent outside the service can serve by deciding (the
/// executor's scheduling stays built in; its tools are pluggable instead).
pub const DECIDING_ROLES: [AgentRole; 3] =
    [AgentRole::Analyst, AgentRole::Gatekeeper, AgentRole::Ethics];

impl Decisions {
    /// Schemas for a server whose registered tools are `tools`.
    pub fn new(tools: &[&str]) -> Self {
        let roles = DECIDING_ROLES
            .into_iter()
            .map(|role| {
                let schema = schema(role, tools);
                let validator =
                    jsonschema::validator_for(&schema).expect("the decision schemas are valid");
                (role, (schema, validator))
            })
            .collect();
        Self { roles }
    }

    /// The JSON Schema of `role`'s decisions; `None` for the executor.
    pub fn schema(&self, role: AgentRole) -> Option<&Value> {
        self.roles.get(&role).map(|(schema, _)| schema)
    }

    /// Checks `decision` for `role` and turns it into the domain's command.
    pub fn parse(&self, role: AgentRole, decision: &Value) -> Result<Command, InvalidDecision> {
        let Some((_, validator)) = self.roles.get(&role) else {
            return Err(invalid(
                "",
                "",
                format!("the {} role takes no decisions", role.as_str()),
            ));
        };
        if let Err(e) = validator.validate(decision) {
            return Err(InvalidDecision {
                path: e.instance_path().to_string(),
                schema_path: e.schema_path().to_string(),
                message: e.to_string(),
            });
        }
        // The schema has checked every shape and bound below.
        let text = |key: &str| decision[key].as_str().unwrap_or_default().to_string();
        let number = |key: &str| decision[key].as_f64().unwrap_or_default();
        let strings = |key: &str| -> Vec<String> {
            decision[key]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        match role {
            AgentRole::Analyst => {
                let subtasks: Vec<SubtaskPlan> = decision["subtasks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| SubtaskPlan {
                        id: s["id"].as_str().unwrap_or_default().to_string(),
                        title: Text::new(s["title"].as_str().unwrap_or_default()),
                        tool: s["tool"].as_str().unwrap_or_default().to_string(),
                        depends_on: s["dependsOn"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|d| d.as_str().map(str::to_string))
                            .collect(),
                    })
                    .collect();
                if let Some(problem) = lubit::graph_problems(&subtasks).into_iter().next() {
                    return Err(invalid("/subtasks", "", problem));
                }
                Ok(Command::RecordAnalysis {
                    model: None,
                    subtasks,
                    confidence: number("confidence"),
                    rationale: Text::new(text("rationale")),
                })
            }
            AgentRole::Gatekeeper => Ok(Command::RecordGate {
                model: None,
                verdict: match decision["verdict"].as_str() {
                    Some("APPROVE") => Verdict::Approve,
                    Some("REJECT") => Verdict::Reject,
                    Some("REVISE") => Verdict::Revise,
                    _ => Verdict::Escalate,
                },
                priority: match decision["priority"].as_str() {
                    Some("LOW") => Priority::Low,
                    Some("HIGH") => Priority::High,
                    Some("CRITICAL") => Priority::Critical,
                    _ => Priority::Normal,
                },
                risk: number("risk"),
                reasons: strings("reasons"),
                rationale: Text::new(text("rationale")),
            }),
            AgentRole::Ethics => Ok(Command::RecordEthics {
                model: None,
                scores: EthicsScores {
                    transparency: number("transparency"),
                    collaboration: number("collaboration"),
                    autonomy: number("autonomy"),
                    fairness: number("fairness"),
                },
                passed: decision["passed"].as_bool().unwrap_or_default(),
                findings: strings("findings"),
                rationale: Some(Text::new(text("rationale"))),
            }),
            AgentRole::Executor => unreachable!("no schema, refused above"),
        }
    }
}

fn invalid(path: &str, schema_path: &str, message: impl Into<String>) -> InvalidDecision {
    InvalidDecision {
        path: path.into(),
        schema_path: schema_path.into(),
        message: message.into(),
    }
}

fn bounded_text(min: usize) -> Value {
    json!({ "type": "string", "minLength": min, "maxLength": MAX_TEXT })
}

fn unit(description: &str) -> Value {
    json!({ "type": "number", "minimum": 0, "maximum": 1, "description": description })
}

fn texts(description: &str) -> Value {
    json!({
        "type": "array",
        "maxItems": MAX_ITEMS,
        "items": bounded_text(1),
        "description": description,
    })
}

/// The JSON Schema (draft 2020-12) of `role`'s decisions on a server with
/// `tools`.
fn schema(role: AgentRole, tools: &[&str]) -> Value {
    let (title, required, properties) = match role {
        AgentRole::Analyst => (
            "ANALYST decision: the plan of subtasks",
            json!(["subtasks", "confidence", "rationale"]),
            json!({
                "subtasks": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_SUBTASKS,
                    "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["id", "title", "tool"],
                        "properties": {
                            "id": { "type": "string", "minLength": 1, "maxLength": 64 },
                            "title": bounded_text(1),
                            "tool": { "enum": tools, "description": "A tool registered on this server." },
                            "dependsOn": {
                                "type": "array",
                                "maxItems": MAX_SUBTASKS,
                                "uniqueItems": true,
                                "items": { "type": "string", "minLength": 1, "maxLength": 64 },
                                "description": "Ids of subtasks whose outputs this one takes; acyclic."
                            }
                        }
                    }
                },
                "confidence": unit("How sure the analyst is of the plan."),
                "rationale": bounded_text(0),
            }),
        ),
        AgentRole::Gatekeeper => (
            "GATEKEEPER decision: the verdict on the analysis",
            json!(["verdict", "priority", "risk", "reasons", "rationale"]),
            json!({
                "verdict": {
                    "enum": ["APPROVE", "REJECT", "REVISE", "ESCALATE"],
                    "description": format!("REVISE sends the plan back to the analyst, at most {MAX_REVISIONS} times; ESCALATE asks a person.")
                },
                "priority": { "enum": ["LOW", "NORMAL", "HIGH", "CRITICAL"] },
                "risk": unit("0 harmless, 1 dangerous."),
                "reasons": texts("Why, one short item each."),
                "rationale": bounded_text(0),
            }),
        ),
        AgentRole::Ethics | AgentRole::Executor => (
            "ETHICS decision: the review of the finished work",
            json!([
                "transparency",
                "collaboration",
                "autonomy",
                "fairness",
                "passed",
                "findings",
                "rationale"
            ]),
            json!({
                "transparency": unit("Is every decision explained?"),
                "collaboration": unit("Did the agents work from each other's output?"),
                "autonomy": unit("Did people keep the decisions that are theirs?"),
                "fairness": unit("Is the result free of unjustified bias?"),
                "passed": { "type": "boolean", "description": "False flags the workflow for a person." },
                "findings": texts("What a reviewer should look at."),
                "rationale": bounded_text(0),
            }),
        ),
    };
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": title,
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decisions() -> Decisions {
        Decisions::new(&["summarize", "word_count"])
    }

    #[test]
    fn a_valid_plan_becomes_an_analysis() {
        let command = decisions()
            .parse(
                AgentRole::Analyst,
                &json!({
                    "subtasks": [
                        { "id": "a", "title": "요약", "tool": "summarize" },
                        { "id": "b", "title": "count", "tool": "word_count", "dependsOn": ["a"] }
                    ],
                    "confidence": 0.8,
                    "rationale": "두 단계"
                }),
            )
            .unwrap();
        let Command::RecordAnalysis { subtasks, .. } = command else {
            panic!("not an analysis: {command:?}");
        };
        assert_eq!(subtasks[1].depends_on, ["a"]);
        assert_eq!(subtasks[0].title.as_str(), "요약");
    }

    #[test]
    fn refusals_name_the_path_that_failed() {
        let d = decisions();
        let cases = [
            (
                AgentRole::Analyst,
                json!({ "subtasks": [{ "id": "a", "title": "t", "tool": "rm_rf" }], "confidence": 0.5, "rationale": "" }),
                "/subtasks/0/tool",
            ),
            (
                AgentRole::Analyst,
                json!({ "subtasks": [{ "id": "a", "title": "t", "tool": "summarize", "dependsOn": ["a"] }], "confidence": 0.5, "rationale": "" }),
                "/subtasks",
            ),
            (
                AgentRole::Gatekeeper,
                json!({ "verdict": "MAYBE", "priority": "LOW", "risk": 0.1, "reasons": [], "rationale": "" }),
                "/verdict",
            ),
            (
                AgentRole::Gatekeeper,
                json!({ "verdict": "APPROVE", "priority": "LOW", "risk": 1.5, "reasons": [], "rationale": "" }),
                "/risk",
            ),
            (
                AgentRole::Ethics,
                json!({ "transparency": 1, "collaboration": 1, "autonomy": 1, "fairness": 1, "passed": "yes", "findings": [], "rationale": "" }),
                "/passed",
            ),
            (
                AgentRole::Ethics,
                json!({ "transparency": 1, "collaboration": 1, "autonomy": 1, "fairness": 1, "passed": true, "findings": [], "rationale": "", "extra": 1 }),
                "",
            ),
        ];
        for (role, decision, path) in cases {
            let refused = d.parse(role, &decision).unwrap_err();
            assert_eq!(refused.path, path, "{role:?} {decision}: {refused}");
        }
        let cycle = d
            .parse(
                AgentRole::Analyst,
                &json!({ "subtasks": [
                    { "id": "a", "title": "t", "tool": "summarize", "dependsOn": ["b"] },
                    { "id": "b", "title": "t", "tool": "summarize", "dependsOn": ["a"] }
                ], "confidence": 0.5, "rationale": "" }),
            )
            .unwrap_err();
        assert!(cycle.message.contains("cycle"), "{cycle}");
        assert!(d
            .parse(AgentRole::Executor, &json!({}))
            .unwrap_err()
            .message
            .contains("no decisions"));
    }

    #[test]
    fn the_schema_bounds_lists_and_texts() {
        let d = decisions();
        let many: Vec<Value> = (0..=MAX_SUBTASKS)
            .map(|i| json!({ "id": format!("s{i}"), "title": "t", "tool": "summarize" }))
            .collect();
        let refused = d
            .parse(
                AgentRole::Analyst,
                &json!({ "subtasks": many, "confidence": 0.5, "rationale": "" }),
            )
            .unwrap_err();
        assert_eq!(refused.path, "/subtasks");
        let long = "x".repeat(MAX_TEXT + 1);
        let refused = d
            .parse(
                AgentRole::Gatekeeper,
                &json!({ "verdict": "APPROVE", "priority": "LOW", "risk": 0, "reasons": [], "rationale": long }),
            )
            .unwrap_err();
        assert_eq!(refused.path, "/rationale");
    }
}
