//! `chat_replies`: one example per message of the target speaker, its prompt the
//! conversation before it rendered with role tokens (`<USR_A> text` lines), its response
//! the message itself.
//!
//! Context is either a sliding window of the previous `window` messages (plus the
//! target's own previous message when the window missed it), or retrieval: the message
//! being replied to plus the `top_k` earlier messages, among the last `lookback`, whose
//! embeddings are most similar to it, in chronological order. The reply itself is never
//! used to choose its context, so the same rule works at inference time.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Drops, Example};
use crate::documents::Document;
use crate::ingest::chat::Message;

/// How the context of a reply is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// The previous `window` messages.
    Window,
    /// The most similar earlier messages (embedding model).
    Retrieval,
}

/// Settings of the builder.
#[derive(Clone, Debug)]
pub struct ChatSettings {
    /// Whose replies become responses; `None`: each chat's own `target_speaker`.
    pub target_speaker: Option<String>,
    /// Window size (messages).
    pub window: usize,
    /// Context rule.
    pub context: ContextMode,
    /// Retrieved messages.
    pub top_k: usize,
    /// Messages retrieval looks back over.
    pub lookback: usize,
    /// Speaker -> role token; unnamed speakers get `<USR_A>` (target), `<USR_B>`, ...
    pub role_tokens: BTreeMap<String, String>,
    /// A system line (`<SYS> ...`) opening every prompt.
    pub system_prompt: Option<String>,
    /// The instruction; `{speaker}` is replaced by the target's name.
    pub instruction: String,
}

/// One chat ready for the builder.
#[derive(Clone, Debug)]
pub struct Conversation {
    /// Document id.
    pub id: String,
    /// Document category.
    pub category: String,
    /// Messages in order.
    pub messages: Vec<Message>,
    /// The target speaker.
    pub target: String,
}

/// The chats among `docs` (documents with a `messages` list in their metadata, as
/// `ingest` writes for chat exports); others are dropped with a reason.
pub fn conversations(
    docs: &[Document],
    target: Option<&str>,
    drops: &mut Drops,
) -> Vec<Conversation> {
    let mut out = Vec::new();
    for doc in docs {
        let messages: Option<Vec<Message>> = doc
            .metadata
            .get("messages")
            .and_then(|m| serde_json::from_value(m.clone()).ok());
        let Some(messages) = messages else {
            drops.drop("document is not a chat (no messages)", doc.url.clone());
            continue;
        };
        let target = target.map(str::to_string).or_else(|| {
            doc.metadata
                .get("target_speaker")?
                .as_str()
                .map(str::to_string)
        });
        let Some(target) = target else {
            drops.drop("chat has no target_speaker", doc.url.clone());
            continue;
        };
        if !messages.iter().any(|m| m.speaker == target) {
            drops.drop(
                format!("target speaker `{target}` never speaks"),
                doc.url.clone(),
            );
            continue;
        }
        out.push(Conversation {
            id: doc.id.clone(),
            category: doc.category.as_str().to_string(),
            messages,
            target,
        });
    }
    out
}

/// Role tokens of a conversation: configured ones first, then `<USR_A>` for the target
/// and `<USR_B>`, `<USR_C>`, ... for the others in order of appearance.
pub fn role_tokens(
    conv: &Conversation,
    configured: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut tokens = configured.clone();
    tokens
        .entry(conv.target.clone())
        .or_insert_with(|| "<USR_A>".into());
    let mut next = 1u8;
    for m in &conv.messages {
        if !tokens.contains_key(&m.speaker) {
            let letter = (b'A' + next.min(25)) as char;
            tokens.insert(m.speaker.clone(), format!("<USR_{letter}>"));
            next += 1;
        }
    }
    tokens
}

/// Window context of message `i`: indices of the previous `window` messages, plus the
/// target's own previous message when it lies before the window.
pub fn window_context(messages: &[Message], i: usize, target: &str, window: usize) -> Vec<usize> {
    let start = i.saturating_sub(window);
    let mut idx: Vec<usize> = (start..i).collect();
    if !idx.iter().any(|&j| messages[j].speaker == target) {
        if let Some(own) = (0..start).rev().find(|&j| messages[j].speaker == target) {
            idx.insert(0, own);
        }
    }
    idx
}

/// Retrieval context of message `i`: message `i - 1` plus the `top_k` of the `lookback`
/// messages before it most similar to it (dot product of normalised embeddings), in
/// chronological order. `vectors[j]` is message j's embedding.
pub fn retrieval_context(
    vectors: &[&[f32]],
    i: usize,
    top_k: usize,
    lookback: usize,
) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    let query = vectors[i - 1];
    let start = (i - 1).saturating_sub(lookback);
    let mut scored: Vec<(f32, usize)> = (start..i - 1)
        .map(|j| (query.iter().zip(vectors[j]).map(|(a, b)| a * b).sum(), j))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut idx: Vec<usize> = scored.into_iter().take(top_k).map(|(_, j)| j).collect();
    idx.push(i - 1);
    idx.sort_unstable();
    idx
}

/// The examples of one conversation. `vectors` (one per message) is required for
/// retrieval context.
pub fn build(
    conv: &Conversation,
    s: &ChatSettings,
    vectors: Option<&[&[f32]]>,
    drops: &mut Drops,
) -> Vec<Example> {
    let tokens = role_tokens(conv, &s.role_tokens);
    let instruction = s.instruction.replace("{speaker}", &conv.target);
    let mut out = Vec::new();
    for (i, m) in conv.messages.iter().enumerate() {
        if m.speaker != conv.target {
            continue;
        }
        let context = match (s.context, vectors) {
            (ContextMode::Retrieval, Some(v)) => retrieval_context(v, i, s.top_k, s.lookback),
            _ => window_context(&conv.messages, i, &conv.target, s.window),
        };
        if !context
            .iter()
            .any(|&j| conv.messages[j].speaker != conv.target)
        {
            drops.drop(
                "reply has no message from another speaker before it",
                m.text.clone(),
            );
            continue;
        }
        let mut lines = Vec::with_capacity(context.len() + 1);
        if let Some(sys) = &s.system_prompt {
            lines.push(format!("<SYS> {sys}"));
        }
        for j in context {
            let c = &conv.messages[j];
            lines.push(format!("{} {}", tokens[&c.speaker], c.text));
        }
        out.push(Example {
            builder: "chat_replies".into(),
            category: conv.category.clone(),
            source: format!("{}#{}", conv.id, i + 1),
            instruction: instruction.clone(),
            input: lines.join("\n"),
            output: m.text.clone(),
            rejected: None,
            judge: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(spec: &[(&str, &str)]) -> Vec<Message> {
        spec.iter()
            .map(|(s, t)| Message {
                time: String::new(),
                speaker: s.to_string(),
                text: t.to_string(),
            })
            .collect()
    }

    #[test]
    fn window_keeps_the_targets_previous_message() {
        let m = msgs(&[
            ("A", "a0"),
            ("B", "b1"),
            ("B", "b2"),
            ("B", "b3"),
            ("A", "a4"),
        ]);
        assert_eq!(window_context(&m, 4, "A", 2), vec![0, 2, 3]);
        assert_eq!(window_context(&m, 4, "A", 4), vec![0, 1, 2, 3]);
        assert_eq!(window_context(&m, 0, "A", 4), Vec::<usize>::new());
    }

    #[test]
    fn retrieval_keeps_the_most_similar_in_order() {
        let e = |x: f32, y: f32| vec![x, y];
        let v = [
            e(1.0, 0.0),
            e(0.0, 1.0),
            e(0.9, 0.1),
            e(0.2, 0.8),
            e(1.0, 0.0),
            e(0.0, 1.0),
        ];
        let refs: Vec<&[f32]> = v.iter().map(|x| x.as_slice()).collect();
        // Reply 5: query is message 4 ~ (1, 0); among 0..4 the top 2 are 0 and 2.
        assert_eq!(retrieval_context(&refs, 5, 2, 10), vec![0, 2, 4]);
        // A lookback of 2 only sees messages 2 and 3.
        assert_eq!(retrieval_context(&refs, 5, 1, 2), vec![2, 4]);
    }

    #[test]
    fn examples_render_role_tokens_and_skip_openers() {
        let conv = Conversation {
            id: "chat".into(),
            category: "chat".into(),
            messages: msgs(&[
                ("Alice", "hi, you there?"),
                ("Bob", "yes"),
                ("Alice", "good, the draft is done"),
                ("Carol", "congrats!"),
                ("Bob", "nice"),
            ]),
            target: "Bob".into(),
        };
        let s = ChatSettings {
            target_speaker: None,
            window: 4,
            context: ContextMode::Window,
            top_k: 2,
            lookback: 10,
            role_tokens: BTreeMap::from([("Carol".to_string(), "<FRIEND>".to_string())]),
            system_prompt: Some("Bob chats with friends".into()),
            instruction: "Reply as {speaker}.".into(),
        };
        let mut drops = Drops::default();
        let ex = build(&conv, &s, None, &mut drops);
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].instruction, "Reply as Bob.");
        assert_eq!(
            ex[0].input,
            "<SYS> Bob chats with friends\n<USR_B> hi, you there?"
        );
        assert_eq!(ex[1].output, "nice");
        assert_eq!(
            ex[1].input,
            "<SYS> Bob chats with friends\n<USR_B> hi, you there?\n<USR_A> yes\n<USR_B> good, the draft is done\n<FRIEND> congrats!"
        );
    }
}
