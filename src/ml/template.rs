//! From dataset records to training text: every format is read as a conversation, and a
//! template (Alpaca, ChatML, or the user's) renders it into segments that say which text
//! the loss is computed on (the responses, i.e. the twin's turns).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chat_template::ChatTemplate;

/// Who speaks a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The other side of the conversation.
    User,
    /// The twin: these turns are trained on.
    Assistant,
}

/// One dataset record as turns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Conversation {
    /// Turns in order.
    pub turns: Vec<(Role, String)>,
}

impl Conversation {
    /// The last user turn's text (empty when there is none): what a reply answers.
    pub fn last_user(&self) -> String {
        self.turns
            .iter()
            .rev()
            .find(|(r, _)| *r == Role::User)
            .map(|t| t.1.clone())
            .unwrap_or_default()
    }

    /// Reads a record of any dataset format (alpaca, chatml/messages, sharegpt, preference:
    /// the chosen answer). `None` when the record has none of the known shapes.
    pub fn from_record(record: &Value) -> Option<Self> {
        let text = |v: &Value| v.as_str().map(str::to_string);
        if let Some(output) = record.get("output").and_then(Value::as_str) {
            let instruction = record.get("instruction").and_then(text).unwrap_or_default();
            let input = record.get("input").and_then(text).unwrap_or_default();
            let mut turns = Vec::new();
            if input.is_empty() {
                turns.push((Role::User, instruction));
            } else {
                turns.push((Role::System, instruction));
                turns.push((Role::User, input));
            }
            turns.push((Role::Assistant, output.to_string()));
            return Some(Self { turns });
        }
        if let Some(list) = record.get("messages").and_then(Value::as_array) {
            let turns = list
                .iter()
                .map(|m| {
                    let role = parse_role(m.get("role")?.as_str()?)?;
                    Some((role, text(m.get("content")?)?))
                })
                .collect::<Option<Vec<_>>>()?;
            return Some(Self { turns });
        }
        if let Some(list) = record.get("conversations").and_then(Value::as_array) {
            let turns = list
                .iter()
                .map(|m| {
                    let role = parse_role(m.get("from")?.as_str()?)?;
                    Some((role, text(m.get("value")?)?))
                })
                .collect::<Option<Vec<_>>>()?;
            return Some(Self { turns });
        }
        if let (Some(prompt), Some(chosen)) = (
            record.get("prompt").and_then(Value::as_str),
            record.get("chosen").and_then(Value::as_str),
        ) {
            return Some(Self {
                turns: vec![
                    (Role::User, prompt.to_string()),
                    (Role::Assistant, chosen.to_string()),
                ],
            });
        }
        None
    }

    /// The conversation up to (without) its last assistant turn, and that turn: what a
    /// model is asked and what the dataset says it should answer.
    pub fn split_last_reply(&self) -> Option<(Conversation, String)> {
        let last = self
            .turns
            .iter()
            .rposition(|(r, _)| *r == Role::Assistant)?;
        Some((
            Conversation {
                turns: self.turns[..last].to_vec(),
            },
            self.turns[last].1.clone(),
        ))
    }
}

fn parse_role(s: &str) -> Option<Role> {
    match s {
        "system" => Some(Role::System),
        "user" | "human" => Some(Role::User),
        "assistant" | "gpt" | "model" => Some(Role::Assistant),
        _ => None,
    }
}

/// A piece of rendered text and whether the loss covers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The text.
    pub text: String,
    /// Part of a response (trained on).
    pub train: bool,
}

/// How conversations become text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Template {
    /// Stanford Alpaca's prompt (`### Instruction:` / `### Input:` / `### Response:`).
    Alpaca,
    /// ChatML (`<|im_start|>role ... <|im_end|>`), as Qwen and SmolLM use.
    Chatml,
    /// A user string with `{instruction}`, `{input}` and `{output}`: everything from
    /// `{output}` on is the response.
    Custom(String),
    /// The model's own chat template (`template: model`), rendered as transformers does.
    Model(Box<ChatTemplate>),
}

const ALPACA_HEAD: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";
const ALPACA_HEAD_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n";

/// The `template` value that selects the model's own chat template.
pub const MODEL_TEMPLATE: &str = "model";

impl Template {
    /// Checks a `template` value: `alpaca`, `chatml`, `model`, or a string with
    /// `{output}`.
    pub fn check(s: &str) -> Result<(), String> {
        if s == MODEL_TEMPLATE {
            return Ok(());
        }
        Self::parse(s).map(|_| ())
    }

    /// A `template` value: `model` reads the chat template of the model in `model_dir`
    /// (its stop tokens through `tokenizer`).
    pub fn load(
        s: &str,
        model_dir: Option<&Path>,
        tokenizer: &tokenizers::Tokenizer,
    ) -> Result<Self, String> {
        if s != MODEL_TEMPLATE {
            return Self::parse(s);
        }
        let dir = model_dir.ok_or(
            "template: model reads the chat template of a pretrained model; a scratch model has none",
        )?;
        Ok(Template::Model(Box::new(ChatTemplate::from_model_dir(
            dir, tokenizer,
        )?)))
    }

    /// Parses a `template` value other than `model`: `alpaca`, `chatml`, or a string with
    /// `{output}`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "alpaca" => Ok(Template::Alpaca),
            "chatml" => Ok(Template::Chatml),
            MODEL_TEMPLATE => Err("template: model needs the model's directory to read its chat template from".into()),
            custom if custom.contains("{output}") => Ok(Template::Custom(custom.to_string())),
            other => Err(format!(
                "template {other:?} is neither `alpaca`, `chatml`, `model` (the model's own chat template) nor a template string with {{output}} (and optionally {{instruction}}, {{input}})"
            )),
        }
    }

    /// The stored name (custom templates are stored whole).
    pub fn name(&self) -> String {
        match self {
            Template::Alpaca => "alpaca".into(),
            Template::Chatml => "chatml".into(),
            Template::Custom(s) => s.clone(),
            Template::Model(_) => MODEL_TEMPLATE.into(),
        }
    }

    /// The model's chat template, for `template: model`.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            Template::Model(t) => Some(t),
            _ => None,
        }
    }

    /// Renders a whole conversation for training; `eos` ends every response (a model's
    /// chat template ends turns itself).
    pub fn render(&self, conv: &Conversation, eos: &str) -> Result<Vec<Segment>, String> {
        Ok(match self {
            Template::Model(t) => {
                let mut out = Vec::new();
                for (text, train) in t.pieces(&conv.turns)? {
                    push(&mut out, text, train);
                }
                out
            }
            Template::Chatml => {
                let mut out = Vec::new();
                for (role, content) in &conv.turns {
                    let role_name = match role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    let head = format!("<|im_start|>{role_name}\n");
                    if *role == Role::Assistant {
                        push(&mut out, head, false);
                        push(&mut out, format!("{content}<|im_end|>"), true);
                        push(&mut out, "\n".into(), false);
                    } else {
                        push(&mut out, format!("{head}{content}<|im_end|>\n"), false);
                    }
                }
                out
            }
            Template::Alpaca | Template::Custom(_) => {
                // Instruction-style templates take one exchange: earlier turns become the
                // input, the last assistant turn the response.
                let (prompt, reply) = match conv.split_last_reply() {
                    Some((p, r)) => (p, Some(r)),
                    None => (conv.clone(), None),
                };
                let mut out = vec![Segment {
                    text: self.prompt(&prompt)?,
                    train: false,
                }];
                if let Some(reply) = reply {
                    push(&mut out, format!("{reply}{}", self.suffix()), true);
                    push(&mut out, eos.to_string(), true);
                }
                out.retain(|s| !s.text.is_empty());
                out
            }
        })
    }

    /// The text a model continues to answer `conv` (its turns so far).
    pub fn prompt(&self, conv: &Conversation) -> Result<String, String> {
        Ok(match self {
            Template::Model(t) => t.render(&conv.turns, true)?,
            Template::Chatml => {
                let mut s: String = self
                    .render(conv, "")?
                    .into_iter()
                    .map(|seg| seg.text)
                    .collect();
                s.push_str("<|im_start|>assistant\n");
                s
            }
            Template::Alpaca | Template::Custom(_) => {
                let (instruction, input) = instruction_and_input(conv);
                match self {
                    Template::Alpaca if input.is_empty() => format!(
                        "{ALPACA_HEAD}### Instruction:\n{instruction}\n\n### Response:\n"
                    ),
                    Template::Alpaca => format!(
                        "{ALPACA_HEAD_INPUT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                    ),
                    Template::Custom(t) => {
                        let head = t.split("{output}").next().unwrap_or_default();
                        head.replace("{instruction}", &instruction)
                            .replace("{input}", &input)
                    }
                    Template::Chatml | Template::Model(_) => unreachable!("handled above"),
                }
            }
        })
    }

    /// The text a custom template puts after `{output}` (part of the response).
    fn suffix(&self) -> String {
        match self {
            Template::Custom(t) => t
                .split_once("{output}")
                .map(|x| x.1)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        }
    }

    /// Text that ends a response in generation (besides the tokenizer's EOS token).
    pub fn stop_strings(&self) -> Vec<String> {
        match self {
            Template::Model(t) => t.stops().to_vec(),
            Template::Chatml => vec!["<|im_end|>".into()],
            Template::Alpaca => vec!["### Instruction:".into()],
            Template::Custom(t) => {
                let tail = t.split_once("{output}").map(|x| x.1).unwrap_or_default();
                if tail.trim().is_empty() {
                    Vec::new()
                } else {
                    vec![tail.to_string()]
                }
            }
        }
    }
}

fn push(out: &mut Vec<Segment>, text: String, train: bool) {
    match out.last_mut() {
        Some(last) if last.train == train => last.text.push_str(&text),
        _ => out.push(Segment { text, train }),
    }
}

/// Instruction = the system turn or the first user turn; input = the turns after it
/// (earlier replies included, speaker-prefixed when there are several).
fn instruction_and_input(conv: &Conversation) -> (String, String) {
    let mut turns = conv.turns.iter();
    let instruction = turns.next().map(|(_, t)| t.clone()).unwrap_or_default();
    let rest: Vec<&(Role, String)> = turns.collect();
    let input = if rest.len() <= 1 {
        rest.first().map(|(_, t)| t.clone()).unwrap_or_default()
    } else {
        rest.iter()
            .map(|(r, t)| match r {
                Role::Assistant => format!("Assistant: {t}"),
                _ => format!("User: {t}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    (instruction, input)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_format_reads_as_the_same_conversation() {
        let alpaca = json!({"instruction": "Say hi", "input": "", "output": "Hi!"});
        let chatml = json!({"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}]});
        let sharegpt = json!({"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]});
        let preference = json!({"prompt": "Say hi", "chosen": "Hi!", "rejected": "no"});
        let a = Conversation::from_record(&alpaca).unwrap();
        for other in [chatml, sharegpt, preference] {
            assert_eq!(Conversation::from_record(&other).unwrap(), a);
        }
        assert!(Conversation::from_record(&json!({"text": "x"})).is_none());
    }

    #[test]
    fn alpaca_trains_on_the_response_and_eos_only() {
        let conv =
            Conversation::from_record(&json!({"instruction": "Q", "input": "ctx", "output": "A"}))
                .unwrap();
        let segs = Template::Alpaca.render(&conv, "</s>").unwrap();
        assert_eq!(segs.len(), 2);
        assert!(!segs[0].train);
        assert!(
            segs[0].text.ends_with("### Input:\nctx\n\n### Response:\n"),
            "{}",
            segs[0].text
        );
        assert_eq!(
            segs[1],
            Segment {
                text: "A</s>".into(),
                train: true
            }
        );
        assert_eq!(
            Template::Alpaca
                .prompt(&conv.split_last_reply().unwrap().0)
                .unwrap(),
            segs[0].text
        );
    }

    #[test]
    fn chatml_trains_on_every_assistant_turn() {
        let conv = Conversation::from_record(&json!({"messages": [
            {"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]}))
        .unwrap();
        let segs = Template::Chatml.render(&conv, "").unwrap();
        let trained: Vec<&str> = segs
            .iter()
            .filter(|s| s.train)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(trained, ["a1<|im_end|>", "a2<|im_end|>"]);
        let all: String = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(all, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n");
        let (prompt, reply) = conv.split_last_reply().unwrap();
        assert_eq!(reply, "a2");
        assert!(Template::Chatml
            .prompt(&prompt)
            .unwrap()
            .ends_with("u2<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn custom_templates_split_at_output() {
        let t = Template::parse("Q: {instruction}\nA: {output}\n").unwrap();
        let conv = Conversation::from_record(&json!({"instruction": "why?", "output": "because"}))
            .unwrap();
        let segs = t.render(&conv, "<eos>").unwrap();
        assert_eq!(segs[0].text, "Q: why?\nA: ");
        assert_eq!(segs[1].text, "because\n<eos>");
        // A whitespace tail would cut multi-line answers: it is no stop string.
        assert!(t.stop_strings().is_empty());
        let tagged = Template::parse("<q>{instruction}</q><a>{output}</a>").unwrap();
        assert_eq!(tagged.stop_strings(), vec!["</a>".to_string()]);
        assert!(Template::parse("no placeholder").is_err());
    }
}
