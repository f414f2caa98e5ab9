//! Sena, the analyst: splits a request into subtasks with dependencies and
//! picks a tool for each. See the [module docs](super) for the policy in words.

use serde::Serialize;

use crate::text;
use crate::tools::{self, ToolSpec};
use crate::workflow::{SubtaskPlan, Text};

/// Sena's configuration (part of its policy fingerprint).
#[derive(Debug, Clone, Serialize)]
pub struct SenaConfig {
    /// The tool a follow-up step without a keyword match gets ("explain the result").
    pub follow_up_tool: String,
}

impl Default for SenaConfig {
    fn default() -> Self {
        Self {
            follow_up_tool: "summarize".into(),
        }
    }
}

/// Sena's analysis: the plan, how sure it is, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub subtasks: Vec<SubtaskPlan>,
    /// In [0, 1]: the mean over subtasks of 1 (keyword match), ½ (follow-up
    /// fallback) or 0 (no tool).
    pub confidence: f64,
    pub rationale: Text,
}

/// Words that open a step that follows the previous one.
const SEQUENCE_OPENERS: &[&str] = &[
    "then",
    "after that",
    "afterwards",
    "next",
    "finally",
    "and then",
    "그다음",
    "그 다음",
    "그리고 나서",
    "그리고 난 후",
    "마지막으로",
    "이후",
];

/// Markers inside a sentence that split it into a step and a follow-up.
const CLAUSE_SPLITS: &[&str] = &[
    ", and then ",
    " and then ",
    ", then ",
    "; then ",
    " then ",
    ", 그리고 나서 ",
    " 그리고 나서 ",
    ", 그다음 ",
    " 그다음 ",
];

/// A piece of the request that becomes a subtask.
#[derive(Debug, PartialEq)]
struct Step<'a> {
    title: &'a str,
    after_previous: bool,
}

/// Analyses `request` against the tools in `registry`. In a revision round
/// (`round > 0`) subtasks without a tool are dropped, since the gate asked
/// for a plan it can run.
pub fn analyse(config: &SenaConfig, request: &str, round: u8, registry: &[ToolSpec]) -> Analysis {
    let steps = merge_repeats(split(request));
    let mut subtasks: Vec<SubtaskPlan> = Vec::with_capacity(steps.len());
    let mut notes = Vec::new();
    let mut score = 0.0;
    let mut dropped = Vec::new();
    let mut previous: Option<String> = None;
    for (index, step) in steps.iter().enumerate() {
        let id = format!("st-{}", index + 1);
        let depends_on: Vec<String> = previous
            .iter()
            .filter(|_| step.after_previous)
            .cloned()
            .collect();
        let (tool, how) = match tools::select(registry, step.title) {
            Some(spec) => {
                score += 1.0;
                (spec.name.to_string(), format!("keywords of {}", spec.name))
            }
            None if !depends_on.is_empty() => {
                score += 0.5;
                (
                    config.follow_up_tool.clone(),
                    format!("follow-up step, {}", config.follow_up_tool),
                )
            }
            None => (String::new(), "no tool matches".to_string()),
        };
        if tool.is_empty() && round > 0 {
            // Dependents of a dropped step depend on what it depended on.
            dropped.push(id.clone());
            notes.push(format!("{id} dropped: no tool"));
            continue;
        }
        notes.push(match depends_on.first() {
            Some(dep) => format!("{id} after {dep}: {how}"),
            None => format!("{id}: {how}"),
        });
        previous = Some(id.clone());
        subtasks.push(SubtaskPlan {
            id,
            title: Text::new(step.title),
            tool,
            depends_on,
        });
    }
    let confidence = if steps.is_empty() {
        0.0
    } else {
        score / steps.len() as f64
    };
    let shape = if is_list(request) {
        "list items"
    } else {
        "sentences"
    };
    let rationale = format!(
        "{} subtask(s) from {shape}{}; {}",
        subtasks.len(),
        if dropped.is_empty() {
            String::new()
        } else {
            format!(" ({} dropped in revision)", dropped.len())
        },
        notes.join("; ")
    );
    Analysis {
        subtasks,
        confidence,
        rationale: Text::new(rationale),
    }
}

/// Numbered (`1.`, `2)`) or bulleted (`-`, `*`, `•`) lines.
fn list_item(line: &str) -> Option<(&str, bool)> {
    let line = line.trim();
    for bullet in ["- ", "* ", "• "] {
        if let Some(rest) = line.strip_prefix(bullet) {
            return Some((rest.trim(), false));
        }
    }
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0 && digits < 4 {
        let rest = &line[digits..];
        for mark in [". ", ") "] {
            if let Some(rest) = rest.strip_prefix(mark) {
                return Some((rest.trim(), true));
            }
        }
    }
    None
}

fn is_list(request: &str) -> bool {
    request.lines().any(|l| list_item(l).is_some())
}

/// The request's steps: list items when it has any (numbered items follow
/// each other, bullets are independent unless they open with a sequencing
/// word), else its sentences and the clauses joined by "then" within them.
fn split(request: &str) -> Vec<Step<'_>> {
    if is_list(request) {
        let mut steps = Vec::new();
        for line in request.lines().filter(|l| !l.trim().is_empty()) {
            let (text, numbered) = list_item(line).unwrap_or((line.trim(), false));
            let (title, opened) = strip_opener(text);
            steps.push(Step {
                title,
                after_previous: !steps.is_empty() && (numbered || opened),
            });
        }
        return steps.into_iter().filter(|s| !s.title.is_empty()).collect();
    }
    let mut steps: Vec<Step<'_>> = Vec::new();
    for sentence in text::sentences(request) {
        for (i, clause) in clauses(sentence).into_iter().enumerate() {
            let (title, opened) = strip_opener(clause);
            let title = title.trim_end_matches([',', ';']).trim();
            if title.is_empty() {
                continue;
            }
            let after_previous = !steps.is_empty() && (i > 0 || opened);
            steps.push(Step {
                title,
                after_previous,
            });
        }
    }
    steps
}

/// `sentence` cut at every mid-sentence "then" marker.
fn clauses(sentence: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = sentence;
    loop {
        let lower = rest.to_lowercase();
        // Lower-casing keeps byte offsets for the scripts we match (ASCII
        // markers); skip the cut when it would not (e.g. 'İ').
        let cut = (lower.len() == rest.len())
            .then(|| {
                CLAUSE_SPLITS
                    .iter()
                    .filter_map(|m| lower.find(m).map(|at| (at, m.len())))
                    .min()
            })
            .flatten();
        match cut {
            Some((at, len)) if at > 0 => {
                out.push(&rest[..at]);
                rest = &rest[at + len..];
            }
            _ => {
                out.push(rest);
                return out;
            }
        }
    }
}

/// The clause without a leading sequencing word, and whether it had one.
fn strip_opener(clause: &str) -> (&str, bool) {
    let trimmed = clause.trim();
    for opener in SEQUENCE_OPENERS {
        let Some(head) = trimmed.get(..opener.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(opener) {
            continue;
        }
        let rest = &trimmed[opener.len()..];
        // Whole words only: "Thenceforth" or "Nextcloud" are not openers.
        if rest.chars().next().is_none_or(|c| !c.is_alphanumeric()) {
            let rest = rest.trim_start_matches([',', ' ', ':']);
            return (rest.trim(), true);
        }
    }
    (trimmed, false)
}

/// Identical independent steps in a row are one step: a paragraph pasted
/// several times is one thing to do, not many.
fn merge_repeats(steps: Vec<Step<'_>>) -> Vec<Step<'_>> {
    let mut out: Vec<Step<'_>> = Vec::with_capacity(steps.len());
    for step in steps {
        let repeat = out
            .iter()
            .any(|s| !step.after_previous && s.title.eq_ignore_ascii_case(step.title));
        if !repeat {
            out.push(step);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::BUILTIN_TOOLS;

    fn registry() -> Vec<ToolSpec> {
        BUILTIN_TOOLS.iter().map(|t| t.spec).collect()
    }

    fn analyse_round(request: &str, round: u8) -> Analysis {
        analyse(&SenaConfig::default(), request, round, &registry())
    }

    /// (id, tool, depends_on) of each subtask.
    fn shape(request: &str) -> Vec<(String, String, Vec<String>)> {
        analyse_round(request, 0)
            .subtasks
            .into_iter()
            .map(|s| (s.id, s.tool, s.depends_on))
            .collect()
    }

    fn expect(rows: &[(&str, &str, &[&str])]) -> Vec<(String, String, Vec<String>)> {
        rows.iter()
            .map(|(id, tool, deps)| {
                (
                    id.to_string(),
                    tool.to_string(),
                    deps.iter().map(|d| d.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn sentences_with_then_follow_each_other_in_english_and_korean() {
        let plan = expect(&[
            ("st-1", "summarize", &[]),
            ("st-2", "text_stats", &["st-1"]),
        ]);
        assert_eq!(
            shape("Summarise the attached quarterly report. Then count the words of the summary."),
            plan
        );
        assert_eq!(
            shape("첨부된 분기 보고서를 요약해 주세요. 그다음 요약문의 단어 수를 세어 주세요."),
            plan
        );
    }

    #[test]
    fn numbered_items_are_sequential_and_bullets_parallel() {
        assert_eq!(
            shape("1. Extract the figures from the text\n2. Sort them in descending order\n3. Compute their total"),
            expect(&[
                ("st-1", "extract_numbers", &[]),
                ("st-2", "sort_lines", &["st-1"]),
                ("st-3", "calculate", &["st-2"]),
            ])
        );
        assert_eq!(
            shape("- 제품 설명의 글자 수를 세기\n- 제품 설명에서 키워드 추출하기\n- 태그 목록에서 중복 제거하기"),
            expect(&[
                ("st-1", "text_stats", &[]),
                ("st-2", "keywords", &[]),
                ("st-3", "dedupe_lines", &[]),
            ])
        );
    }

    #[test]
    fn a_then_clause_inside_a_sentence_is_a_follow_up_step() {
        let plan = expect(&[("st-1", "calculate", &[]), ("st-2", "summarize", &["st-1"])]);
        assert_eq!(
            shape("Compute (17 * 23) + 4, then explain the result in one sentence."),
            plan
        );
        assert_eq!(
            shape("(17 * 23) + 4를 계산하고, 그리고 나서 결과를 한 문장으로 설명해 주세요."),
            plan
        );
        let json = analyse_round(
            "From the JSON {\"order\": {\"id\": 42, \"total\": 99.5}} extract order.total and then format it as currency.",
            0,
        );
        assert_eq!(json.subtasks[0].tool, "json_extract");
        assert_eq!(json.subtasks[1].tool, "summarize", "follow-up fallback");
        assert_eq!(json.confidence, 0.75);
    }

    #[test]
    fn after_that_and_finally_chain_three_steps() {
        assert_eq!(
            shape("Read the meeting notes. After that, list the action items. Finally, sort the action items by owner."),
            expect(&[
                ("st-1", "summarize", &[]),
                ("st-2", "summarize", &["st-1"]),
                ("st-3", "sort_lines", &["st-2"]),
            ])
        );
    }

    #[test]
    fn a_request_no_tool_can_serve_gets_no_tool_and_no_confidence() {
        let analysis = analyse_round(
            "Transfer 10,000 dollars from the company account to my personal account.",
            0,
        );
        assert_eq!(analysis.subtasks.len(), 1);
        assert_eq!(analysis.subtasks[0].tool, "");
        assert_eq!(analysis.confidence, 0.0);
    }

    #[test]
    fn a_revision_drops_steps_without_a_tool_and_relinks_dependents() {
        let request = "Call the customer. Summarise the notes. Then count the words.";
        let first = analyse_round(request, 0);
        assert_eq!(first.subtasks.len(), 3);
        assert_eq!(first.subtasks[0].tool, "");
        let revised = analyse_round(request, 1);
        let tools: Vec<_> = revised.subtasks.iter().map(|s| s.tool.as_str()).collect();
        assert_eq!(tools, ["summarize", "text_stats"]);
        assert_eq!(revised.subtasks[1].depends_on, ["st-2"]);
        assert!(revised.rationale.as_str().contains("st-1 dropped"));
    }

    #[test]
    fn empty_and_repeated_requests() {
        assert!(analyse_round("   \n ", 0).subtasks.is_empty());
        assert_eq!(analyse_round("", 0).confidence, 0.0);
        let paragraph = "Summarise this paragraph about the history of the company. ".repeat(400);
        let analysis = analyse_round(&paragraph, 0);
        assert_eq!(analysis.subtasks.len(), 1, "repeats merge");
        assert_eq!(analysis.subtasks[0].tool, "summarize");
    }

    #[test]
    fn openers_match_whole_words_only() {
        assert_eq!(strip_opener("Nextcloud sync"), ("Nextcloud sync", false));
        assert_eq!(strip_opener("Then, count"), ("count", true));
        assert_eq!(strip_opener("마지막으로 정렬하세요"), ("정렬하세요", true));
    }

    #[test]
    fn mixed_language_requests_split_the_same_way() {
        assert_eq!(
            shape("Extract the keywords from 이 제품 설명. Then sort them alphabetically."),
            expect(&[("st-1", "keywords", &[]), ("st-2", "sort_lines", &["st-1"])])
        );
    }
}
