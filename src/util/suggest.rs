//! Wording for users: "did you mean" suggestions and serde's Rust type names in YAML terms.

/// The closest candidate to `wrong`, if any is close enough to be a likely typo.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(wrong, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}

/// serde speaks Rust ("expected u32"); users write YAML.
pub fn plain_type_names(message: &str) -> String {
    message
        .replace("expected u32", "expected a whole number >= 0")
        .replace("expected u64", "expected a whole number >= 0")
        .replace("expected i64", "expected a whole number")
        .replace("expected f64", "expected a number")
        .replace("expected usize", "expected a whole number >= 0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("chunck", ["chunk", "embed"]).as_deref(),
            Some("did you mean `chunk`?")
        );
        assert_eq!(did_you_mean("zzz", ["chunk", "embed"]), None);
        assert_eq!(
            plain_type_names("invalid type: string, expected u32"),
            "invalid type: string, expected a whole number >= 0"
        );
    }
}
