//! Scoring RAG answers with an LLM judge: faithfulness (is every claim backed by the
//! retrieved context?) and relevance (does it answer the question?), each 1-5, asked for
//! as a JSON object. A reply that is not one is reported, never guessed.

use serde_json::Value;

/// The judge prompt for one answer.
pub fn prompt(question: &str, context: &str, answer: &str) -> String {
    format!(
        "You judge an answer produced from retrieved context. Rate faithfulness from 1 to 5 (5: every claim in the answer is supported by the context; 1: it contradicts or ignores the context) and relevance from 1 to 5 (5: it fully answers the question; 1: it does not address it). Reply with a JSON object {{\"faithfulness\": <1-5>, \"relevance\": <1-5>, \"reason\": \"<one sentence>\"}} and nothing else.\n\nContext:\n{context}\n\nQuestion: {question}\n\nAnswer: {answer}"
    )
}

/// A judge's scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// 1-5.
    pub faithfulness: u8,
    /// 1-5.
    pub relevance: u8,
    /// The judge's reason.
    pub reason: String,
}

/// Reads a judge reply; `Err` says why it is unusable.
pub fn parse(reply: &str) -> Result<Scores, String> {
    let v = crate::ml::report::judge_json(reply)?;
    let score = |key: &str| -> Result<u8, String> {
        match v.get(key).and_then(Value::as_f64) {
            Some(x) if (1.0..=5.0).contains(&x) && x.fract() == 0.0 => Ok(x as u8),
            Some(x) => Err(format!("{key} {x} is not an integer from 1 to 5")),
            None => Err(format!("no {key} in the reply")),
        }
    };
    Ok(Scores {
        faithfulness: score("faithfulness")?,
        relevance: score("relevance")?,
        reason: v["reason"].as_str().unwrap_or_default().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_strictly() {
        let s = parse("```json\n{\"faithfulness\": 4, \"relevance\": 2, \"reason\": \"ok\"}\n```")
            .unwrap();
        assert_eq!(
            (s.faithfulness, s.relevance, s.reason.as_str()),
            (4, 2, "ok")
        );
        assert!(parse("{\"faithfulness\": 6, \"relevance\": 2}")
            .unwrap_err()
            .contains("1 to 5"));
        assert!(parse("{\"relevance\": 2}")
            .unwrap_err()
            .contains("no faithfulness"));
        assert!(parse("Sure! 5/5").is_err());
    }
}
