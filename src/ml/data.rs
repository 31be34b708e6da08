//! Tokenised training examples: a dataset split rendered through a template, encoded
//! segment by segment so the labels mask everything but the responses (`-100`, the value
//! PyTorch's cross-entropy ignores), then padded per batch or packed into full rows.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;
use tokenizers::Tokenizer;

use super::template::{Conversation, Template};

/// The label of a position the loss ignores.
pub const IGNORE: i64 = -100;

/// Special tokens of cairn's byte-level tokenizer (used for models initialised from
/// scratch).
pub const BYTE_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// One training row: token ids and their labels (same length; `IGNORE` = not trained).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Labels aligned with `ids` (the model shifts them), `IGNORE` where masked.
    pub labels: Vec<i64>,
}

impl Row {
    /// Positions the loss covers (after the shift).
    pub fn target_count(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE).count()
    }

    /// This row as an encoder-decoder example: the source is everything before the
    /// first trained token, closed by `eos` (as T5's tokenizer closes its input); the
    /// decoder row is `start` followed by the rest, labelled so that the usual shift
    /// trains the same tokens ([`Row::target_count`] is unchanged).
    pub fn seq2seq(&self, start: u32, eos: u32) -> (Vec<u32>, Row) {
        let k = self
            .labels
            .iter()
            .position(|&l| l != IGNORE)
            .unwrap_or(self.ids.len());
        let mut source = self.ids[..k].to_vec();
        if source.last() != Some(&eos) {
            source.push(eos);
        }
        let mut ids = vec![start];
        ids.extend_from_slice(&self.ids[k..]);
        let mut labels = vec![IGNORE];
        labels.extend_from_slice(&self.labels[k..]);
        (source, Row { ids, labels })
    }
}

/// What reading a split did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SplitStats {
    /// Records read.
    pub records: usize,
    /// Records in no known format, or without a response.
    pub unreadable: usize,
    /// Rows cut at `max_seq_len`.
    pub truncated: usize,
    /// Rows left without a trained token after truncation.
    pub empty: usize,
    /// Tokens over all rows.
    pub tokens: usize,
    /// Trained tokens over all rows.
    pub target_tokens: usize,
}

/// The end-of-sequence token: `eos` if given, else the first known EOS the tokenizer has.
pub fn eos_token(tokenizer: &Tokenizer, wanted: Option<&str>) -> Result<(String, u32), String> {
    if let Some(w) = wanted {
        return tokenizer
            .token_to_id(w)
            .map(|id| (w.to_string(), id))
            .ok_or_else(|| format!("eos token {w:?} is not in the tokenizer's vocabulary"));
    }
    for candidate in [
        "<|endoftext|>",
        "<|im_end|>",
        "</s>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<eos>",
        "[SEP]",
    ] {
        if let Some(id) = tokenizer.token_to_id(candidate) {
            return Ok((candidate.to_string(), id));
        }
    }
    Err("the tokenizer has no end-of-sequence token cairn knows (<|endoftext|>, </s>, <|im_end|>, ...); set `eos_token`".into())
}

/// Encodes rendered segments, labels = ids on trained segments.
pub fn encode(
    tokenizer: &Tokenizer,
    conv: &Conversation,
    template: &Template,
    eos: &str,
) -> Result<Row, String> {
    let mut row = Row {
        ids: Vec::new(),
        labels: Vec::new(),
    };
    for seg in template.render(conv, eos)? {
        let enc = tokenizer
            .encode(seg.text.as_str(), false)
            .map_err(|e| format!("tokenizing: {e}"))?;
        for &id in enc.get_ids() {
            row.ids.push(id);
            row.labels
                .push(if seg.train { i64::from(id) } else { IGNORE });
        }
    }
    Ok(row)
}

/// The records of a split file (none when the split is absent) and stats that count them.
fn read_records(path: &Path) -> Result<(Vec<Value>, SplitStats), String> {
    let records: Vec<Value> = if path.exists() {
        crate::documents::read_jsonl(path)?
    } else {
        Vec::new()
    };
    let stats = SplitStats {
        records: records.len(),
        ..SplitStats::default()
    };
    Ok((records, stats))
}

/// Reads `dir/<split>.jsonl` of a dataset artifact into rows of at most `max_len` tokens
/// (longer ones lose their first tokens, so the response is kept).
pub fn read_split(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &Template,
    eos: &str,
    max_len: usize,
) -> Result<(Vec<Row>, SplitStats), String> {
    let (records, mut stats) = read_records(path)?;
    let mut rows = Vec::new();
    for record in &records {
        let Some(conv) =
            Conversation::from_record(record).filter(|c| c.split_last_reply().is_some())
        else {
            stats.unreadable += 1;
            continue;
        };
        let mut row = encode(tokenizer, &conv, template, eos)?;
        if row.ids.len() > max_len {
            // Cut from the left: the start of the prompt goes first, the response stays.
            let cut = row.ids.len() - max_len;
            row.ids.drain(..cut);
            row.labels.drain(..cut);
            stats.truncated += 1;
        }
        if row.target_count() == 0 {
            stats.empty += 1;
            continue;
        }
        stats.tokens += row.ids.len();
        stats.target_tokens += row.target_count();
        rows.push(row);
    }
    Ok((rows, stats))
}

/// A preference example: one prompt answered with the chosen and the rejected reply,
/// each row labelled on its reply only.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    pub chosen: Row,
    pub rejected: Row,
    /// The reference model's log-probabilities of the two replies, once precomputed
    /// (DPO's `precompute_ref`).
    pub reference: Option<(f32, f32)>,
}

/// The prompt conversation and the two replies of a preference record: `prompt` as a
/// string or a message list, `chosen`/`rejected` as strings or message lists ending with
/// the assistant's reply (TRL's standard and conversational formats).
fn preference_record(record: &Value) -> Option<(Conversation, String, String)> {
    use super::template::Role;
    let prompt = match record.get("prompt")? {
        Value::String(text) => Conversation {
            turns: vec![(Role::User, text.clone())],
        },
        list @ Value::Array(_) => {
            Conversation::from_record(&serde_json::json!({ "messages": list }))?
        }
        _ => return None,
    };
    let reply = |key: &str| -> Option<String> {
        match record.get(key)? {
            Value::String(text) => Some(text.clone()),
            list @ Value::Array(_) => {
                let conv = Conversation::from_record(&serde_json::json!({ "messages": list }))?;
                conv.split_last_reply().map(|(_, reply)| reply)
            }
            _ => None,
        }
    };
    Some((prompt, reply("chosen")?, reply("rejected")?))
}

/// Encodes `prompt` + `reply` and keeps the labels of the reply alone (the last run of
/// trained tokens: earlier assistant turns of a conversational prompt are context).
fn encode_reply(
    tokenizer: &Tokenizer,
    prompt: &Conversation,
    reply: &str,
    template: &Template,
    eos: &str,
) -> Result<Row, String> {
    let mut conv = prompt.clone();
    conv.turns
        .push((super::template::Role::Assistant, reply.to_string()));
    let mut row = encode(tokenizer, &conv, template, eos)?;
    if let Some(last) = row.labels.iter().rposition(|&l| l != IGNORE) {
        let start = row.labels[..last]
            .iter()
            .rposition(|&l| l == IGNORE)
            .map_or(0, |i| i + 1);
        row.labels[..start].fill(IGNORE);
    }
    Ok(row)
}

/// Cuts `row` to `max_len` tokens the way TRL truncates preference data: the prompt
/// loses its start first, then the reply its end. Returns whether it cut.
fn truncate_pair_row(row: &mut Row, max_len: usize) -> bool {
    if row.ids.len() <= max_len {
        return false;
    }
    let prompt = row
        .labels
        .iter()
        .position(|&l| l != IGNORE)
        .unwrap_or(row.ids.len());
    let from_prompt = (row.ids.len() - max_len).min(prompt);
    row.ids.drain(..from_prompt);
    row.labels.drain(..from_prompt);
    row.ids.truncate(max_len);
    row.labels.truncate(max_len);
    true
}

/// Reads the preference records of `dir/<split>.jsonl` into pairs of at most `max_len`
/// tokens per reply row. Records without a prompt, a chosen and a rejected reply are
/// counted as unreadable.
pub fn read_pairs(
    path: &Path,
    tokenizer: &Tokenizer,
    template: &Template,
    eos: &str,
    max_len: usize,
) -> Result<(Vec<Pair>, SplitStats), String> {
    let (records, mut stats) = read_records(path)?;
    let mut pairs = Vec::new();
    for record in &records {
        let Some((prompt, chosen, rejected)) = preference_record(record) else {
            stats.unreadable += 1;
            continue;
        };
        let mut chosen = encode_reply(tokenizer, &prompt, &chosen, template, eos)?;
        let mut rejected = encode_reply(tokenizer, &prompt, &rejected, template, eos)?;
        let cut =
            truncate_pair_row(&mut chosen, max_len) | truncate_pair_row(&mut rejected, max_len);
        stats.truncated += usize::from(cut);
        if chosen.target_count() == 0 || rejected.target_count() == 0 {
            stats.empty += 1;
            continue;
        }
        for row in [&chosen, &rejected] {
            stats.tokens += row.ids.len();
            stats.target_tokens += row.target_count();
        }
        pairs.push(Pair {
            chosen,
            rejected,
            reference: None,
        });
    }
    Ok((pairs, stats))
}

/// Concatenates rows (in order) and cuts the stream into rows of exactly `max_len` (the
/// last may be shorter), the way packing trainers fill every position.
pub fn pack(rows: &[Row], max_len: usize) -> Vec<Row> {
    let mut out = Vec::new();
    let mut cur = Row {
        ids: Vec::new(),
        labels: Vec::new(),
    };
    for row in rows {
        for (&id, &label) in row.ids.iter().zip(&row.labels) {
            cur.ids.push(id);
            cur.labels.push(label);
            if cur.ids.len() == max_len {
                out.push(std::mem::replace(
                    &mut cur,
                    Row {
                        ids: Vec::new(),
                        labels: Vec::new(),
                    },
                ));
            }
        }
    }
    if cur.target_count() > 0 {
        out.push(cur);
    }
    out
}

/// A byte-level BPE tokenizer with no merges: 256 byte tokens plus [`BYTE_SPECIALS`]. For
/// models initialised from scratch, so a first experiment needs no downloaded vocabulary;
/// it round-trips any UTF-8 text and loads in `transformers` as a fast tokenizer.
pub fn byte_tokenizer() -> Result<Tokenizer, String> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::AddedToken;
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, Vec::new())
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tokenizer.with_decoder(Some(ByteDecoder::default()));
    tokenizer.add_special_tokens(
        &BYTE_SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect::<Vec<_>>(),
    );
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn preference_pairs_label_only_the_final_reply_and_truncate_like_trl() {
        let tok = byte_tokenizer().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train.jsonl");
        let lines = [
            json!({"prompt": "Hi?", "chosen": "Yes.", "rejected": "No!!"}),
            json!({"prompt": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                              {"role": "user", "content": "C"}],
                   "chosen": [{"role": "assistant", "content": "good"}],
                   "rejected": [{"role": "assistant", "content": "bad"}]}),
            json!({"prompt": "only a prompt", "chosen": "and no rejected reply"}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).unwrap();
        let template = Template::parse("chatml").unwrap();
        let (pairs, stats) = read_pairs(&path, &tok, &template, "<|endoftext|>", 512).unwrap();
        assert_eq!((pairs.len(), stats.unreadable), (2, 1));
        let reply = |row: &Row| -> String {
            let ids: Vec<u32> = row
                .ids
                .iter()
                .zip(&row.labels)
                .filter(|(_, &l)| l != IGNORE)
                .map(|(&i, _)| i)
                .collect();
            tok.decode(&ids, false).unwrap()
        };
        assert_eq!(reply(&pairs[0].chosen), "Yes.<|im_end|>");
        assert_eq!(reply(&pairs[0].rejected), "No!!<|im_end|>");
        // The earlier assistant turn "B" is context, not trained.
        assert_eq!(reply(&pairs[1].chosen), "good<|im_end|>");
        let prompt_len = |row: &Row| row.labels.iter().position(|&l| l != IGNORE).unwrap();
        assert_eq!(prompt_len(&pairs[1].chosen), prompt_len(&pairs[1].rejected));

        // Too long: the prompt loses its start, then the reply its end.
        let mut row = pairs[0].chosen.clone();
        let (len, prompt) = (row.ids.len(), prompt_len(&row));
        assert!(truncate_pair_row(&mut row, len - 3));
        assert_eq!(row.ids[..], pairs[0].chosen.ids[3..]);
        let mut row = pairs[0].chosen.clone();
        assert!(truncate_pair_row(&mut row, len - prompt - 2));
        assert_eq!(prompt_len(&row), 0);
        assert_eq!(row.ids[..], pairs[0].chosen.ids[prompt..len - 2]);
    }

    #[test]
    fn seq2seq_splits_at_the_first_trained_token_and_keeps_the_targets() {
        let row = Row {
            ids: vec![10, 11, 12, 20, 21, 1],
            labels: vec![IGNORE, IGNORE, IGNORE, 20, 21, 1],
        };
        let (source, dec) = row.seq2seq(0, 1);
        assert_eq!(source, vec![10, 11, 12, 1]);
        assert_eq!(dec.ids, vec![0, 20, 21, 1]);
        assert_eq!(dec.labels, vec![IGNORE, 20, 21, 1]);
        assert_eq!(dec.target_count(), 3);
        // A source already closed by EOS is not closed twice.
        let closed = Row {
            ids: vec![10, 1, 20],
            labels: vec![IGNORE, IGNORE, 20],
        };
        assert_eq!(closed.seq2seq(0, 1).0, vec![10, 1]);
    }

    #[test]
    fn byte_tokenizer_round_trips_and_keeps_specials_whole() {
        let t = byte_tokenizer().unwrap();
        assert_eq!(t.get_vocab_size(true), 259);
        let text = "Héllo, wörld! 🌍 <|im_end|>";
        let enc = t.encode(text, false).unwrap();
        assert_eq!(
            enc.get_ids().last(),
            Some(&t.token_to_id("<|im_end|>").unwrap())
        );
        assert_eq!(t.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(eos_token(&t, None).unwrap().0, "<|endoftext|>");
    }

    #[test]
    fn labels_cover_only_the_response() {
        let t = byte_tokenizer().unwrap();
        let conv =
            Conversation::from_record(&json!({"instruction": "hi", "output": "yo"})).unwrap();
        let tpl = Template::parse("Q:{instruction} A:{output}").unwrap();
        let row = encode(&t, &conv, &tpl, "<|endoftext|>").unwrap();
        let trained: Vec<u32> = row
            .ids
            .iter()
            .zip(&row.labels)
            .filter(|(_, &l)| l != IGNORE)
            .map(|(&i, _)| i)
            .collect();
        assert_eq!(t.decode(&trained, false).unwrap(), "yo<|endoftext|>");
        assert_eq!(row.ids.len(), "Q:hi A:yo".len() + 1);
    }

    #[test]
    fn packing_fills_rows_and_keeps_every_token() {
        let rows: Vec<Row> = (0..5u32)
            .map(|i| Row {
                ids: vec![i; 7],
                labels: vec![i64::from(i); 7],
            })
            .collect();
        let packed = pack(&rows, 10);
        assert_eq!(
            packed.iter().map(|r| r.ids.len()).collect::<Vec<_>>(),
            [10, 10, 10, 5]
        );
        let flat: Vec<u32> = packed.iter().flat_map(|r| r.ids.clone()).collect();
        assert_eq!(
            flat,
            rows.iter().flat_map(|r| r.ids.clone()).collect::<Vec<_>>()
        );
    }
}
