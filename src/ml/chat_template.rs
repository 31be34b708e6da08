//! A model's own chat template (`chat_template` in tokenizer_config.json, or
//! chat_template.jinja beside it), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it with Jinja2: the same environment settings
//! (`trim_blocks`, `lstrip_blocks`, loop controls), the same globals (`raise_exception`,
//! `strftime_now`, `bos_token`, `eos_token`, `add_generation_prompt`), Python's string
//! methods, and `tojson` with Python's separators.
//!
//! Training needs to know which text is the model's: each assistant turn is found by
//! rendering the conversation up to it with and without that turn (what TRL does for
//! templates without generation markers), so the loss covers exactly what the template
//! puts there, end-of-turn tokens included.

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde_json::{json, Value};

use super::template::Role;

/// A Hugging Face chat template with the special tokens it refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Texts that end a reply: the template's EOS token and the tokens of
    /// generation_config.json's `eos_token_id`.
    stops: Vec<String>,
}

const TEMPLATE_FILE: &str = "chat_template.jinja";

impl ChatTemplate {
    /// A template from its source and special tokens.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, String> {
        let t = Self {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            stops: if eos_token.is_empty() {
                Vec::new()
            } else {
                vec![eos_token.to_string()]
            },
        };
        environment(&t.source)?;
        Ok(t)
    }

    /// The template of the model in `dir` (tokenizer_config.json's `chat_template`, a
    /// string or the `default` of a list of named templates, else chat_template.jinja),
    /// with stop tokens from generation_config.json mapped through `tokenizer`.
    pub fn from_model_dir(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<Self, String> {
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    format!(
                        "{}: chat_template lists no template named `default`",
                        config_path.display()
                    )
                })?,
            _ => std::fs::read_to_string(dir.join(TEMPLATE_FILE)).map_err(|_| {
                format!(
                    "template: model, but {} has no chat template (no `chat_template` in tokenizer_config.json, no {TEMPLATE_FILE}); use alpaca, chatml or a template string",
                    dir.display()
                )
            })?,
        };
        let token = |key: &str| match &config[key] {
            Value::String(s) => s.clone(),
            Value::Object(o) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        let mut t = Self::new(&source, &token("bos_token"), &token("eos_token"))
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let generation = std::fs::read_to_string(dir.join("generation_config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok());
        if let Some(ids) = generation.map(|g| g["eos_token_id"].clone()) {
            let ids: Vec<u64> = match ids {
                Value::Number(n) => n.as_u64().into_iter().collect(),
                Value::Array(list) => list.iter().filter_map(Value::as_u64).collect(),
                _ => Vec::new(),
            };
            for id in ids {
                if let Some(tok) = tokenizer.id_to_token(id as u32) {
                    t.add_stop(&tok);
                }
            }
        }
        Ok(t)
    }

    /// Adds a text that ends a reply (an end-of-turn token).
    pub fn add_stop(&mut self, stop: &str) {
        if !stop.is_empty() && !self.stops.iter().any(|s| s == stop) {
            self.stops.push(stop.to_string());
        }
    }

    /// The template source (written to the tokenizer_config.json of trained models).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS token the template refers to.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS token the template refers to.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Texts that end a reply in generation.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }

    /// Renders `turns` as transformers' `apply_chat_template(tokenize=False)` does.
    pub fn render(
        &self,
        turns: &[(Role, String)],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let env = environment(&self.source)?;
        let messages: Vec<Value> = turns
            .iter()
            .map(|(role, content)| json!({"role": role_name(*role), "content": content}))
            .collect();
        let tmpl = env.get_template("chat").map_err(describe)?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(describe)
    }

    /// Splits the rendering of a conversation into `(text, is_reply)` pieces that
    /// concatenate to it. A reply is what rendering the conversation up to that assistant
    /// turn adds after the generation prompt, as far as the whole rendering agrees (a
    /// template may close the text differently when a conversation ends there).
    pub fn pieces(&self, turns: &[(Role, String)]) -> Result<Vec<(String, bool)>, String> {
        let all = self.render(turns, false)?;
        let mut out = Vec::new();
        let mut done = 0;
        for (i, (role, _)) in turns.iter().enumerate() {
            if *role != Role::Assistant {
                continue;
            }
            let prompt = self.render(&turns[..i], true)?;
            let full = self.render(&turns[..=i], false)?;
            let start = prompt.len();
            if !all.starts_with(prompt.as_str())
                || !full.starts_with(prompt.as_str())
                || start < done
            {
                return Err(format!(
                    "the chat template does not render conversations incrementally (turn {} changes the text before it), so cairn cannot tell which tokens are the replies; use alpaca, chatml or a template string",
                    i + 1
                ));
            }
            // Where the two renderings part can fall inside the next special token
            // ("<|end|>" then "<|user|>" or "<|endoftext|>"): the reply ends after its
            // last end-of-turn token when it has one.
            let agreed = common_prefix(&full[start..], &all[start..]);
            let span = &all[start..start + agreed];
            let reply = self
                .stops
                .iter()
                .filter_map(|stop| span.rfind(stop.as_str()).map(|i| i + stop.len()))
                .max()
                .unwrap_or(agreed);
            out.push((all[done..start].to_string(), false));
            out.push((all[start..start + reply].to_string(), true));
            done = start + reply;
        }
        out.push((all[done..].to_string(), false));
        out.retain(|(text, _)| !text.is_empty());
        Ok(out)
    }
}

/// Length in bytes of the longest common prefix of `a` and `b`, on a char boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

fn describe(e: minijinja::Error) -> String {
    let mut text = format!("chat template: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        text.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    text
}

/// The Jinja environment transformers compiles chat templates in.
fn environment(source: &str) -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| -> String {
        strftime_now(&format)
    });
    env.add_filter("tojson", python_json);
    env.add_template_owned("chat", source.to_string())
        .map_err(describe)?;
    Ok(env)
}

/// `json.dumps(value, ensure_ascii=False)`: Python's separators (`, ` and `: `), key
/// order kept; transformers' `tojson` filter.
fn python_json(value: JinjaValue, indent: Option<usize>) -> Result<String, minijinja::Error> {
    let value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&value, indent, 0, &mut out);
    Ok(out)
}

fn write_python_json(value: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(v, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn strftime_now(format: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{:02}", now.day())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(now.month()))),
            Some('Y') => out.push_str(&now.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", now.year() % 100)),
            Some('b') => out.push_str(&now.month().to_string()[..3]),
            Some('B') => out.push_str(&now.month().to_string()),
            Some('H') => out.push_str(&format!("{:02}", now.hour())),
            Some('M') => out.push_str(&format!("{:02}", now.minute())),
            Some('S') => out.push_str(&format!("{:02}", now.second())),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns() -> Vec<(Role, String)> {
        vec![
            (Role::System, "Be brief.".into()),
            (Role::User, "Hi".into()),
            (Role::Assistant, "Hello!".into()),
            (Role::User, "Bye".into()),
            (Role::Assistant, "See you.".into()),
        ]
    }

    fn replies(pieces: &[(String, bool)]) -> Vec<&str> {
        pieces
            .iter()
            .filter(|p| p.1)
            .map(|p| p.0.as_str())
            .collect()
    }

    const HEADERS: &str = "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}";

    #[test]
    fn replies_are_the_assistant_turns_with_their_end_tokens() {
        let t = ChatTemplate::new(HEADERS, "<s>", "<|eot|>").unwrap();
        let pieces = t.pieces(&turns()).unwrap();
        let replies = replies(&pieces);
        assert_eq!(replies, ["Hello!<|eot|>", "See you.<|eot|>"]);
        let all: String = pieces.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(all, t.render(&turns(), false).unwrap());
        assert!(all.starts_with("<s><|start|>system\n\nBe brief.<|eot|>"));
    }

    #[test]
    fn template_errors_and_raised_exceptions_are_reported() {
        assert!(ChatTemplate::new("{% for %}", "", "")
            .unwrap_err()
            .contains("chat template"));
        let strict = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = strict.render(&turns(), false).unwrap_err();
        assert!(err.contains("System role not supported"), "{err}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::new("{{ {'a': [1, 'é'], 'b': {}} | tojson }}", "", "").unwrap();
        assert_eq!(t.render(&[], false).unwrap(), r#"{"a": [1, "é"], "b": {}}"#);
    }

    #[test]
    fn a_template_that_closes_the_conversation_differently_still_splits() {
        // Phi-3 style: EOS only when no generation prompt follows.
        let mut t = ChatTemplate::new(
            "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}",
            "",
            "<|endoftext|>",
        )
        .unwrap();
        t.add_stop("<|end|>");
        let pieces = t.pieces(&turns()).unwrap();
        let replies = replies(&pieces);
        assert_eq!(replies, ["Hello!<|end|>", "See you.<|end|>\n<|endoftext|>"]);
        let all: String = pieces.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(all, t.render(&turns(), false).unwrap());
    }

    #[test]
    fn templates_that_rewrite_earlier_turns_are_refused() {
        // Puts the number of messages first: every turn changes the text before it.
        let t = ChatTemplate::new(
            "{{ messages | length }}{% for m in messages %}{{ m.content }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(t.pieces(&turns()).unwrap_err().contains("incrementally"));
    }
}
