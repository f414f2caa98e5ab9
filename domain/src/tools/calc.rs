//! Arithmetic: `+ - * / %`, parentheses, unary signs and decimals, evaluated
//! by a small recursive-descent parser with a nesting limit.

use super::{ToolError, ToolInput};

/// Deepest parenthesis nesting accepted (keeps recursion bounded).
const MAX_DEPTH: usize = 64;

/// Evaluates the arithmetic expression found in the instruction (or else in
/// the input): the longest run of digits, operators, parentheses, points and
/// spaces that contains an operator. Without an expression, an instruction
/// that asks for a total or sum ("Compute their total", "합계를 계산하세요")
/// adds up the numbers of the input.
pub(super) fn calculate(input: &ToolInput<'_>) -> Result<String, ToolError> {
    if let Some(expression) =
        find_expression(input.instruction).or_else(|| find_expression(input.input))
    {
        return Ok(format_number(evaluate(expression)?));
    }
    let asks_for_total = crate::text::words(input.instruction).iter().any(|w| {
        ["total", "sum", "합계", "합산", "총합"]
            .iter()
            .any(|k| w.starts_with(k))
    });
    let numbers = super::extract::numbers_in(input.input);
    if asks_for_total && !numbers.is_empty() {
        return Ok(format_number(numbers.iter().sum()));
    }
    Err(ToolError::BadInput("no arithmetic expression found".into()))
}

fn is_expression_char(c: char) -> bool {
    c.is_ascii_digit()
        || matches!(
            c,
            '+' | '-' | '*' | '/' | '%' | '(' | ')' | '.' | ' ' | '×' | '÷'
        )
}

fn find_expression(text: &str) -> Option<&str> {
    let mut best: Option<&str> = None;
    let mut start = None;
    for (i, c) in text
        .char_indices()
        .chain(std::iter::once((text.len(), '\0')))
    {
        match (is_expression_char(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let candidate = text[s..i].trim();
                let has_digit = candidate.chars().any(|c| c.is_ascii_digit());
                let has_operator = candidate
                    .chars()
                    .any(|c| matches!(c, '+' | '*' | '/' | '%' | '×' | '÷'))
                    || candidate.trim_start_matches('-').contains('-');
                if has_digit && has_operator && best.is_none_or(|b| candidate.len() > b.len()) {
                    best = Some(candidate);
                }
                start = None;
            }
            _ => {}
        }
    }
    best
}

/// Evaluates `expression` exactly as written.
pub(super) fn evaluate(expression: &str) -> Result<f64, ToolError> {
    let tokens: Vec<char> = expression.chars().filter(|c| !c.is_whitespace()).collect();
    let mut parser = Parser {
        tokens: &tokens,
        at: 0,
        depth: 0,
    };
    let value = parser.sum()?;
    if parser.at != tokens.len() {
        return Err(ToolError::BadInput(format!(
            "unexpected {:?} in {expression:?}",
            tokens[parser.at]
        )));
    }
    if !value.is_finite() {
        return Err(ToolError::BadInput(format!(
            "{expression:?} has no finite value"
        )));
    }
    Ok(value)
}

struct Parser<'a> {
    tokens: &'a [char],
    at: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.tokens.get(self.at).copied()
    }

    fn sum(&mut self) -> Result<f64, ToolError> {
        let mut value = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.at += 1;
            let rhs = self.product()?;
            value = if op == '+' { value + rhs } else { value - rhs };
        }
        Ok(value)
    }

    fn product(&mut self) -> Result<f64, ToolError> {
        let mut value = self.factor()?;
        while let Some(op @ ('*' | '/' | '%' | '×' | '÷')) = self.peek() {
            self.at += 1;
            let rhs = self.factor()?;
            if matches!(op, '/' | '%' | '÷') && rhs == 0.0 {
                return Err(ToolError::BadInput("division by zero".into()));
            }
            value = match op {
                '*' | '×' => value * rhs,
                '%' => value % rhs,
                _ => value / rhs,
            };
        }
        Ok(value)
    }

    fn factor(&mut self) -> Result<f64, ToolError> {
        match self.peek() {
            Some('-') => {
                self.at += 1;
                Ok(-self.factor()?)
            }
            Some('+') => {
                self.at += 1;
                self.factor()
            }
            Some('(') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(ToolError::BadInput(format!(
                        "parentheses nested deeper than {MAX_DEPTH}"
                    )));
                }
                self.at += 1;
                let value = self.sum()?;
                if self.peek() != Some(')') {
                    return Err(ToolError::BadInput("missing closing parenthesis".into()));
                }
                self.at += 1;
                self.depth -= 1;
                Ok(value)
            }
            Some(c) if c.is_ascii_digit() || c == '.' => {
                let start = self.at;
                while self.peek().is_some_and(|c| c.is_ascii_digit() || c == '.') {
                    self.at += 1;
                }
                let literal: String = self.tokens[start..self.at].iter().collect();
                literal
                    .parse()
                    .map_err(|_| ToolError::BadInput(format!("{literal:?} is not a number")))
            }
            Some(c) => Err(ToolError::BadInput(format!("unexpected {c:?}"))),
            None => Err(ToolError::BadInput("the expression ends too early".into())),
        }
    }
}

/// Integral values without a fractional part, others as Rust prints them.
pub(super) fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calc(instruction: &str) -> Result<String, ToolError> {
        calculate(&ToolInput {
            instruction,
            input: "",
        })
    }

    #[test]
    fn evaluates_the_expressions_of_the_sample_requests() {
        assert_eq!(
            calc("Compute (17 * 23) + 4, then explain the result in one sentence.").unwrap(),
            "395"
        );
        assert_eq!(
            calc("(17 * 23) + 4를 계산하고, 그리고 나서 결과를 설명해 주세요.").unwrap(),
            "395"
        );
        assert_eq!(calc("what is 7 / 2 - -1.5").unwrap(), "5");
        assert_eq!(calc("2 + 3 * 4 % 5").unwrap(), "4");
        assert_eq!(calc("1 / 3").unwrap(), format!("{}", 1.0 / 3.0));
    }

    #[test]
    fn a_total_without_an_expression_adds_up_the_input() {
        let total = |instruction, input| calculate(&ToolInput { instruction, input });
        assert_eq!(
            total("Compute their total", "[99.5, 42, -1.5]").unwrap(),
            "140"
        );
        assert_eq!(total("합계를 계산하세요", "3\n2\n1").unwrap(), "6");
        assert!(total("Compute it", "3 2 1").is_err());
        assert!(total("Compute their total", "none").is_err());
    }

    #[test]
    fn refuses_what_is_not_arithmetic() {
        for bad in ["no numbers here", "1 / 0", "(1 + 2", "1 + * 2", "7 % 0"] {
            assert!(matches!(calc(bad), Err(ToolError::BadInput(_))), "{bad}");
        }
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(matches!(
            evaluate(&format!("{deep}+1")),
            Err(ToolError::BadInput(_))
        ));
    }
}
