//! The built-in tools: safe, deterministic, pure functions from a subtask's
//! instruction and input document to an output text. The agent runtime wraps
//! them (with deadlines and retries); Sena picks one per subtask by the
//! keywords each declares.
//!
//! | tool | does | output |
//! | --- | --- | --- |
//! | `text_stats` | counts characters, words, sentences, lines | JSON object |
//! | `keywords` | most frequent non-stopword words (top 10) | JSON array |
//! | `summarize` | extractive summary: the best-scoring third of the sentences (1–3), in order | text |
//! | `calculate` | evaluates the arithmetic expression in the instruction or input | number |
//! | `extract_numbers` | every number in the input | JSON array |
//! | `json_extract` | the value at a dotted path (`order.total`) of a JSON document | JSON |
//! | `sort_lines` | sorts lines (or comma-separated items), descending when asked | text |
//! | `dedupe_lines` | removes repeated lines (or items), keeping the first | text |

mod calc;
mod extract;
mod lines;
mod stats;

use thiserror::Error;

/// What a tool works on.
#[derive(Debug, Clone, Copy)]
pub struct ToolInput<'a> {
    /// The subtask's instruction (its title), e.g. "Sort them in descending order".
    pub instruction: &'a str,
    /// The document: the outputs of the subtasks it depends on, or the
    /// workflow's input document, or else the request text.
    pub input: &'a str,
}

/// Why a tool produced no output.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ToolError {
    /// The input does not contain what the tool needs; retrying will not help.
    #[error("bad input: {0}")]
    BadInput(String),
}

/// A tool's identity and the words that make Sena choose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolSpec {
    /// Registry name, e.g. `summarize`.
    pub name: &'static str,
    /// One line for people.
    pub description: &'static str,
    /// Lower-case word beginnings matched against the words of an
    /// instruction: `summar` matches "Summarise", `요약` matches "요약해".
    pub keywords: &'static [&'static str],
}

/// A built-in tool: its spec and its function.
#[derive(Clone, Copy)]
pub struct BuiltinTool {
    /// Name, description, keywords.
    pub spec: ToolSpec,
    /// The tool itself.
    pub run: fn(&ToolInput<'_>) -> Result<String, ToolError>,
}

impl std::fmt::Debug for BuiltinTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BuiltinTool").field(&self.spec.name).finish()
    }
}

/// Every built-in tool, in the order that breaks ties when Sena selects.
pub const BUILTIN_TOOLS: &[BuiltinTool] = &[
    BuiltinTool {
        spec: ToolSpec {
            name: "summarize",
            description: "Extractive summary by sentence ranking",
            keywords: &[
                "summar", "요약", "read", "explain", "describe", "읽", "설명",
            ],
        },
        run: stats::summarize,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "keywords",
            description: "Most frequent topic words",
            keywords: &["keyword", "키워드", "extract", "추출"],
        },
        run: stats::keywords,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "text_stats",
            description: "Counts characters, words, sentences and lines",
            keywords: &[
                "count",
                "word",
                "character",
                "length",
                "글자",
                "단어",
                "세어",
                "세기",
                "길이",
            ],
        },
        run: stats::text_stats,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "calculate",
            description: "Evaluates an arithmetic expression",
            keywords: &["compute", "calculat", "total", "계산", "합계"],
        },
        run: calc::calculate,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "extract_numbers",
            description: "Lists the numbers in the input",
            keywords: &["figure", "number", "수치", "숫자", "extract", "추출"],
        },
        run: extract::extract_numbers,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "json_extract",
            description: "Takes the value at a dotted path of a JSON document",
            keywords: &["json", "field", "extract", "추출"],
        },
        run: extract::json_extract,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "sort_lines",
            description: "Sorts lines or comma-separated items",
            keywords: &["sort", "order", "rank", "정렬", "순위"],
        },
        run: lines::sort_lines,
    },
    BuiltinTool {
        spec: ToolSpec {
            name: "dedupe_lines",
            description: "Removes repeated lines or items",
            keywords: &["dedup", "duplicate", "unique", "중복"],
        },
        run: lines::dedupe_lines,
    },
];

/// The built-in tool named `name`.
pub fn builtin(name: &str) -> Option<&'static BuiltinTool> {
    BUILTIN_TOOLS.iter().find(|t| t.spec.name == name)
}

/// The tool whose keywords best match `instruction`: the most keywords that
/// begin a word of it (so `count` does not match "account"); ties go to the
/// earlier tool in `specs`; `None` when nothing matches.
pub fn select<'a>(
    specs: impl IntoIterator<Item = &'a ToolSpec>,
    instruction: &str,
) -> Option<&'a ToolSpec> {
    let words = crate::text::words(instruction);
    let mut best: Option<(&ToolSpec, usize)> = None;
    for spec in specs {
        let score = spec
            .keywords
            .iter()
            .filter(|k| words.iter().any(|w| w.starts_with(*k)))
            .count();
        if score > 0 && best.is_none_or(|(_, s)| score > s) {
            best = Some((spec, score));
        }
    }
    best.map(|(spec, _)| spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever text arrives, a tool answers or refuses; it never panics.
        #[test]
        fn no_tool_panics_on_any_text(instruction in "\\PC{0,80}", input in "(\\PC|\n){0,200}") {
            for tool in BUILTIN_TOOLS {
                let _ = (tool.run)(&ToolInput { instruction: &instruction, input: &input });
            }
        }

        /// The same for text made mostly of what the parsers look for.
        #[test]
        fn no_tool_panics_on_parser_shaped_text(text in "[0-9().,+*/%{}\\[\\]\":a-z -]{0,120}") {
            for tool in BUILTIN_TOOLS {
                let _ = (tool.run)(&ToolInput { instruction: &text, input: &text });
            }
        }
    }

    fn pick(instruction: &str) -> Option<&'static str> {
        select(BUILTIN_TOOLS.iter().map(|t| &t.spec), instruction).map(|s| s.name)
    }

    #[test]
    fn instructions_in_english_and_korean_pick_the_expected_tool() {
        let cases = [
            (
                "Summarise the attached quarterly report.",
                Some("summarize"),
            ),
            ("Then count the words of the summary.", Some("text_stats")),
            ("Extract the figures from the text", Some("extract_numbers")),
            ("Sort them in descending order", Some("sort_lines")),
            ("Compute their total", Some("calculate")),
            (
                "Extract the keywords from the product description",
                Some("keywords"),
            ),
            ("Deduplicate the list of tags", Some("dedupe_lines")),
            (
                "From the JSON {\"order\": {\"total\": 99.5}} extract order.total",
                Some("json_extract"),
            ),
            ("첨부된 분기 보고서를 요약해 주세요.", Some("summarize")),
            ("본문에서 수치를 추출하세요", Some("extract_numbers")),
            ("내림차순으로 정렬하세요", Some("sort_lines")),
            ("합계를 계산하세요", Some("calculate")),
            ("태그 목록에서 중복 제거하기", Some("dedupe_lines")),
            ("Read the meeting notes.", Some("summarize")),
            ("결과를 한 문장으로 설명해 주세요.", Some("summarize")),
            ("Rank these job applicants", Some("sort_lines")),
            ("지원자 순위를 매기고", Some("sort_lines")),
            ("Transfer 10,000 dollars to my personal account.", None),
        ];
        for (instruction, expected) in cases {
            assert_eq!(pick(instruction), expected, "{instruction}");
        }
    }

    #[test]
    fn every_builtin_is_found_by_name_and_names_are_unique() {
        for tool in BUILTIN_TOOLS {
            assert_eq!(
                builtin(tool.spec.name).map(|t| t.spec.name),
                Some(tool.spec.name)
            );
        }
        let mut names: Vec<_> = BUILTIN_TOOLS.iter().map(|t| t.spec.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), BUILTIN_TOOLS.len());
        assert!(builtin("rm_rf").is_none());
    }
}
