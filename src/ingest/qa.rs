//! Q&A transcripts: `QUESTION:` / `ANSWER:` blocks, with chat-UI noise removed
//! (timestamps, "12 Likes", "Like · Reply", "Press Enter to send", ...).

use std::sync::LazyLock;

use regex::Regex;

/// One question and its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// The question.
    pub question: String,
    /// The answer.
    pub answer: String,
}

/// A parsed transcript.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// Complete exchanges in order.
    pub exchanges: Vec<Exchange>,
    /// Questions without an answer.
    pub unanswered: usize,
}

static MARKER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s*(?:\*\*)?(question|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*)$").unwrap()
});
static TIMESTAMP: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*(?:\[\d{1,2}:\d{2}(?::\d{2})?\]|\(\d{1,2}:\d{2}(?::\d{2})?\)|\d{1,2}:\d{2}(?::\d{2})?\s?(?:[AaPp][Mm])?)\s*").unwrap()
});
static NOISE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)^\s*(?:\d+\s+likes?|likes?|like\s*·\s*reply|reply|share|press enter to send|seen|edited|\d+\s+repl(?:y|ies))\s*$").unwrap()
});

/// Whether a text looks like a Q&A transcript.
pub fn looks_like_qa(text: &str) -> bool {
    let mut q = false;
    let mut a = false;
    for line in text.lines().take(200) {
        let line = TIMESTAMP.replace(line, "");
        if let Some(c) = MARKER.captures(&line) {
            match c[1].to_ascii_lowercase().as_str() {
                "question" => q = true,
                _ => a = true,
            }
        }
    }
    q && a
}

fn clean(lines: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    for l in lines {
        let l = l.trim();
        if l.is_empty() && out.last().is_none_or(|p| p.is_empty()) {
            continue;
        }
        out.push(l);
    }
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    out.join("\n")
}

/// Parses a transcript.
pub fn parse(text: &str) -> Transcript {
    let mut t = Transcript::default();
    let mut question: Option<Vec<String>> = None;
    let mut answer: Option<Vec<String>> = None;
    let finish = |q: Option<Vec<String>>, a: Option<Vec<String>>, t: &mut Transcript| match (q, a) {
        (Some(q), Some(a)) if !clean(&a).is_empty() => t.exchanges.push(Exchange {
            question: clean(&q),
            answer: clean(&a),
        }),
        (Some(_), _) => t.unanswered += 1,
        _ => {}
    };
    for raw in text.lines() {
        let stripped = TIMESTAMP.replace(raw, "").to_string();
        if NOISE.is_match(&stripped) || (stripped.trim().is_empty() && !raw.trim().is_empty()) {
            continue;
        }
        if let Some(c) = MARKER.captures(&stripped) {
            let rest = c[2].trim_end_matches("**").to_string();
            if c[1].eq_ignore_ascii_case("question") {
                finish(question.take(), answer.take(), &mut t);
                question = Some(vec![rest]);
            } else if question.is_some() {
                answer = Some(vec![rest]);
            }
            continue;
        }
        match (answer.as_mut(), question.as_mut()) {
            (Some(a), _) => a.push(stripped),
            (None, Some(q)) => q.push(stripped),
            _ => {}
        }
    }
    finish(question, answer, &mut t);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transcript_with_chat_noise() {
        let text = include_str!("../../tests/fixtures/ingest/qa_transcript.txt");
        assert!(looks_like_qa(text));
        let t = parse(text);
        assert_eq!(t.exchanges.len(), 2);
        assert_eq!(
            t.exchanges[0].question,
            "How do I start writing every day when I have no time?"
        );
        assert_eq!(
            t.exchanges[0].answer,
            "Start with ten minutes and a fixed place. The habit matters more than the length.\nProtect the ten minutes like a meeting."
        );
        assert_eq!(
            t.exchanges[1].answer,
            "Publish notes, not drafts. A note is finished at its own small size."
        );
        assert_eq!(t.unanswered, 1);
        assert!(!looks_like_qa("just a question: why?"));
    }
}
