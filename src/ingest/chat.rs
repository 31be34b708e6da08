//! WhatsApp-style chat exports, both layouts:
//!   `[12/03/2024, 14:05:09] Alice: text`   (iOS)
//!   `12/03/2024, 14:05 - Alice: text`      (Android)
//! Lines without a header continue the previous message; system lines (encryption
//! notices, group events) and media/deleted placeholders are dropped and counted.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Date and time as written in the export (`12/03/2024 14:05:09`).
    pub time: String,
    /// Who wrote it.
    pub speaker: String,
    /// The text (multi-line messages keep their line breaks).
    pub text: String,
}

/// A parsed export.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chat {
    /// Messages in order.
    pub messages: Vec<Message>,
    /// System lines and placeholders dropped.
    pub dropped: usize,
}

static IOS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\u{200e}?\[(\d{1,4}[./-]\d{1,2}[./-]\d{1,4}),? (\d{1,2}:\d{2}(?::\d{2})?(?:\s?[APap]\.?[Mm]\.?)?)\] ([^:]{1,80}?): (.*)$").unwrap()
});
static ANDROID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\u{200e}?(\d{1,4}[./-]\d{1,2}[./-]\d{1,4}),? (\d{1,2}:\d{2}(?::\d{2})?(?:\s?[APap]\.?[Mm]\.?)?) - (.*)$").unwrap()
});
static IOS_SYSTEM: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\u{200e}?\[(\d{1,4}[./-]\d{1,2}[./-]\d{1,4}),? (\d{1,2}:\d{2}(?::\d{2})?(?:\s?[APap]\.?[Mm]\.?)?)\] (.*)$").unwrap()
});

const PLACEHOLDERS: &[&str] = &[
    "<media omitted>",
    "image omitted",
    "video omitted",
    "audio omitted",
    "sticker omitted",
    "gif omitted",
    "document omitted",
    "this message was deleted",
    "you deleted this message",
    "<this message was edited>",
    "missed voice call",
    "missed video call",
];

/// Whether a text looks like a WhatsApp export (a few header lines near the top).
pub fn looks_like_chat(text: &str) -> bool {
    text.lines()
        .take(20)
        .filter(|l| IOS.is_match(l) || ANDROID.is_match(l))
        .count()
        >= 2
}

fn is_placeholder(text: &str) -> bool {
    let t = text
        .trim()
        .trim_start_matches('\u{200e}')
        .trim()
        .to_ascii_lowercase();
    t.is_empty() || PLACEHOLDERS.contains(&t.as_str())
}

/// Parses an export.
pub fn parse(text: &str) -> Chat {
    let mut chat = Chat::default();
    // A message in progress; `None` after a system line (its continuation lines are dropped too).
    let mut current: Option<Message> = None;
    let mut in_system = false;
    let flush = |m: Option<Message>, chat: &mut Chat| {
        if let Some(m) = m {
            if is_placeholder(&m.text) {
                chat.dropped += 1;
            } else {
                chat.messages.push(Message {
                    text: m.text.trim_end().to_string(),
                    ..m
                });
            }
        }
    };
    for raw in text.lines() {
        let line = raw.trim_end_matches('\r');
        let header = IOS.captures(line).map(|c| {
            (
                c[1].to_string(),
                c[2].to_string(),
                Some(c[3].to_string()),
                c[4].to_string(),
            )
        });
        let header = header.or_else(|| {
            ANDROID.captures(line).map(|c| {
                let rest = c[3].to_string();
                match rest.split_once(": ") {
                    Some((who, msg)) if !who.is_empty() && who.len() <= 80 => (
                        c[1].to_string(),
                        c[2].to_string(),
                        Some(who.to_string()),
                        msg.to_string(),
                    ),
                    _ => (c[1].to_string(), c[2].to_string(), None, rest),
                }
            })
        });
        let header = header.or_else(|| {
            IOS_SYSTEM
                .captures(line)
                .map(|c| (c[1].to_string(), c[2].to_string(), None, c[3].to_string()))
        });
        match header {
            Some((date, time, Some(speaker), text)) => {
                flush(current.take(), &mut chat);
                in_system = false;
                current = Some(Message {
                    time: format!("{date} {time}"),
                    speaker: speaker.trim_start_matches('\u{200e}').trim().to_string(),
                    text,
                });
            }
            Some((_, _, None, _)) => {
                flush(current.take(), &mut chat);
                chat.dropped += 1;
                in_system = true;
            }
            None => match current.as_mut() {
                Some(m) => {
                    m.text.push('\n');
                    m.text.push_str(line);
                }
                None if in_system || line.trim().is_empty() => {}
                None => chat.dropped += 1,
            },
        }
    }
    flush(current.take(), &mut chat);
    chat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ios_export_with_multiline_and_placeholders() {
        let chat = parse(include_str!("../../tests/fixtures/ingest/whatsapp_ios.txt"));
        let speakers: Vec<&str> = chat.messages.iter().map(|m| m.speaker.as_str()).collect();
        assert_eq!(speakers, ["Alice", "Bob", "Bob", "Alice", "Bob"]);
        assert_eq!(
            chat.messages[1].text,
            "Almost. I rewrote the intro twice\nand cut the second section entirely."
        );
        assert_eq!(
            chat.messages[2].text, "Send it over when you can: I want the ending to land.",
            "a colon inside the text"
        );
        assert_eq!(chat.messages[0].time, "12/03/2024 14:05:09");
        assert_eq!(chat.dropped, 1, "image omitted");
    }

    #[test]
    fn android_export_with_system_lines_and_12h_times() {
        let text = include_str!("../../tests/fixtures/ingest/whatsapp_android.txt");
        assert!(looks_like_chat(text));
        let chat = parse(text);
        let got: Vec<(&str, &str)> = chat
            .messages
            .iter()
            .map(|m| (m.speaker.as_str(), m.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Alice", "Who is bringing snacks tomorrow?"),
                ("Bob", "Me. Something salty,\nsomething sweet,\nand coffee."),
                ("Carol", "Late reply: thanks Bob!"),
            ]
        );
        assert_eq!(chat.messages[2].time, "1/4/24 9:15 PM");
        assert_eq!(
            chat.dropped, 4,
            "encryption notice, group created, media, deleted"
        );
        assert!(!looks_like_chat("# Just notes\nnothing chat-like here\n"));
    }
}
