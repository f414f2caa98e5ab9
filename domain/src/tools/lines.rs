//! Sorting and de-duplicating lists: one item per line, or comma-separated
//! items when the text is a single line.

use super::{ToolError, ToolInput};

/// How a list was written, so that the result is written the same way.
#[derive(Clone, Copy)]
enum Shape {
    Lines,
    Commas,
    /// A JSON array of plain values (`[30, 12, 7.5]`), as other tools write lists.
    JsonArray,
}

impl Shape {
    fn join(self, items: &[&str]) -> String {
        match self {
            Self::Lines => items.join("\n"),
            Self::Commas => items.join(", "),
            Self::JsonArray => format!("[{}]", items.join(", ")),
        }
    }
}

fn items<'a>(input: &ToolInput<'a>) -> Result<(Vec<&'a str>, Shape), ToolError> {
    let text = input.input.trim();
    if text.is_empty() {
        return Err(ToolError::BadInput("there is no list to work on".into()));
    }
    let array = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .filter(|inner| !inner.contains(['[', '{', '"']));
    let (items, shape): (Vec<&str>, _) = if let Some(inner) = array {
        (inner.split(',').collect(), Shape::JsonArray)
    } else if text.contains('\n') {
        (text.lines().collect(), Shape::Lines)
    } else {
        (text.split(',').collect(), Shape::Commas)
    };
    Ok((
        items
            .into_iter()
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect(),
        shape,
    ))
}

/// Sorts the items: numerically when every item is a number, else by text;
/// descending when the instruction asks for it ("descending", "내림차순").
pub(super) fn sort_lines(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let (mut items, shape) = items(input)?;
    let instruction = input.instruction.to_lowercase();
    let descending = ["descending", "reverse", "largest first", "내림차순"]
        .iter()
        .any(|w| instruction.contains(w));
    let numbers: Option<Vec<f64>> = items
        .iter()
        .map(|i| i.replace(',', "").parse::<f64>().ok())
        .collect();
    match numbers {
        Some(numbers) => {
            let mut pairs: Vec<(f64, &str)> =
                numbers.into_iter().zip(items.iter().copied()).collect();
            pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
            items = pairs.into_iter().map(|(_, item)| item).collect();
        }
        None => items.sort_by(|a, b| a.to_lowercase().cmp(&b.to_lowercase()).then(a.cmp(b))),
    }
    if descending {
        items.reverse();
    }
    Ok(shape.join(&items))
}

/// Removes repeated items (ignoring case and surrounding space), keeping the first.
pub(super) fn dedupe_lines(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let (items, shape) = items(input)?;
    let mut seen = std::collections::HashSet::new();
    let kept: Vec<&str> = items
        .into_iter()
        .filter(|i| seen.insert(i.to_lowercase()))
        .collect();
    Ok(shape.join(&kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        f: fn(&ToolInput<'_>) -> Result<String, ToolError>,
        instruction: &str,
        input: &str,
    ) -> String {
        f(&ToolInput { instruction, input }).unwrap()
    }

    #[test]
    fn sorts_numbers_numerically_and_text_alphabetically() {
        assert_eq!(
            run(sort_lines, "Sort them in descending order", "10\n9\n100"),
            "100\n10\n9"
        );
        assert_eq!(
            run(sort_lines, "내림차순으로 정렬하세요", "3, 1, 2"),
            "3, 2, 1"
        );
        assert_eq!(
            run(sort_lines, "sort alphabetically", "pear\nApple\nbanana"),
            "Apple\nbanana\npear"
        );
        assert!(sort_lines(&ToolInput {
            instruction: "sort",
            input: " "
        })
        .is_err());
    }

    #[test]
    fn a_json_array_stays_a_json_array() {
        assert_eq!(
            run(sort_lines, "Sort them in descending order", "[12,7.5,30]"),
            "[30, 12, 7.5]"
        );
        assert_eq!(run(dedupe_lines, "", "[1, 2, 1]"), "[1, 2]");
        // Arrays of strings or objects are not split at their commas.
        assert_eq!(
            run(sort_lines, "sort", "[\"b, c\", \"a\"]\nz"),
            "[\"b, c\", \"a\"]\nz"
        );
    }

    #[test]
    fn dedupes_keeping_the_first_spelling() {
        assert_eq!(
            run(dedupe_lines, "", "rust, Go, rust , go, 러스트, 러스트"),
            "rust, Go, 러스트"
        );
        assert_eq!(run(dedupe_lines, "", "a\nb\na"), "a\nb");
    }
}
