//! `when:` conditions: a boolean, or a small expression over `${params.*}` and `${item.*}`
//! references: comparisons (`==`, `!=`, `<`, `<=`, `>`, `>=`), `not`, `and`, `or` and
//! parentheses. Operands are references, numbers, `true`/`false`/`null`, quoted strings,
//! or bare words (strings), so `${params.objective} == dpo` reads as written. Anything
//! else is an error rather than a guess: a condition that silently evaluates to false
//! would skip work without saying why.

use serde_json::Value;

use crate::util::template::{self, Reference};

/// Evaluates `text`, looking references up with `lookup` (which names what is missing).
pub(super) fn evaluate(
    text: &str,
    lookup: &mut dyn FnMut(&Reference) -> Result<Value, String>,
) -> Result<bool, String> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        lookup,
    };
    let value = parser.or()?;
    if parser.pos < parser.tokens.len() {
        return Err(format!(
            "unexpected `{}` in condition `{text}`",
            parser.tokens[parser.pos].text()
        ));
    }
    match value {
        Value::Bool(b) => Ok(b),
        other => Err(format!(
            "condition `{text}` is {} ({other}), not true or false",
            type_name(&other)
        )),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Reference(Reference),
    Literal(Value),
    Op(&'static str),
    Open,
    Close,
}

impl Token {
    fn text(&self) -> String {
        match self {
            Token::Reference(r) if r.name.is_empty() => format!("${{{}}}", r.namespace),
            Token::Reference(r) => format!("${{{}.{}}}", r.namespace, r.name),
            Token::Literal(v) => template::value_text(v),
            Token::Op(op) => op.to_string(),
            Token::Open => "(".into(),
            Token::Close => ")".into(),
        }
    }
}

const OPERATORS: &[&str] = &["==", "!=", "<=", ">=", "<", ">", "!"];

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in condition `{text}`"))?;
            let reference = template::sole_reference(&rest[..end + 3])
                .ok_or_else(|| format!("`{}` is not a reference", &rest[..end + 3]))?;
            tokens.push(Token::Reference(reference));
            rest = &after[end + 1..];
        } else if let Some(op) = OPERATORS.iter().find(|op| rest.starts_with(**op)) {
            tokens.push(Token::Op(if *op == "!" { "not" } else { op }));
            rest = &rest[op.len()..];
        } else if let Some(after) = rest.strip_prefix('(') {
            tokens.push(Token::Open);
            rest = after;
        } else if let Some(after) = rest.strip_prefix(')') {
            tokens.push(Token::Close);
            rest = after;
        } else if rest.starts_with(['"', '\'']) {
            let quote = rest.chars().next().unwrap_or('"');
            let end = rest[1..]
                .find(quote)
                .ok_or_else(|| format!("unterminated string in condition `{text}`"))?;
            tokens.push(Token::Literal(Value::String(rest[1..end + 1].to_string())));
            rest = &rest[end + 2..];
        } else {
            let end = rest
                .char_indices()
                .find(|&(i, c)| {
                    i > 0
                        && (c.is_whitespace()
                            || "()=!<>\"'".contains(c)
                            || rest[i..].starts_with("${"))
                })
                .map_or(rest.len(), |(i, _)| i);
            let word = &rest[..end];
            tokens.push(match word {
                "and" | "or" | "not" => Token::Op(match word {
                    "and" => "and",
                    "or" => "or",
                    _ => "not",
                }),
                "true" => Token::Literal(Value::Bool(true)),
                "false" => Token::Literal(Value::Bool(false)),
                "null" => Token::Literal(Value::Null),
                _ => Token::Literal(
                    word.parse::<i64>()
                        .map(Value::from)
                        .ok()
                        .or_else(|| {
                            word.parse::<f64>()
                                .ok()
                                .and_then(serde_json::Number::from_f64)
                                .map(Value::Number)
                        })
                        .unwrap_or_else(|| Value::String(word.to_string())),
                ),
            });
            rest = &rest[end..];
        }
        rest = rest.trim_start();
    }
    if tokens.is_empty() {
        return Err("the condition is empty".into());
    }
    Ok(tokens)
}

struct Parser<'l> {
    tokens: Vec<Token>,
    pos: usize,
    lookup: &'l mut dyn FnMut(&Reference) -> Result<Value, String>,
}

impl Parser<'_> {
    fn peek_op(&self, op: &str) -> bool {
        matches!(self.tokens.get(self.pos), Some(Token::Op(o)) if *o == op)
    }

    fn or(&mut self) -> Result<Value, String> {
        let mut left = self.and()?;
        while self.peek_op("or") {
            self.pos += 1;
            let right = self.and()?;
            left = Value::Bool(truth(&left, "or")? || truth(&right, "or")?);
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Value, String> {
        let mut left = self.not()?;
        while self.peek_op("and") {
            self.pos += 1;
            let right = self.not()?;
            left = Value::Bool(truth(&left, "and")? && truth(&right, "and")?);
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Value, String> {
        if self.peek_op("not") {
            self.pos += 1;
            let value = self.not()?;
            return Ok(Value::Bool(!truth(&value, "not")?));
        }
        self.comparison()
    }

    fn comparison(&mut self) -> Result<Value, String> {
        let left = self.operand()?;
        let Some(Token::Op(op)) = self.tokens.get(self.pos).cloned() else {
            return Ok(left);
        };
        if !matches!(op, "==" | "!=" | "<" | "<=" | ">" | ">=") {
            return Ok(left);
        }
        self.pos += 1;
        let right = self.operand()?;
        compare(&left, op, &right).map(Value::Bool)
    }

    fn operand(&mut self) -> Result<Value, String> {
        let token = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or("the condition ends where a value was expected")?;
        self.pos += 1;
        match token {
            Token::Reference(r) => (self.lookup)(&r),
            Token::Literal(v) => Ok(v),
            Token::Open => {
                let value = self.or()?;
                match self.tokens.get(self.pos) {
                    Some(Token::Close) => {
                        self.pos += 1;
                        Ok(value)
                    }
                    _ => Err("missing `)` in condition".into()),
                }
            }
            other => Err(format!("expected a value, found `{}`", other.text())),
        }
    }
}

fn truth(value: &Value, op: &str) -> Result<bool, String> {
    value.as_bool().ok_or_else(|| {
        format!(
            "`{op}` needs true or false, got {} ({value})",
            type_name(value)
        )
    })
}

fn compare(left: &Value, op: &str, right: &Value) -> Result<bool, String> {
    use std::cmp::Ordering;
    let ordering = match (left, right) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            a.partial_cmp(&b)
        }
        (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
        _ if matches!(op, "==" | "!=") => {
            let equal = left == right;
            return Ok(equal == (op == "=="));
        }
        _ => {
            return Err(format!(
                "cannot order {} ({left}) and {} ({right}) with `{op}`",
                type_name(left),
                type_name(right)
            ))
        }
    };
    let Some(ordering) = ordering else {
        return Ok(op == "!=");
    };
    Ok(match op {
        "==" => ordering == Ordering::Equal,
        "!=" => ordering != Ordering::Equal,
        "<" => ordering == Ordering::Less,
        "<=" => ordering != Ordering::Greater,
        ">" => ordering == Ordering::Greater,
        _ => ordering != Ordering::Less,
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(text: &str) -> Result<bool, String> {
        let values = json!({"use_dpo": false, "objective": "dpo", "rank": 16, "lr": 0.0003});
        evaluate(text, &mut |r: &Reference| {
            values
                .get(&r.name)
                .cloned()
                .ok_or_else(|| format!("no {}", r.name))
        })
    }

    #[test]
    fn booleans_comparisons_and_logic() {
        assert!(!eval("${params.use_dpo}").unwrap());
        assert!(eval("not ${params.use_dpo}").unwrap());
        assert!(eval("!${params.use_dpo}").unwrap());
        assert!(eval("${params.objective} == dpo").unwrap());
        assert!(eval("${params.objective} != 'sft'").unwrap());
        assert!(eval("${item.rank} >= 16 and ${item.lr} < 1e-3").unwrap());
        assert!(!eval("${item.rank} > 16 or (${item.lr} > 0.001)").unwrap());
        assert!(eval("true").unwrap());
    }

    #[test]
    fn nonsense_is_an_error_not_false() {
        assert!(eval("${params.objective}")
            .unwrap_err()
            .contains("not true or false"));
        assert!(eval("${params.rank} < dpo").is_err());
        assert!(eval("${params.missing}")
            .unwrap_err()
            .contains("no missing"));
        assert!(eval("${params.use_dpo} and").is_err());
        assert!(eval("(${params.use_dpo}").is_err());
        assert!(eval("").is_err());
        assert!(eval("1 2").unwrap_err().contains("unexpected"));
    }
}
