//! RUNE, the ethics verifier: scores a workflow's history and passes or
//! flags it. See the [module docs](super) for the policy in words.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::text;
use crate::workflow::{EthicsScores, Verdict, WorkflowEvent};

/// RUNE's configuration (part of its policy fingerprint).
#[derive(Debug, Clone, Serialize)]
pub struct RuneConfig {
    /// The lowest passing value of each score.
    pub thresholds: EthicsScores,
    /// Terms that touch protected attributes, by category. A term with a
    /// space is matched as a phrase, any other as a word beginning
    /// (case-insensitive).
    pub fairness_terms: BTreeMap<String, Vec<String>>,
    /// Fairness lost per category found.
    pub fairness_penalty: f64,
}

impl Default for RuneConfig {
    fn default() -> Self {
        let terms = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Self {
            thresholds: EthicsScores {
                transparency: 0.7,
                collaboration: 0.7,
                autonomy: 0.7,
                fairness: 0.7,
            },
            fairness_terms: [
                (
                    "age",
                    terms(&[
                        "years old",
                        "year old",
                        "year-old",
                        "aged",
                        "older than",
                        "younger than",
                        "나이",
                        "연령",
                        "세 이상",
                        "세 이하",
                        "세 미만",
                        "세 초과",
                    ]),
                ),
                (
                    "gender",
                    terms(&[
                        "gender", "female", "male", "woman", "women", "성별", "남성", "여성",
                    ]),
                ),
                (
                    "race",
                    terms(&[
                        "race",
                        "racial",
                        "ethnic",
                        "skin colour",
                        "skin color",
                        "인종",
                        "민족",
                    ]),
                ),
                ("religion", terms(&["religion", "religious", "종교"])),
                (
                    "nationality",
                    terms(&["nationality", "national origin", "국적"]),
                ),
                ("disability", terms(&["disabilit", "disabled", "장애"])),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            fairness_penalty: 0.5,
        }
    }
}

/// RUNE's verdict on a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Review {
    pub scores: EthicsScores,
    /// Every score at or above its threshold.
    pub passed: bool,
    /// What lowered a score, in words.
    pub findings: Vec<String>,
}

/// Reviews a workflow's recorded history (from its submission to the end of
/// execution).
pub fn review(config: &RuneConfig, history: &[WorkflowEvent]) -> Review {
    let mut findings = Vec::new();
    let scores = EthicsScores {
        transparency: transparency(history, &mut findings),
        collaboration: collaboration(history, &mut findings),
        autonomy: autonomy(history, &mut findings),
        fairness: fairness(config, history, &mut findings),
    };
    let t = config.thresholds;
    let mut passed = true;
    for (name, score, threshold) in [
        ("transparency", scores.transparency, t.transparency),
        ("collaboration", scores.collaboration, t.collaboration),
        ("autonomy", scores.autonomy, t.autonomy),
        ("fairness", scores.fairness, t.fairness),
    ] {
        if score < threshold {
            passed = false;
            findings.push(format!("{name} {score:.2} is below {threshold:.2}"));
        }
    }
    Review {
        scores,
        passed,
        findings,
    }
}

/// The share of decisions (analyses, gate verdicts, human decisions) that
/// give their reasons in words.
fn transparency(history: &[WorkflowEvent], findings: &mut Vec<String>) -> f64 {
    use WorkflowEvent as E;
    let mut decisions = 0;
    let mut explained = 0;
    for event in history {
        let rationale = match event {
            E::AnalysisProduced { rationale, .. } | E::GateDecided { rationale, .. } => rationale,
            E::HumanDecisionRecorded { comment, .. } => comment,
            _ => continue,
        };
        decisions += 1;
        if rationale.as_str().trim().is_empty() {
            findings.push(format!("{} gives no reason", event.event_type()));
        } else {
            explained += 1;
        }
    }
    ratio(explained, decisions)
}

/// The share of the three hand-offs that happened: request → analysis,
/// analysis → gate, approval → finished execution.
fn collaboration(history: &[WorkflowEvent], findings: &mut Vec<String>) -> f64 {
    use WorkflowEvent as E;
    let analysed = history
        .iter()
        .any(|e| matches!(e, E::AnalysisProduced { .. }));
    let gated = history.iter().any(|e| matches!(e, E::GateDecided { .. }));
    let executed = history
        .iter()
        .any(|e| matches!(e, E::ExecutionFinished { .. }));
    let mut done = 0;
    for (happened, what) in [
        (analysed, "no analysis"),
        (gated, "no gate decision"),
        (executed, "execution did not finish"),
    ] {
        if happened {
            done += 1;
        } else {
            findings.push(what.to_string());
        }
    }
    ratio(done, 3)
}

/// 1 when every subtask started under an approval of the current analysis
/// (Lubit's or a person's) and nothing ran after a person said no; else 0.
fn autonomy(history: &[WorkflowEvent], findings: &mut Vec<String>) -> f64 {
    use WorkflowEvent as E;
    let mut approved = false;
    let mut refused = false;
    let mut violations = 0;
    for event in history {
        match event {
            E::AnalysisProduced { .. } => approved = false,
            E::GateDecided { verdict, .. } => approved = *verdict == Verdict::Approve,
            E::HumanDecisionRecorded { approve, .. } => {
                approved = *approve;
                refused |= !approve;
            }
            E::SubtaskStarted { subtask, .. } if !approved || refused => {
                violations += 1;
                findings.push(format!("{subtask} started without an approval"));
            }
            _ => {}
        }
    }
    if violations == 0 {
        1.0
    } else {
        0.0
    }
}

/// 1 minus `fairness_penalty` for each category of protected-attribute
/// terms found in the request, input document, subtask titles or outputs.
fn fairness(config: &RuneConfig, history: &[WorkflowEvent], findings: &mut Vec<String>) -> f64 {
    use WorkflowEvent as E;
    let mut texts: Vec<&str> = Vec::new();
    for event in history {
        match event {
            E::WorkflowSubmitted { request, input, .. } => {
                texts.push(request.as_str());
                texts.extend(input.as_ref().map(|i| i.as_str()));
            }
            E::AnalysisProduced { subtasks, .. } => {
                texts.extend(subtasks.iter().map(|s| s.title.as_str()))
            }
            E::SubtaskSucceeded { output, .. } => texts.push(output.as_str()),
            _ => {}
        }
    }
    let lowered: Vec<String> = texts.iter().map(|t| t.to_lowercase()).collect();
    let words: Vec<String> = texts.iter().flat_map(|t| text::words(t)).collect();
    let mut score: f64 = 1.0;
    for (category, terms) in &config.fairness_terms {
        let hit = terms.iter().find(|term| {
            let term = term.to_lowercase();
            if term.contains(' ') {
                lowered.iter().any(|t| t.contains(&term))
            } else {
                words.iter().any(|w| w.starts_with(&term))
            }
        });
        if let Some(term) = hit {
            score -= config.fairness_penalty;
            findings.push(format!("touches {category} (\"{term}\")"));
        }
    }
    score.max(0.0)
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workflow::{Priority, SubtaskPlan, Text};

    fn history(request: &str, rationale: &str, output: &str) -> Vec<WorkflowEvent> {
        vec![
            WorkflowEvent::WorkflowSubmitted {
                request: Text::new(request),
                input: None,
                priority: Priority::Normal,
                sealing: None,
            },
            WorkflowEvent::AnalysisProduced {
                model: None,
                round: 0,
                subtasks: vec![SubtaskPlan {
                    id: "st-1".into(),
                    title: Text::new(request),
                    tool: "sort_lines".into(),
                    depends_on: vec![],
                }],
                confidence: 1.0,
                rationale: Text::new(rationale),
            },
            WorkflowEvent::GateDecided {
                model: None,
                round: 0,
                verdict: Verdict::Approve,
                priority: Priority::Normal,
                risk: 0.1,
                reasons: vec![],
                rationale: Text::new("ok"),
            },
            WorkflowEvent::SubtaskStarted {
                subtask: "st-1".into(),
                attempt: 1,
                intent: None,
            },
            WorkflowEvent::SubtaskSucceeded {
                cache: None,
                subtask: "st-1".into(),
                attempt: 1,
                output: Text::new(output),
            },
            WorkflowEvent::ExecutionFinished {
                succeeded: 1,
                failed: 0,
                skipped: 0,
            },
        ]
    }

    #[test]
    fn an_ordinary_workflow_passes_with_full_scores() {
        let r = review(
            &RuneConfig::default(),
            &history("Sort the tags", "one step", "a\nb"),
        );
        assert!(r.passed, "{:?}", r.findings);
        assert_eq!(
            r.scores,
            EthicsScores {
                transparency: 1.0,
                collaboration: 1.0,
                autonomy: 1.0,
                fairness: 1.0
            }
        );
        assert!(r.findings.is_empty());
    }

    #[test]
    fn protected_attributes_lower_fairness_and_flag_in_either_language() {
        for request in [
            "Rank these job applicants and drop anyone over 50 years old: Alice (34), Bob (52).",
            "지원자 순위를 매기고 50세 이상은 모두 제외해 주세요: 김민수(34), 이영희(52).",
        ] {
            let r = review(&RuneConfig::default(), &history(request, "r", "x"));
            assert!(!r.passed, "{request}");
            assert_eq!(r.scores.fairness, 0.5);
            assert!(
                r.findings.iter().any(|f| f.starts_with("touches age")),
                "{:?}",
                r.findings
            );
        }
    }

    #[test]
    fn terms_in_outputs_count_and_words_match_by_beginning() {
        let r = review(&RuneConfig::default(), &history("Sort", "r", "by gender"));
        assert_eq!(r.scores.fairness, 0.5);
        let r = review(
            &RuneConfig::default(),
            &history("Trace the embrace", "r", "x"),
        );
        assert_eq!(r.scores.fairness, 1.0, "{:?}", r.findings);
    }

    #[test]
    fn a_decision_without_reasons_lowers_transparency() {
        let r = review(&RuneConfig::default(), &history("Sort", " ", "x"));
        assert_eq!(r.scores.transparency, 0.5);
        assert!(!r.passed);
    }

    #[test]
    fn execution_without_approval_fails_autonomy() {
        let mut events = history("Sort", "r", "x");
        events.remove(2); // the gate decision
        let r = review(&RuneConfig::default(), &events);
        assert_eq!(r.scores.autonomy, 0.0);
        assert!((r.scores.collaboration - 2.0 / 3.0).abs() < 1e-9);
        assert!(r
            .findings
            .contains(&"st-1 started without an approval".to_string()));
    }

    #[test]
    fn thresholds_are_configurable() {
        let mut config = RuneConfig::default();
        config.thresholds.fairness = 0.4;
        let r = review(&config, &history("Rank by gender", "r", "x"));
        assert!(r.passed);
        assert_eq!(r.scores.fairness, 0.5);
    }
}
