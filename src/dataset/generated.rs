//! The LLM builders: `generate` (instruction/answer pairs in the author's style),
//! `style_pairs` (plain rewrite -> original) and `preference` (verbatim chosen vs
//! generated rejected). Each turns extracts into chat requests and parses the replies;
//! sending them (limits, retries, cache, cost) is [`crate::llm`]'s job.

use serde_json::Value;

use super::extracts::Extract;
use super::{Drops, Example};
use crate::llm::{ChatMessage, Completion};

/// Default prompt of `generate` (the reference design's, with `{pairs}` and `{extract}`).
pub const GENERATE_PROMPT: &str =
    "Based on the following extract, generate {pairs} instruction-answer pairs. \
Each instruction must ask to write about a specific topic contained in the extract. \
Each answer must provide a relevant paragraph based on the information found in the extract. \
Only use concepts from the extract to generate the instructions and answers. \
Instructions must never explicitly mention a context, a system, a course, or an extract. \
Instructions must be self-contained and general. \
Answers must imitate the writing style of the extract.\n\n\
Reply with JSON only, in this structure:\n\
{\"instruction_answer_pairs\": [{\"instruction\": \"...\", \"answer\": \"...\"}]}\n\n\
Extract:\n{extract}";

/// Default prompt of `preference`.
pub const PREFERENCE_PROMPT: &str = "Based on the following extract, generate {pairs} instruction-answer triples. Each triple has:\n\
1. an instruction asking about a specific topic in the extract;\n\
2. a generated answer that answers the instruction from the extract, in your own words;\n\
3. an extracted answer: a passage copied verbatim from the extract (every character, punctuation and apostrophe), \
at least 100 characters long, starting with a capital letter and ending with a full stop, question mark or exclamation mark.\n\
Instructions must be self-contained and never mention the extract.\n\n\
Reply with JSON only, in this structure:\n\
{\"preference_triples\": [{\"instruction\": \"...\", \"generated_answer\": \"...\", \"extracted_answer\": \"...\"}]}\n\n\
Extract:\n{extract}";

/// Default prompt of `style_pairs`.
pub const STYLE_PROMPT: &str =
    "Rewrite the following text as {variant}. Keep every fact and drop the author's voice: \
plain, neutral wording. Reply with the rewrite only.\n\nText:\n{extract}";

/// Default system message of the JSON builders.
pub const SYSTEM_JSON: &str =
    "You generate training data from the text you are given. Reply with a JSON object only.";

/// Default rewrite variants of `style_pairs`.
pub fn default_variants() -> Vec<String> {
    vec![
        "concise study notes".into(),
        "a learner's first draft".into(),
        "bullet points".into(),
    ]
}

/// Which LLM builder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlmBuilder {
    /// Instruction/answer pairs.
    Generate,
    /// Plain rewrite -> original.
    StylePairs,
    /// Verbatim chosen vs generated rejected.
    Preference,
}

impl LlmBuilder {
    /// The builder's name.
    pub fn name(self) -> &'static str {
        match self {
            LlmBuilder::Generate => "generate",
            LlmBuilder::StylePairs => "style_pairs",
            LlmBuilder::Preference => "preference",
        }
    }

    /// The default prompt template.
    pub fn default_prompt(self) -> &'static str {
        match self {
            LlmBuilder::Generate => GENERATE_PROMPT,
            LlmBuilder::StylePairs => STYLE_PROMPT,
            LlmBuilder::Preference => PREFERENCE_PROMPT,
        }
    }

    /// Whether replies are JSON.
    pub fn json(self) -> bool {
        self != LlmBuilder::StylePairs
    }
}

/// What the builders need besides the extracts.
#[derive(Clone, Debug)]
pub struct PromptSettings {
    /// The builder.
    pub builder: LlmBuilder,
    /// User-message template with `{extract}` (and `{pairs}` / `{variant}`).
    pub template: String,
    /// System message (none for `style_pairs` unless given).
    pub system: Option<String>,
    /// Pairs asked per extract (`generate`, `preference`).
    pub pairs_per_extract: usize,
    /// Rewrite variants (`style_pairs`).
    pub variants: Vec<String>,
    /// Instruction of style pairs.
    pub style_instruction: String,
}

/// One request to make.
#[derive(Clone, Debug)]
pub struct Request {
    /// Index of its extract.
    pub extract: usize,
    /// The rewrite variant (`style_pairs`).
    pub variant: Option<String>,
    /// The messages.
    pub messages: Vec<ChatMessage>,
}

/// The requests for `extracts`, in a fixed order.
pub fn requests(extracts: &[Extract], s: &PromptSettings) -> Vec<Request> {
    let fill = |template: &str, extract: &str, variant: Option<&str>| {
        template
            .replace("{pairs}", &s.pairs_per_extract.to_string())
            .replace("{variant}", variant.unwrap_or(""))
            .replace("{extract}", extract)
    };
    let messages = |user: String| {
        let mut m = Vec::new();
        if let Some(sys) = &s.system {
            m.push(ChatMessage::system(sys.clone()));
        }
        m.push(ChatMessage::user(user));
        m
    };
    let mut out = Vec::new();
    for (i, e) in extracts.iter().enumerate() {
        match s.builder {
            LlmBuilder::StylePairs => {
                for v in &s.variants {
                    out.push(Request {
                        extract: i,
                        variant: Some(v.clone()),
                        messages: messages(fill(&s.template, &e.text, Some(v))),
                    });
                }
            }
            _ => out.push(Request {
                extract: i,
                variant: None,
                messages: messages(fill(&s.template, &e.text, None)),
            }),
        }
    }
    out
}

/// Parses a strict-JSON reply; a single surrounding markdown code fence is tolerated
/// (many models add one even in JSON mode), nothing else.
fn parse_json(content: &str) -> Result<Value, String> {
    let t = content.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.trim_end().strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(t.trim()).map_err(|e| format!("reply is not JSON ({e})"))
}

/// The array under `key` (or the reply itself when it is an array).
fn items<'a>(reply: &'a Value, key: &str) -> Result<&'a Vec<Value>, String> {
    match reply {
        Value::Array(a) => Ok(a),
        Value::Object(o) => o
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("reply has no `{key}` array")),
        _ => Err("reply is neither an object nor an array".to_string()),
    }
}

fn text_field<'a>(item: &'a Value, key: &str) -> Option<&'a str> {
    item.get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turns one reply into examples; malformed replies and items are dropped with a reason.
pub fn parse(
    s: &PromptSettings,
    extract: &Extract,
    reply: &Completion,
    drops: &mut Drops,
) -> Vec<Example> {
    let what = || super::snippet(&reply.content, 120);
    if reply.finish_reason.as_deref() == Some("length") && s.builder.json() {
        drops.drop("malformed reply: cut off at max_tokens", what());
        return Vec::new();
    }
    let example =
        |instruction: String, input: String, output: String, rejected: Option<String>| Example {
            builder: s.builder.name().into(),
            category: extract.category.clone(),
            source: extract.id.clone(),
            instruction,
            input,
            output,
            rejected,
            judge: None,
        };
    match s.builder {
        LlmBuilder::StylePairs => {
            let plain = reply.content.trim();
            if plain.is_empty() {
                drops.drop("malformed reply: empty rewrite", extract.text.clone());
                return Vec::new();
            }
            if squash(plain) == squash(&extract.text) {
                drops.drop("rewrite is identical to the original", what());
                return Vec::new();
            }
            vec![example(
                s.style_instruction.clone(),
                plain.to_string(),
                extract.text.trim().to_string(),
                None,
            )]
        }
        LlmBuilder::Generate | LlmBuilder::Preference => {
            let key = if s.builder == LlmBuilder::Generate {
                "instruction_answer_pairs"
            } else {
                "preference_triples"
            };
            let parsed = parse_json(&reply.content).and_then(|v| items(&v, key).cloned());
            let list = match parsed {
                Ok(list) => list,
                Err(reason) => {
                    drops.drop(format!("malformed reply: {reason}"), what());
                    return Vec::new();
                }
            };
            let mut out = Vec::new();
            let source = squash(&extract.text);
            for item in list.iter().take(s.pairs_per_extract) {
                let instruction = text_field(item, "instruction");
                if s.builder == LlmBuilder::Generate {
                    match (instruction, text_field(item, "answer")) {
                        (Some(i), Some(a)) => {
                            out.push(example(i.into(), String::new(), a.into(), None))
                        }
                        _ => drops.drop(
                            "malformed item: needs string `instruction` and `answer`",
                            item.to_string(),
                        ),
                    }
                    continue;
                }
                let (Some(i), Some(rejected), Some(chosen)) = (
                    instruction,
                    text_field(item, "generated_answer"),
                    text_field(item, "extracted_answer"),
                ) else {
                    drops.drop(
                        "malformed item: needs `instruction`, `generated_answer`, `extracted_answer`",
                        item.to_string(),
                    );
                    continue;
                };
                if let Some(reason) = preference_check(chosen, &source) {
                    drops.drop(reason, chosen.to_string());
                    continue;
                }
                out.push(example(
                    i.into(),
                    String::new(),
                    chosen.into(),
                    Some(rejected.into()),
                ));
            }
            out
        }
    }
}

/// The reference design's filters on a chosen answer, plus the check that it really is
/// verbatim: why it fails, or `None`.
pub fn preference_check(chosen: &str, squashed_source: &str) -> Option<&'static str> {
    if chosen.chars().count() < 100 {
        return Some("chosen answer under 100 characters");
    }
    if !chosen.chars().next().is_some_and(char::is_uppercase) {
        return Some("chosen answer does not start with a capital letter");
    }
    if !chosen.ends_with(['.', '!', '?']) {
        return Some("chosen answer does not end with . ! or ?");
    }
    if !squashed_source.contains(&squash(chosen)) {
        return Some("chosen answer is not verbatim from the extract");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;

    fn settings(builder: LlmBuilder) -> PromptSettings {
        PromptSettings {
            builder,
            template: builder.default_prompt().into(),
            system: Some(SYSTEM_JSON.into()),
            pairs_per_extract: 2,
            variants: default_variants(),
            style_instruction: "Rewrite this in the author's style.".into(),
        }
    }

    fn reply(content: &str) -> Completion {
        Completion {
            content: content.into(),
            finish_reason: Some("stop".into()),
            usage: Usage::default(),
            cached: false,
        }
    }

    const TEXT: &str = "Sourdough is slow bread. A starter needs feeding twice a day, and a loaf needs a whole day from mixing to baking, which is exactly why I love it so much.";

    fn extract() -> Extract {
        Extract {
            id: "c1".into(),
            category: "article".into(),
            text: TEXT.into(),
        }
    }

    #[test]
    fn requests_fill_the_template_per_extract_and_variant() {
        let s = settings(LlmBuilder::StylePairs);
        let r = requests(&[extract()], &s);
        assert_eq!(r.len(), 3);
        assert!(r[1].messages[1]
            .content
            .starts_with("Rewrite the following text as a learner's first draft."));
        assert!(r[1].messages[1].content.ends_with(TEXT));
        let g = requests(&[extract(), extract()], &settings(LlmBuilder::Generate));
        assert_eq!(g.len(), 2);
        assert!(g[0].messages[1]
            .content
            .contains("generate 2 instruction-answer pairs"));
    }

    #[test]
    fn generate_parses_strict_json_and_drops_the_rest() {
        let s = settings(LlmBuilder::Generate);
        let mut drops = Drops::default();
        let ok = r#"```json
{"instruction_answer_pairs": [{"instruction": "Why bake sourdough?", "answer": "Because slow bread is worth it."}, {"instruction": "x"}, {"instruction": "a", "answer": "b"}, {"instruction": "c", "answer": "d"}]}
```"#;
        let ex = parse(&s, &extract(), &reply(ok), &mut drops);
        assert_eq!(ex.len(), 1, "pairs beyond pairs_per_extract are ignored");
        assert_eq!(ex[0].output, "Because slow bread is worth it.");
        assert_eq!(drops.total(), 1);
        for bad in ["Sure! Here are pairs: ...", "{\"pairs\": []}", "42"] {
            assert!(parse(&s, &extract(), &reply(bad), &mut drops).is_empty());
        }
        let counts = drops.counts();
        assert_eq!(
            counts
                .keys()
                .filter(|k| k.starts_with("malformed reply"))
                .count(),
            3,
            "{counts:?}"
        );
        let mut cut = reply(ok);
        cut.finish_reason = Some("length".into());
        assert!(parse(&s, &extract(), &cut, &mut drops).is_empty());
        assert_eq!(drops.counts()["malformed reply: cut off at max_tokens"], 1);
    }

    #[test]
    fn preference_keeps_only_verbatim_well_formed_chosen_answers() {
        let s = settings(LlmBuilder::Preference);
        let verbatim = "A starter needs feeding twice a day, and a loaf needs a whole day from mixing to baking, which is exactly why I love it so much.";
        let content = serde_json::json!({"preference_triples": [
            {"instruction": "Why is sourdough slow?", "generated_answer": "It takes time.", "extracted_answer": verbatim},
            {"instruction": "Q2", "generated_answer": "g", "extracted_answer": "A starter needs feeding three times a day, and a loaf needs a whole day from mixing to baking, which is why I love it."},
        ]}).to_string();
        let mut drops = Drops::default();
        let ex = parse(&s, &extract(), &reply(&content), &mut drops);
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].output, verbatim);
        assert_eq!(ex[0].rejected.as_deref(), Some("It takes time."));
        assert_eq!(
            drops.counts()["chosen answer is not verbatim from the extract"],
            1
        );
        let squashed = squash(TEXT);
        assert_eq!(
            preference_check("Too short.", &squashed),
            Some("chosen answer under 100 characters")
        );
        let lower = "a starter needs feeding twice a day, and a loaf needs a whole day from mixing to baking, which is exactly why.";
        assert_eq!(
            preference_check(lower, &squashed),
            Some("chosen answer does not start with a capital letter")
        );
    }

    #[test]
    fn style_pairs_map_plain_to_original() {
        let s = settings(LlmBuilder::StylePairs);
        let mut drops = Drops::default();
        let ex = parse(
            &s,
            &extract(),
            &reply("- starter: feed 2x/day\n- loaf: 1 day"),
            &mut drops,
        );
        assert_eq!(ex[0].input, "- starter: feed 2x/day\n- loaf: 1 day");
        assert_eq!(ex[0].output, TEXT);
        assert!(parse(&s, &extract(), &reply(&format!("  {TEXT} ")), &mut drops).is_empty());
        assert!(parse(&s, &extract(), &reply(""), &mut drops).is_empty());
        assert_eq!(drops.total(), 2);
    }
}
