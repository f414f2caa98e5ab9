//! Text splitting shared by the tools and the policies: sentences and words,
//! for English and Korean alike.

/// Splits `text` into sentences: at `.`, `!`, `?` (and their full-width
/// forms `。！？`) followed by whitespace or the end, and at line breaks.
/// Korean sentences end the same way (`…다.`, `…요.`). Numbers such as `99.5`
/// stay whole because no whitespace follows the point. Empty pieces are dropped.
pub fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = match c {
            '\n' => Some(i),
            '.' | '!' | '?' | '。' | '！' | '？' => match chars.peek() {
                None => Some(i + c.len_utf8()),
                Some((_, next)) if next.is_whitespace() => Some(i + c.len_utf8()),
                _ => None,
            },
            _ => None,
        };
        if let Some(end) = end {
            push_trimmed(&mut out, &text[start..end]);
            start = end;
        }
    }
    push_trimmed(&mut out, &text[start..]);
    out
}

fn push_trimmed<'a>(out: &mut Vec<&'a str>, piece: &'a str) {
    let piece = piece.trim();
    if !piece.is_empty() {
        out.push(piece);
    }
}

/// The words of `text`: maximal runs of letters and digits (any script), lower-cased.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Words that carry no topic, in English and Korean (particles and fillers).
pub fn is_stopword(word: &str) -> bool {
    const STOPWORDS: &[&str] = &[
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "for",
        "from",
        "has",
        "have",
        "in",
        "is",
        "it",
        "its",
        "of",
        "on",
        "or",
        "that",
        "the",
        "their",
        "them",
        "then",
        "these",
        "this",
        "to",
        "was",
        "were",
        "with",
        "그",
        "이",
        "저",
        "것",
        "수",
        "및",
        "등",
        "를",
        "을",
        "은",
        "는",
        "이다",
        "있다",
        "하다",
        "주세요",
    ];
    STOPWORDS.contains(&word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_english_and_korean_and_keep_decimals() {
        assert_eq!(
            sentences("Summarise the report. Then count 99.5 words!\nDone"),
            vec!["Summarise the report.", "Then count 99.5 words!", "Done"]
        );
        assert_eq!(
            sentences("첨부된 보고서를 요약해 주세요. 그다음 단어 수를 세어 주세요."),
            vec![
                "첨부된 보고서를 요약해 주세요.",
                "그다음 단어 수를 세어 주세요."
            ]
        );
        assert!(sentences("   \n ").is_empty());
    }

    #[test]
    fn words_are_lowercased_runs_of_letters_in_any_script() {
        assert_eq!(
            words("Extract the KEYWORDS from 이 제품 설명."),
            vec!["extract", "the", "keywords", "from", "이", "제품", "설명"]
        );
    }
}
