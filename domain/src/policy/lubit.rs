//! Lubit, the gatekeeper: checks an analysis, scores its risk, sets the
//! priority and decides. See the [module docs](super) for the policy in words.

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::text;
use crate::workflow::{Priority, SubtaskPlan, Text, Verdict, MAX_REQUEST_BYTES, MAX_REVISIONS};

/// Lubit's configuration (part of its policy fingerprint).
#[derive(Debug, Clone, Serialize)]
pub struct LubitConfig {
    /// Most subtasks an analysis may have.
    pub max_subtasks: usize,
    /// Longest request, in bytes of UTF-8.
    pub max_request_bytes: usize,
    /// Tools a plan may use; `None` allows every registered tool.
    pub allowed_tools: Option<BTreeSet<String>>,
    /// Words that make a request risky enough for a person to see
    /// (matched as word beginnings, case-insensitive).
    pub high_risk_terms: Vec<String>,
    /// Words that raise the priority one level.
    pub urgent_terms: Vec<String>,
    /// Risk at or above which Lubit escalates to a person.
    pub escalate_at_risk: f64,
}

impl Default for LubitConfig {
    fn default() -> Self {
        let words = |list: &[&str]| list.iter().map(|s| s.to_string()).collect();
        Self {
            max_subtasks: 20,
            max_request_bytes: MAX_REQUEST_BYTES,
            allowed_tools: None,
            high_risk_terms: words(&[
                "delete",
                "erase",
                "wipe",
                "destroy",
                "truncate",
                "shutdown",
                "password",
                "credential",
                "삭제",
                "폐기",
                "파기",
                "비밀번호",
            ]),
            urgent_terms: words(&["urgent", "asap", "immediately", "긴급", "즉시", "급히"]),
            escalate_at_risk: 0.7,
        }
    }
}

/// What Lubit looks at.
#[derive(Debug, Clone, Copy)]
pub struct GateInput<'a> {
    pub request: &'a str,
    /// The analysis round (0, then 1 and 2 after revisions).
    pub round: u8,
    pub subtasks: &'a [SubtaskPlan],
    pub confidence: f64,
    /// The priority the submitter gave.
    pub priority: Priority,
    /// Names of the tools in the registry.
    pub registered: &'a [&'a str],
}

/// Lubit's decision.
#[derive(Debug, Clone, PartialEq)]
pub struct GateDecision {
    pub verdict: Verdict,
    pub priority: Priority,
    /// In [0, 1].
    pub risk: f64,
    /// What failed a check or raised the risk; for a revision, what to change.
    pub reasons: Vec<String>,
    pub rationale: Text,
}

/// Decides on an analysis; see the module docs for the order of the checks.
pub fn decide(config: &LubitConfig, input: &GateInput<'_>) -> GateDecision {
    let (risk, risk_reasons) = risk(config, input);
    let priority = priority(config, input);
    let can_revise = input.round < MAX_REVISIONS;
    let (verdict, reasons) = if let Some(reasons) = limits(config, input) {
        (Verdict::Reject, reasons)
    } else if risk >= config.escalate_at_risk {
        // A person sees a risky request even when its plan needs work.
        (Verdict::Escalate, risk_reasons)
    } else {
        match plan_problems(config, input) {
            Problem::None => (Verdict::Approve, Vec::new()),
            Problem::Fatal(reasons) => (Verdict::Reject, reasons),
            Problem::Fixable(reasons) if can_revise => (Verdict::Revise, reasons),
            Problem::Fixable(mut reasons) => {
                reasons.push(format!("still unfixed after {MAX_REVISIONS} revisions"));
                (Verdict::Reject, reasons)
            }
        }
    };
    let rationale = match verdict {
        Verdict::Approve => format!(
            "{} subtask(s), dependencies acyclic, tools registered and allowed; risk {risk:.2} below {:.2}; priority {priority:?}",
            input.subtasks.len(),
            config.escalate_at_risk
        ),
        Verdict::Escalate => format!(
            "risk {risk:.2} at or above {:.2}: a person decides ({})",
            config.escalate_at_risk,
            reasons.join("; ")
        ),
        Verdict::Revise => format!("revision {} of {MAX_REVISIONS} asked: {}", input.round + 1, reasons.join("; ")),
        Verdict::Reject => format!("rejected: {}", reasons.join("; ")),
    };
    GateDecision {
        verdict,
        priority,
        risk,
        reasons,
        rationale: Text::new(rationale),
    }
}

enum Problem {
    None,
    /// Sena can fix it in a revision.
    Fixable(Vec<String>),
    /// No revision can fix it.
    Fatal(Vec<String>),
}

/// The hard limits: request size, an empty plan, too many subtasks.
fn limits(config: &LubitConfig, input: &GateInput<'_>) -> Option<Vec<String>> {
    let size = input.request.len();
    if size > config.max_request_bytes {
        return Some(vec![format!(
            "the request is {size} bytes; the limit is {}",
            config.max_request_bytes
        )]);
    }
    if input.subtasks.is_empty() {
        return Some(vec!["the analysis has no subtasks".into()]);
    }
    if input.subtasks.len() > config.max_subtasks {
        return Some(vec![format!(
            "{} subtasks; at most {} are allowed",
            input.subtasks.len(),
            config.max_subtasks
        )]);
    }
    None
}

/// The plan's graph and tools.
fn plan_problems(config: &LubitConfig, input: &GateInput<'_>) -> Problem {
    let mut fatal = Vec::new();
    let mut fixable = graph_problems(input.subtasks);
    let toolless: Vec<&str> = input
        .subtasks
        .iter()
        .filter(|s| s.tool.is_empty())
        .map(|s| s.id.as_str())
        .collect();
    if toolless.len() == input.subtasks.len() {
        fatal.push(format!(
            "no registered tool can do what is asked ({})",
            input.subtasks[0]
                .title
                .as_str()
                .chars()
                .take(80)
                .collect::<String>()
        ));
    } else if !toolless.is_empty() {
        fixable.push(format!(
            "{} ha(s) no tool: name one or drop it",
            toolless.join(", ")
        ));
    }
    for subtask in input.subtasks.iter().filter(|s| !s.tool.is_empty()) {
        if !input.registered.contains(&subtask.tool.as_str()) {
            fixable.push(format!(
                "{}: tool {:?} is not registered",
                subtask.id, subtask.tool
            ));
        } else if let Some(allowed) = &config.allowed_tools {
            if !allowed.contains(&subtask.tool) {
                fatal.push(format!(
                    "{}: tool {:?} is not allowed by policy",
                    subtask.id, subtask.tool
                ));
            }
        }
    }
    match (fatal.is_empty(), fixable.is_empty()) {
        (false, _) => {
            fatal.extend(fixable);
            Problem::Fatal(fatal)
        }
        (true, false) => Problem::Fixable(fixable),
        (true, true) => Problem::None,
    }
}

/// Duplicate ids, unknown or self dependencies, and cycles: what makes a
/// plan impossible to schedule, whoever proposed it.
pub fn graph_problems(subtasks: &[SubtaskPlan]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut ids = HashSet::new();
    for s in subtasks {
        if !ids.insert(s.id.as_str()) {
            problems.push(format!("subtask id {} is used twice", s.id));
        }
    }
    for s in subtasks {
        for dep in &s.depends_on {
            if dep == &s.id {
                problems.push(format!("{} depends on itself", s.id));
            } else if !ids.contains(dep.as_str()) {
                problems.push(format!("{} depends on unknown {dep}", s.id));
            }
        }
    }
    if let Some(cycle) = find_cycle(subtasks) {
        problems.push(format!("dependency cycle: {}", cycle.join(" → ")));
    }
    problems
}

/// A dependency cycle, as the ids along it, if there is one.
fn find_cycle(subtasks: &[SubtaskPlan]) -> Option<Vec<String>> {
    let deps: HashMap<&str, &[String]> = subtasks
        .iter()
        .map(|s| (s.id.as_str(), s.depends_on.as_slice()))
        .collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    let mut marks: HashMap<&str, Mark> = HashMap::new();
    // Iterative depth-first search: a plan from an external analyst may be deep.
    for start in subtasks.iter().map(|s| s.id.as_str()) {
        if marks.contains_key(start) {
            continue;
        }
        let mut path: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::Open);
        while let Some((node, next)) = path.last_mut() {
            let node_deps = deps.get(node).copied().unwrap_or_default();
            if let Some(dep) = node_deps.get(*next) {
                *next += 1;
                let dep = dep.as_str();
                if !deps.contains_key(dep) || dep == *node {
                    continue; // reported as unknown or self dependency
                }
                match marks.get(dep) {
                    Some(Mark::Open) => {
                        let from = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                        let mut cycle: Vec<String> =
                            path[from..].iter().map(|(n, _)| n.to_string()).collect();
                        cycle.push(dep.to_string());
                        return Some(cycle);
                    }
                    Some(Mark::Done) => {}
                    None => {
                        marks.insert(dep, Mark::Open);
                        path.push((dep, 0));
                    }
                }
            } else {
                marks.insert(node, Mark::Done);
                path.pop();
            }
        }
    }
    None
}

/// Base 0.1; +0.6 when the request or a subtask uses a high-risk term;
/// +0.2 when Sena's confidence is below 0.5; +0.1 for more than 10 subtasks.
fn risk(config: &LubitConfig, input: &GateInput<'_>) -> (f64, Vec<String>) {
    let mut risk: f64 = 0.1;
    let mut reasons = Vec::new();
    let mut texts = vec![input.request];
    texts.extend(input.subtasks.iter().map(|s| s.title.as_str()));
    let hits = matching_terms(&texts, &config.high_risk_terms);
    if !hits.is_empty() {
        risk += 0.6;
        reasons.push(format!("high-risk terms: {}", hits.join(", ")));
    }
    if input.confidence < 0.5 {
        risk += 0.2;
        reasons.push(format!(
            "analysis confidence {:.2} below 0.50",
            input.confidence
        ));
    }
    if input.subtasks.len() > 10 {
        risk += 0.1;
        reasons.push(format!("{} subtasks", input.subtasks.len()));
    }
    // Rounded so that the recorded number reads the same everywhere.
    (((risk.min(1.0)) * 100.0).round() / 100.0, reasons)
}

/// The submitter's priority, one level higher when the request says it is urgent.
fn priority(config: &LubitConfig, input: &GateInput<'_>) -> Priority {
    if matching_terms(&[input.request], &config.urgent_terms).is_empty() {
        return input.priority;
    }
    match input.priority {
        Priority::Low => Priority::Normal,
        Priority::Normal => Priority::High,
        Priority::High | Priority::Critical => Priority::Critical,
    }
}

/// The terms that begin a word of any of `texts`, each once, in list order.
pub(crate) fn matching_terms(texts: &[&str], terms: &[String]) -> Vec<String> {
    let words: Vec<String> = texts.iter().flat_map(|t| text::words(t)).collect();
    terms
        .iter()
        .filter(|term| {
            let term = term.to_lowercase();
            words.iter().any(|w| w.starts_with(&term))
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sena::{analyse, SenaConfig};
    use crate::tools::BUILTIN_TOOLS;

    fn registered() -> Vec<&'static str> {
        BUILTIN_TOOLS.iter().map(|t| t.spec.name).collect()
    }

    fn plan(id: &str, tool: &str, deps: &[&str]) -> SubtaskPlan {
        SubtaskPlan {
            id: id.into(),
            title: Text::new(format!("step {id}")),
            tool: tool.into(),
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn gate(
        config: &LubitConfig,
        request: &str,
        round: u8,
        subtasks: &[SubtaskPlan],
    ) -> GateDecision {
        let registered = registered();
        decide(
            config,
            &GateInput {
                request,
                round,
                subtasks,
                confidence: 1.0,
                priority: Priority::Normal,
                registered: &registered,
            },
        )
    }

    /// Sena then Lubit on a request, as the runtime chains them.
    fn sena_then_lubit(request: &str) -> GateDecision {
        let specs: Vec<_> = BUILTIN_TOOLS.iter().map(|t| t.spec).collect();
        let analysis = analyse(&SenaConfig::default(), request, 0, &specs);
        let registered = registered();
        decide(
            &LubitConfig::default(),
            &GateInput {
                request,
                round: 0,
                subtasks: &analysis.subtasks,
                confidence: analysis.confidence,
                priority: Priority::Normal,
                registered: &registered,
            },
        )
    }

    #[test]
    fn a_sound_plan_is_approved_with_low_risk() {
        let d = sena_then_lubit(
            "Summarise the attached quarterly report. Then count the words of the summary.",
        );
        assert_eq!(d.verdict, Verdict::Approve);
        assert_eq!(d.risk, 0.1);
        assert!(d.reasons.is_empty());
        assert_eq!(d.priority, Priority::Normal);
    }

    #[test]
    fn high_risk_wording_goes_to_a_person_in_either_language() {
        for request in [
            "Delete all customer records older than one year from the production database.",
            "운영 데이터베이스에서 1년이 지난 고객 기록을 모두 삭제해 주세요.",
        ] {
            let d = sena_then_lubit(request);
            assert_eq!(d.verdict, Verdict::Escalate, "{request}");
            assert!(d.risk >= 0.7);
            assert!(
                d.reasons[0].starts_with("high-risk terms"),
                "{:?}",
                d.reasons
            );
        }
    }

    #[test]
    fn what_no_tool_can_do_is_rejected() {
        let d = sena_then_lubit(
            "Transfer 10,000 dollars from the company account to my personal account.",
        );
        assert_eq!(d.verdict, Verdict::Reject);
        assert!(
            d.reasons[0].starts_with("no registered tool"),
            "{:?}",
            d.reasons
        );
    }

    #[test]
    fn more_than_twenty_subtasks_are_rejected() {
        let request: String = (1..=22).map(|i| format!("{i}. count item {i}\n")).collect();
        let d = sena_then_lubit(&request);
        assert_eq!(d.verdict, Verdict::Reject);
        assert_eq!(d.reasons, ["22 subtasks; at most 20 are allowed"]);
    }

    #[test]
    fn empty_and_oversized_are_rejected() {
        let config = LubitConfig::default();
        assert_eq!(gate(&config, "x", 0, &[]).verdict, Verdict::Reject);
        let huge = "a".repeat(MAX_REQUEST_BYTES + 1);
        let d = gate(&config, &huge, 0, &[plan("st-1", "summarize", &[])]);
        assert_eq!(d.verdict, Verdict::Reject);
        assert!(d.reasons[0].contains("bytes"));
    }

    #[test]
    fn a_cycle_asks_for_revision_then_rejects_after_the_last_round() {
        let config = LubitConfig::default();
        let cyclic = [
            plan("st-1", "summarize", &["st-3"]),
            plan("st-2", "summarize", &["st-1"]),
            plan("st-3", "summarize", &["st-2"]),
        ];
        let d = gate(&config, "r", 0, &cyclic);
        assert_eq!(d.verdict, Verdict::Revise);
        assert_eq!(d.reasons, ["dependency cycle: st-1 → st-3 → st-2 → st-1"]);
        let last = gate(&config, "r", MAX_REVISIONS, &cyclic);
        assert_eq!(last.verdict, Verdict::Reject);
    }

    #[test]
    fn unknown_duplicate_and_self_dependencies_are_named() {
        let d = gate(
            &LubitConfig::default(),
            "r",
            0,
            &[
                plan("st-1", "summarize", &["st-1"]),
                plan("st-1", "summarize", &[]),
                plan("st-2", "summarize", &["st-9"]),
            ],
        );
        assert_eq!(d.verdict, Verdict::Revise);
        assert_eq!(
            d.reasons,
            [
                "subtask id st-1 is used twice",
                "st-1 depends on itself",
                "st-2 depends on unknown st-9"
            ]
        );
    }

    #[test]
    fn unknown_tools_are_revised_and_disallowed_tools_rejected() {
        let mut config = LubitConfig::default();
        let d = gate(&config, "r", 0, &[plan("st-1", "rm_rf", &[])]);
        assert_eq!(d.verdict, Verdict::Revise);
        assert_eq!(d.reasons, ["st-1: tool \"rm_rf\" is not registered"]);
        config.allowed_tools = Some(["summarize".to_string()].into());
        let d = gate(
            &config,
            "r",
            0,
            &[
                plan("st-1", "summarize", &[]),
                plan("st-2", "calculate", &[]),
            ],
        );
        assert_eq!(d.verdict, Verdict::Reject);
        assert_eq!(
            d.reasons,
            ["st-2: tool \"calculate\" is not allowed by policy"]
        );
    }

    #[test]
    fn a_partly_toolless_plan_is_revised() {
        let d = sena_then_lubit("Call the customer. Summarise the notes.");
        assert_eq!(d.verdict, Verdict::Revise);
        assert_eq!(d.reasons, ["st-1 ha(s) no tool: name one or drop it"]);
    }

    #[test]
    fn urgency_raises_the_priority_one_level() {
        let d = sena_then_lubit("Urgent: summarise the incident report.");
        assert_eq!(d.priority, Priority::High);
        let d = sena_then_lubit("긴급 보고서를 요약해 주세요.");
        assert_eq!(d.priority, Priority::High);
    }

    #[test]
    fn risk_terms_match_word_beginnings_only() {
        let terms = vec!["drop".to_string()];
        assert!(matching_terms(&["raindrop falls"], &terms).is_empty());
        assert_eq!(matching_terms(&["Dropping tables"], &terms), ["drop"]);
    }

    #[test]
    fn a_deep_chain_is_checked_without_recursion() {
        let chain: Vec<_> = (0..20_000)
            .map(|i| {
                let deps: Vec<String> = if i > 0 {
                    vec![format!("s{}", i - 1)]
                } else {
                    vec![]
                };
                SubtaskPlan {
                    id: format!("s{i}"),
                    title: Text::new("t"),
                    tool: "summarize".into(),
                    depends_on: deps,
                }
            })
            .collect();
        assert!(find_cycle(&chain).is_none());
    }
}
