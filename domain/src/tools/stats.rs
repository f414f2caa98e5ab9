//! Text statistics, keywords and extractive summaries.

use std::collections::HashMap;

use serde_json::json;

use super::{ToolError, ToolInput};
use crate::text::{is_stopword, sentences, words};

fn require_text<'a>(input: &ToolInput<'a>) -> Result<&'a str, ToolError> {
    let text = input.input.trim();
    if text.is_empty() {
        return Err(ToolError::BadInput("there is no text to work on".into()));
    }
    Ok(text)
}

/// Characters (Unicode scalar values), characters without whitespace, words,
/// sentences and lines of the input.
pub(super) fn text_stats(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let text = input.input;
    let stats = json!({
        "characters": text.chars().count(),
        "characters_without_spaces": text.chars().filter(|c| !c.is_whitespace()).count(),
        "words": text.split_whitespace().count(),
        "sentences": sentences(text).len(),
        "lines": text.lines().filter(|l| !l.trim().is_empty()).count(),
    });
    Ok(stats.to_string())
}

/// Word frequencies without stopwords, in order of first appearance.
fn frequencies(text: &str) -> Vec<(String, usize)> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut order = Vec::new();
    for word in words(text) {
        if is_stopword(&word) || word.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let count = counts.entry(word.clone()).or_insert(0);
        if *count == 0 {
            order.push(word);
        }
        *count += 1;
    }
    order.into_iter().map(|w| (w.clone(), counts[&w])).collect()
}

/// The ten most frequent topic words (ties: first appearance first).
pub(super) fn keywords(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let mut ranked = frequencies(require_text(input)?);
    // Stable: equal counts keep their order of first appearance.
    ranked.sort_by_key(|(_, count)| std::cmp::Reverse(*count));
    let top: Vec<&str> = ranked.iter().take(10).map(|(w, _)| w.as_str()).collect();
    Ok(json!(top).to_string())
}

/// The best third of the sentences (at least one, at most three), in their
/// original order. A sentence scores the mean document frequency of its
/// topic words, so sentences about what the text repeats most win.
pub(super) fn summarize(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let text = require_text(input)?;
    let all = sentences(text);
    let frequency: HashMap<String, usize> = frequencies(text).into_iter().collect();
    let mut scored: Vec<(usize, f64)> = all
        .iter()
        .enumerate()
        .map(|(i, sentence)| {
            let topic: Vec<usize> = words(sentence)
                .iter()
                .filter_map(|w| frequency.get(w).copied())
                .collect();
            let score = if topic.is_empty() {
                0.0
            } else {
                topic.iter().sum::<usize>() as f64 / topic.len() as f64
            };
            (i, score)
        })
        .collect();
    let keep = all.len().div_ceil(3).clamp(1, 3);
    // Highest score first; ties keep the earlier sentence.
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut chosen: Vec<usize> = scored.into_iter().take(keep).map(|(i, _)| i).collect();
    chosen.sort_unstable();
    Ok(chosen
        .into_iter()
        .map(|i| all[i])
        .collect::<Vec<_>>()
        .join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        f: fn(&ToolInput<'_>) -> Result<String, ToolError>,
        input: &str,
    ) -> Result<String, ToolError> {
        f(&ToolInput {
            instruction: "",
            input,
        })
    }

    #[test]
    fn text_stats_counts_unicode_characters_not_bytes() {
        let out: serde_json::Value =
            serde_json::from_str(&run(text_stats, "안녕하세요. Hello world!\n둘째 줄").unwrap())
                .unwrap();
        assert_eq!(out["characters"], 24);
        assert_eq!(out["characters_without_spaces"], 20);
        assert_eq!(out["words"], 5);
        assert_eq!(out["sentences"], 3);
        assert_eq!(out["lines"], 2);
    }

    #[test]
    fn keywords_rank_repeated_topic_words_first() {
        let out = run(
            keywords,
            "The engine is fast. The engine is quiet. A quiet engine sells.",
        )
        .unwrap();
        assert_eq!(out, r#"["engine","quiet","fast","sells"]"#);
        let korean = run(keywords, "제품 설명: 가벼운 제품, 튼튼한 제품").unwrap();
        assert!(korean.starts_with(r#"["제품""#), "{korean}");
        assert!(matches!(run(keywords, "  "), Err(ToolError::BadInput(_))));
    }

    #[test]
    fn summary_keeps_the_sentences_about_the_main_topic_in_order() {
        let text = "Revenue grew in the quarter. The office cat slept. Revenue growth came from new customers. \
                    Lunch was late. Customers renewed and revenue rose again. The weather was mild.";
        let out = run(summarize, text).unwrap();
        let picked = sentences(&out);
        assert_eq!(picked.len(), 2, "a third of six sentences: {out}");
        assert!(
            picked.iter().all(|s| s.to_lowercase().contains("revenue")),
            "{out}"
        );
        let positions: Vec<usize> = picked
            .iter()
            .map(|p| text.find(p).expect("taken verbatim"))
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "kept in original order: {out}"
        );
        assert_eq!(
            run(summarize, "Only one sentence here").unwrap(),
            "Only one sentence here"
        );
    }
}
