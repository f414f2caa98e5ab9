//! Extraction: numbers from text, values from JSON documents.

use serde_json::{json, Value};

use super::calc::format_number;
use super::{ToolError, ToolInput};

/// Every number in the input (or, without input, the instruction), in order:
/// digits with an optional sign, thousands commas and a decimal point. The
/// markers of a numbered list (`1.`, `2)` opening a line) are not figures.
/// Whole numbers are written without a fraction (`12`, not `12.0`).
pub(super) fn extract_numbers(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let text = if input.input.trim().is_empty() {
        input.instruction
    } else {
        input.input
    };
    let numbers: Vec<f64> = text
        .lines()
        .flat_map(|line| numbers_in(without_list_marker(line)))
        .collect();
    if numbers.is_empty() {
        return Err(ToolError::BadInput("no numbers in the text".into()));
    }
    let numbers: Vec<Value> = numbers
        .into_iter()
        .map(|n| {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                json!(n as i64)
            } else {
                json!(n)
            }
        })
        .collect();
    Ok(Value::Array(numbers).to_string())
}

/// `line` without a leading `12.` or `12)` list marker.
fn without_list_marker(line: &str) -> &str {
    let trimmed = line.trim_start();
    let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || digits > 3 {
        return line;
    }
    let rest = &trimmed[digits..];
    match rest.strip_prefix(". ").or_else(|| rest.strip_prefix(") ")) {
        Some(rest) => rest,
        None => line,
    }
}

/// The numbers in `text`.
pub(crate) fn numbers_in(text: &str) -> Vec<f64> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let negative = i > 0 && chars[i - 1] == '-' && (i < 2 || !chars[i - 2].is_alphanumeric());
        let mut literal = String::new();
        while i < chars.len() {
            let c = chars[i];
            let next_is_digit = chars.get(i + 1).is_some_and(char::is_ascii_digit);
            let part_of_number =
                c.is_ascii_digit() || (c == '.' && next_is_digit && !literal.contains('.'));
            if part_of_number {
                literal.push(c);
            } else if c != ',' || !next_is_digit {
                break;
            }
            i += 1;
        }
        if let Ok(value) = literal.parse::<f64>() {
            out.push(if negative { -value } else { value });
        }
    }
    out
}

/// The value at a dotted path (`order.total`, array indexes as numbers:
/// `items.0.name`) of the first JSON document in the input or instruction.
/// The path is the first dotted word of the instruction outside the document.
pub(super) fn json_extract(input: &ToolInput<'_>) -> Result<String, ToolError> {
    let (document, rest) = first_json(input.input)
        .map(|(doc, _)| (doc, input.instruction.to_string()))
        .or_else(|| first_json(input.instruction))
        .ok_or_else(|| ToolError::BadInput("no JSON document found".into()))?;
    let path = rest
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | '"' | '\'' | '`'))
        .map(|w| w.trim_end_matches(['.', ':', ')']))
        .find(|w| {
            w.contains('.')
                && w.split('.')
                    .all(|part| !part.is_empty() && part.chars().all(is_path_char))
        })
        .ok_or_else(|| {
            ToolError::BadInput("no dotted path (such as order.total) in the instruction".into())
        })?;
    let mut value = &document;
    for part in path.split('.') {
        value = match value {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .ok_or_else(|| ToolError::BadInput(format!("{path} is not in the document")))?;
    }
    Ok(match value {
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), format_number),
        other => other.to_string(),
    })
}

fn is_path_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '-'
}

/// The first JSON object or array in `text`, and the text without it.
fn first_json(text: &str) -> Option<(Value, String)> {
    text.char_indices()
        .filter(|(_, c)| matches!(c, '{' | '['))
        .find_map(|(start, _)| {
            let mut values =
                serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
            let value = values.next()?.ok()?;
            let end = start + values.byte_offset();
            Some((value, format!("{} {}", &text[..start], &text[end..])))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_signs_decimals_and_thousands() {
        assert_eq!(
            numbers_in("Revenue 1,250.5 then -3 and 42, 7"),
            vec![1250.5, -3.0, 42.0, 7.0]
        );
        assert_eq!(numbers_in("김민수(34), 이영희(52)"), vec![34.0, 52.0]);
        assert_eq!(
            numbers_in("item-7"),
            vec![7.0],
            "a hyphen inside a word is not a sign"
        );
        let out = extract_numbers(&ToolInput {
            instruction: "Extract the figures",
            input: "a 1 b 2.5",
        })
        .unwrap();
        assert_eq!(out, "[1,2.5]");
        let listed = extract_numbers(&ToolInput {
            instruction: "",
            input: "1. Extract the figures from the text: 12, 7.5 and 30\n2) Sort them\n10 apples",
        })
        .unwrap();
        assert_eq!(listed, "[12,7.5,30,10]", "list markers are not figures");
        assert!(extract_numbers(&ToolInput {
            instruction: "",
            input: "none"
        })
        .is_err());
    }

    #[test]
    fn json_extract_follows_the_dotted_path_of_the_sample_request() {
        let instruction = r#"From the JSON {"order": {"id": 42, "total": 99.5}} extract order.total and then format it."#;
        assert_eq!(
            json_extract(&ToolInput {
                instruction,
                input: ""
            })
            .unwrap(),
            "99.5"
        );
        let input = ToolInput {
            instruction: "take items.1.name",
            input: r#"{"items": [{"name": "a"}, {"name": "나"}]}"#,
        };
        assert_eq!(json_extract(&input).unwrap(), "\"나\"");
        let missing = ToolInput {
            instruction: "extract order.missing",
            input: r#"{"order": {}}"#,
        };
        assert!(matches!(
            json_extract(&missing),
            Err(ToolError::BadInput(_))
        ));
        let no_doc = ToolInput {
            instruction: "extract order.total",
            input: "no json",
        };
        assert!(matches!(json_extract(&no_doc), Err(ToolError::BadInput(_))));
    }
}
