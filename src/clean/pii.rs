//! Personal data and secrets in text: e-mail addresses, phone numbers, IP addresses,
//! payment card numbers (Luhn-checked), IBANs (mod-97-checked) and API keys or tokens
//! (well-known formats, plus long high-entropy strings), each found by a pattern made to
//! miss what looks alike in ordinary writing (dates, version numbers, hex digests), and
//! kept, masked (`[PHONE]`, ...) or made the reason to drop the document, per kind.
//!
//! Street addresses are not looked for: no pattern tells them apart reliably across
//! countries, and a wrong guess would mask ordinary sentences. A four-part version number
//! with a multi-digit part (`3.11.4.1`) reads as an IPv4 address and is treated as one.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use super::{word_regex, EMAIL};
use serde::{Deserialize, Serialize};

/// A kind of personal data or secret.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    /// `name@example.com`.
    Email,
    /// Phone numbers with at least 9 digits (international or grouped national forms).
    Phone,
    /// IPv4 and IPv6 addresses.
    IpAddress,
    /// Payment card numbers (13 to 19 digits that pass the Luhn check).
    CreditCard,
    /// International bank account numbers (that pass the mod-97 check).
    Iban,
    /// API keys, access tokens and private keys.
    ApiKey,
}

impl PiiKind {
    /// Every kind, in the order they are looked for (keys before the patterns they contain).
    pub const ALL: [PiiKind; 6] = [
        PiiKind::ApiKey,
        PiiKind::Email,
        PiiKind::Iban,
        PiiKind::CreditCard,
        PiiKind::Phone,
        PiiKind::IpAddress,
    ];

    /// The snake_case name (metadata, drop reasons).
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::IpAddress => "ip_address",
            PiiKind::CreditCard => "credit_card",
            PiiKind::Iban => "iban",
            PiiKind::ApiKey => "api_key",
        }
    }

    fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "[EMAIL]",
            PiiKind::Phone => "[PHONE]",
            PiiKind::IpAddress => "[IP]",
            PiiKind::CreditCard => "[CARD]",
            PiiKind::Iban => "[IBAN]",
            PiiKind::ApiKey => "[SECRET]",
        }
    }
}

/// What to do with one kind.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum PiiAction {
    /// Leave it.
    #[default]
    Keep,
    /// Replace it with a placeholder (`[EMAIL]`, `[PHONE]`, `[IP]`, `[CARD]`, `[IBAN]`,
    /// `[SECRET]`).
    Mask,
    /// Drop the document (reason `pii`, the kinds found in the detail).
    Drop,
}

/// The action for each kind (unlisted kinds are kept).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PiiRules(pub BTreeMap<PiiKind, PiiAction>);

impl PiiRules {
    /// One action for every kind.
    pub fn all(action: PiiAction) -> Self {
        Self(PiiKind::ALL.iter().map(|k| (*k, action)).collect())
    }

    fn action(&self, kind: PiiKind) -> PiiAction {
        self.0.get(&kind).copied().unwrap_or_default()
    }

    /// Whether anything is looked for.
    pub fn active(&self) -> bool {
        self.0.values().any(|a| *a != PiiAction::Keep)
    }
}

/// What scrubbing one text found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrubbed {
    /// The text, masked where the rules say.
    pub text: String,
    /// Matches per kind (looked-for kinds only).
    pub found: BTreeMap<PiiKind, usize>,
    /// Kinds found whose action is `drop`.
    pub drop: Vec<PiiKind>,
}

// International (+CC ...), a parenthesised area code, national numbers with a leading 0,
// or US-style 555-123-4567: numbers in prose without those marks (years, counts) are not
// phone numbers. The digit count is checked after.
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    word_regex(concat!(
        r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?)(?:[ .-]?\d{2,4}){2,5}\b",
        r"|\(\d{2,4}\)[ .-]?\d{3,4}[ .-]?\d{3,4}\b",
        r"|\b0[1-9]\d{0,3}[ .-][1-9]\d{1,3}(?:[ .-][1-9]\d{1,3}){1,3}\b",
        r"|\b\d{3}[.-]\d{3}[.-]\d{4}\b",
    ))
});
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    word_regex(
        r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
    )
});
static IPV6: LazyLock<Regex> = LazyLock::new(|| {
    word_regex(
        r"(?i)\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|\b(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4}\b",
    )
});
// Unbroken, or in groups of four (Amex: 4-6-5); the issuer prefix and the Luhn check are
// tested after.
static CARD: LazyLock<Regex> = LazyLock::new(|| {
    word_regex(r"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{5})\b")
});
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| word_regex(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"));
// The vendor key formats are shared with the redaction of displayed text.
use crate::redact::KEY_FORMATS;
// Candidates for the entropy test: long runs of token characters.
static LONG_TOKEN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/_=-]{32,}").expect("valid"));

/// Scrubs `text` as `rules` say.
pub fn scrub(text: &str, rules: &PiiRules) -> Scrubbed {
    let mut out = Scrubbed {
        text: text.to_string(),
        ..Scrubbed::default()
    };
    if !rules.active() {
        return out;
    }
    for kind in PiiKind::ALL {
        let action = rules.action(kind);
        if action == PiiAction::Keep {
            continue;
        }
        let spans = find(kind, &out.text);
        if spans.is_empty() {
            continue;
        }
        out.found.insert(kind, spans.len());
        match action {
            PiiAction::Keep => {}
            PiiAction::Drop => out.drop.push(kind),
            PiiAction::Mask => {
                let mut masked = String::with_capacity(out.text.len());
                let mut at = 0;
                for (start, end) in spans {
                    masked.push_str(&out.text[at..start]);
                    masked.push_str(kind.placeholder());
                    at = end;
                }
                masked.push_str(&out.text[at..]);
                out.text = masked;
            }
        }
    }
    out
}

/// Byte spans of `kind` in `text`, in order and not overlapping.
pub fn find(kind: PiiKind, text: &str) -> Vec<(usize, usize)> {
    let spans = |re: &Regex, keep: &dyn Fn(&str) -> bool| -> Vec<(usize, usize)> {
        re.find_iter(text)
            .filter(|m| keep(m.as_str()))
            .map(|m| (m.start(), m.end()))
            .collect()
    };
    match kind {
        PiiKind::Email => spans(&EMAIL, &|_| true),
        PiiKind::Phone => spans(&PHONE, &|m| {
            let digits = m.chars().filter(char::is_ascii_digit).count();
            (9..=15).contains(&digits) && !looks_like_date_or_version(m)
        }),
        PiiKind::IpAddress => {
            let mut found = spans(&IPV4, &|m| !m.split('.').all(|p| p.len() == 1));
            found.extend(spans(&IPV6, &|m| m.matches(':').count() >= 2));
            found.sort_unstable();
            found.dedup_by(|b, a| b.0 < a.1);
            found
        }
        PiiKind::CreditCard => spans(&CARD, &|m| {
            let digits: Vec<u32> = m.chars().filter_map(|c| c.to_digit(10)).collect();
            (13..=19).contains(&digits.len()) && card_issuer(&digits) && luhn(&digits)
        }),
        PiiKind::Iban => spans(&IBAN, &|m| iban_valid(m)),
        PiiKind::ApiKey => {
            let mut found = spans(&KEY_FORMATS, &|_| true);
            // URL paths and slugs (`a/b/c`, `some-long-title-123`) are not secrets.
            found.extend(spans(&LONG_TOKEN, &|m| {
                m.matches('/').count() < 2 && m.matches('-').count() < 2 && high_entropy(m)
            }));
            found.sort_unstable();
            found.dedup_by(|b, a| b.0 < a.1);
            found
        }
    }
}

/// `2024-01-15 10:30` or `3.11.12.2024`: separators that are all dots or all dashes
/// with a leading 4-digit year are dates or versions, not phone numbers.
fn looks_like_date_or_version(m: &str) -> bool {
    let year_first = m.len() >= 4
        && m[..4].chars().all(|c| c.is_ascii_digit())
        && m[..4].starts_with(['1', '2']);
    year_first && !m.contains(' ') && !m.starts_with('+')
}

/// Whether the number starts like a card of a major network, with a length it issues:
/// Visa 4 (13, 16, 19), Mastercard 51-55 and 2221-2720 (16), American Express 34, 37 (15),
/// Discover 6011, 644-649, 65 (16-19), JCB 3528-3589 (16-19), Diners 300-305, 36, 38 (14-19).
fn card_issuer(digits: &[u32]) -> bool {
    let prefix = |n: usize| digits.iter().take(n).fold(0u32, |acc, d| acc * 10 + d);
    let len = digits.len();
    match digits[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&prefix(2)) && len == 16,
        2 => (2221..=2720).contains(&prefix(4)) && len == 16,
        3 => match prefix(2) {
            34 | 37 => len == 15,
            35 => (3528..=3589).contains(&prefix(4)) && len >= 16,
            36 | 38 => len >= 14,
            30 => (300..=305).contains(&prefix(3)) && len >= 14,
            _ => false,
        },
        6 => {
            (prefix(4) == 6011 || (644..=649).contains(&prefix(3)) || prefix(2) == 65) && len >= 16
        }
        _ => false,
    }
}

/// The Luhn checksum of card numbers.
fn luhn(digits: &[u32]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10) && digits.iter().any(|&d| d != 0)
}

/// ISO 13616: move the first four characters to the end, letters to 10..35, mod 97 == 1.
fn iban_valid(m: &str) -> bool {
    let compact: String = m.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let rotated = compact[4..].chars().chain(compact[..4].chars());
    let mut rem: u32 = 0;
    for c in rotated {
        let value = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        for digit in value.to_string().chars() {
            rem = (rem * 10 + digit.to_digit(10).unwrap_or(0)) % 97;
        }
    }
    rem == 1
}

/// A random-looking token: letters and digits mixed, and more than 4.3 bits of Shannon
/// entropy per character, which hex digests (at most 4) and words do not reach.
fn high_entropy(token: &str) -> bool {
    let bytes = token.as_bytes();
    let has_digit = bytes.iter().any(u8::is_ascii_digit);
    let has_upper = bytes.iter().any(u8::is_ascii_uppercase);
    let has_lower = bytes.iter().any(u8::is_ascii_lowercase);
    if !(has_digit && has_upper && has_lower) {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        counts[b as usize] += 1;
    }
    let n = bytes.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    entropy > 4.3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(kind: PiiKind, text: &str) -> Vec<String> {
        find(kind, text)
            .into_iter()
            .map(|(s, e)| text[s..e].to_string())
            .collect()
    }

    #[test]
    fn each_kind_is_found_and_lookalikes_are_not() {
        let cases: &[(PiiKind, &str, &[&str])] = &[
            (PiiKind::Email, "write to jane.doe+blog@mail.example.co.uk today", &["jane.doe+blog@mail.example.co.uk"]),
            (PiiKind::Phone, "call +44 20 7946 0958 or (555) 123-4567 or 030 1234 5678", &["+44 20 7946 0958", "(555) 123-4567", "030 1234 5678"]),
            (PiiKind::Phone, "released 2024-01-15, version 3.11.7, build 20240115, 1,234,567 views, in 2024 2025 2026", &[]),
            (PiiKind::IpAddress, "from 192.168.1.20 and 2001:db8::8a2e:370:7334 at 10:30:15", &["192.168.1.20", "2001:db8::8a2e:370:7334"]),
            (PiiKind::IpAddress, "python 3.11.4 and 1.2.3.4 (all single digits) are versions", &[]),
            (PiiKind::CreditCard, "card 4111 1111 1111 1111, not 4111 1111 1111 1112", &["4111 1111 1111 1111"]),
            (PiiKind::Iban, "pay DE89 3704 0044 0532 0130 00 (not DE89 3704 0044 0532 0130 01)", &["DE89 3704 0044 0532 0130 00"]),
            (PiiKind::ApiKey, "key AKIAIOSFODNN7EXAMPLE and ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 set", &["AKIAIOSFODNN7EXAMPLE", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"]),
            (PiiKind::ApiKey, "token Zx9Qp2LmR7tVb4Nc8Hs1Kd6Wf3Gy5Ju0Ae, a digest 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 is not", &["Zx9Qp2LmR7tVb4Nc8Hs1Kd6Wf3Gy5Ju0Ae"]),
        ];
        for (kind, text, expected) in cases {
            assert_eq!(found(*kind, text), *expected, "{kind:?} in {text:?}");
        }
    }

    #[test]
    fn masking_replaces_and_counts_and_drop_names_the_kinds() {
        let mut rules = PiiRules::all(PiiAction::Mask);
        rules.0.insert(PiiKind::ApiKey, PiiAction::Drop);
        let text =
            "Mail me at me@example.org or call +1 415 555 0100. Key: sk-abcdefghijklmnopqrstuvwx";
        let out = scrub(text, &rules);
        assert_eq!(
            out.text,
            "Mail me at [EMAIL] or call [PHONE]. Key: sk-abcdefghijklmnopqrstuvwx"
        );
        assert_eq!(out.found[&PiiKind::Email], 1);
        assert_eq!(out.found[&PiiKind::Phone], 1);
        assert_eq!(out.drop, vec![PiiKind::ApiKey]);
        assert_eq!(scrub(text, &PiiRules::default()).text, text);
    }
}
