//! `rank`: an LLM judge scores the N sampled replies of each prompt (a `samples`
//! artifact from `sample`) against a rubric the user writes, and the scores become a
//! `preference` dataset for DPO/ORPO: the best reply against the worst, or every pair
//! whose scores differ by at least `min_margin`. The judge's reason is kept in each
//! record (`judge`). Ties, unparseable replies and prompts with fewer than two samples
//! are counted and dropped, never guessed. Calls go through the OpenAI-compatible client
//! with its call cache, limits and cost accounting, so a rerun pays only for requests
//! never made before.

use std::sync::Arc;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{InputDecl, Kind, ParamIssue, StepContext, StepError, StepOutputs};
use crate::dataset::{self, Drops, Example, Format};
use crate::llm::{self, ChatMessage, LlmError, LlmSettings};
use crate::ml;

/// The `rank` step kind.
pub struct RankStep;

/// Which pairs a prompt's scores make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pairs {
    /// The best-scored reply against the worst (ties on either end: the first one).
    BestVsWorst,
    /// Every pair whose scores differ by at least `min_margin`.
    All,
}

/// Parameters of `rank`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RankParams {
    /// The OpenAI-compatible server and model of the judge (the same block as
    /// `instruct`'s `llm`).
    pub llm: LlmSettings,
    /// What makes a reply good, in your words (e.g. "Sounds like me: short, warm, no
    /// emoji. Answers the question.").
    pub rubric: String,
    /// The judge prompt, with `{rubric}`, `{prompt}` and `{replies}` (numbered); the
    /// default asks for a JSON object `{"scores": [1-10 per reply], "reason": "..."}`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// `best_vs_worst` (default) or `all`.
    #[serde(default = "default_pairs")]
    pub pairs: Pairs,
    /// Smallest score difference that makes a pair.
    #[serde(default = "default_margin")]
    pub min_margin: f64,
    /// Share of prompts in the test split of the dataset.
    #[serde(default = "dataset::default_test_size")]
    pub test_size: f64,
}

fn default_pairs() -> Pairs {
    Pairs::BestVsWorst
}
fn default_margin() -> f64 {
    1.0
}

/// The default judge prompt.
pub const RANK_PROMPT: &str = "You judge replies to the same prompt against a rubric.\n\nRubric:\n{rubric}\n\nPrompt:\n{prompt}\n\nReplies:\n{replies}\n\nScore every reply from 1 (worst) to 10 (best) against the rubric. Reply with a JSON object only: {\"scores\": [one integer per reply, in order], \"reason\": \"one or two sentences on the best and the worst\"}";

/// A judge's verdict on one prompt's replies.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    pub scores: Vec<f64>,
    pub reason: String,
}

/// Reads a judge reply: a JSON object (fenced or not) with one numeric score per reply.
pub fn parse_scores(reply: &str, replies: usize) -> Result<Scores, String> {
    let v = ml::report::judge_json(reply)?;
    let scores: Vec<f64> = v["scores"]
        .as_array()
        .ok_or("no `scores` list")?
        .iter()
        .map(|s| {
            s.as_f64()
                .ok_or_else(|| format!("score {s} is not a number"))
        })
        .collect::<Result<_, _>>()?;
    if scores.len() != replies {
        return Err(format!("{} scores for {replies} replies", scores.len()));
    }
    Ok(Scores {
        scores,
        reason: v["reason"].as_str().unwrap_or_default().to_string(),
    })
}

/// The (chosen, rejected) index pairs of one prompt's scores, or why there are none.
pub fn pairs_of(
    scores: &[f64],
    pairs: Pairs,
    min_margin: f64,
) -> Result<Vec<(usize, usize)>, &'static str> {
    let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
    let worst = (0..scores.len()).fold(0, |w, i| if scores[i] < scores[w] { i } else { w });
    if scores[best] - scores[worst] < min_margin.max(f64::MIN_POSITIVE) {
        return Err("judge scored the replies within min_margin of each other (a tie)");
    }
    Ok(match pairs {
        Pairs::BestVsWorst => vec![(best, worst)],
        Pairs::All => {
            let mut out = Vec::new();
            for i in 0..scores.len() {
                for j in 0..scores.len() {
                    if scores[i] - scores[j] >= min_margin {
                        out.push((i, j));
                    }
                }
            }
            out
        }
    })
}

/// One prompt of a `samples` file.
struct Prompted {
    id: String,
    /// The conversation before the reply, as messages.
    messages: Vec<(String, String)>,
    replies: Vec<String>,
}

impl Prompted {
    fn read(line: &Value, index: usize) -> Option<Self> {
        let messages: Vec<(String, String)> = line["messages"]
            .as_array()?
            .iter()
            .map(|m| {
                Some((
                    m["role"].as_str()?.to_string(),
                    m["content"].as_str()?.to_string(),
                ))
            })
            .collect::<Option<_>>()?;
        let replies = line["samples"]
            .as_array()?
            .iter()
            .map(|s| s["text"].as_str().map(str::to_string))
            .collect::<Option<_>>()?;
        let id = match &line["id"] {
            Value::String(s) => s.clone(),
            Value::Null => format!("prompt-{index}"),
            other => other.to_string(),
        };
        Some(Self {
            id,
            messages,
            replies,
        })
    }

    /// The prompt as the judge reads it (one turn per line with its role when there are
    /// several).
    fn text(&self) -> String {
        match self.messages.as_slice() {
            [(_, only)] => only.clone(),
            turns => turns
                .iter()
                .map(|(r, c)| format!("{r}: {c}"))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// The example of a chosen/rejected pair: a lone user turn is the instruction; a
    /// system + user prompt (an instruction over a rendered context, as `chat_replies`
    /// makes) keeps both; longer conversations are written out turn by turn.
    fn example(&self, chosen: &str, rejected: &str, reason: &str) -> Example {
        let (instruction, input) = match self.messages.as_slice() {
            [(_, user)] => (user.clone(), String::new()),
            [(role, system), (_, user)] if role == "system" => (system.clone(), user.clone()),
            _ => (self.text(), String::new()),
        };
        Example {
            builder: "rank".into(),
            category: "samples".into(),
            source: self.id.clone(),
            instruction,
            input,
            output: chosen.to_string(),
            rejected: Some(rejected.to_string()),
            judge: Some(reason.to_string()),
        }
    }
}

#[async_trait]
impl Kind for RankStep {
    type Params = RankParams;
    const OUTPUTS: &'static [(&'static str, &'static str)] = &[("dataset", dataset::KIND)];

    fn name(&self) -> &'static str {
        "rank"
    }

    fn version(&self) -> String {
        "1".into()
    }

    fn summary(&self) -> &'static str {
        "Score each prompt's sampled replies with an LLM judge against a rubric; output a preference `dataset` (best vs worst)"
    }

    fn inputs(&self) -> Option<Vec<InputDecl>> {
        Some(vec![InputDecl {
            name: "samples".into(),
            kind: ml::SAMPLES_KIND.into(),
            required: true,
        }])
    }

    fn validate(&self, p: &RankParams) -> Vec<ParamIssue> {
        let mut issues: Vec<ParamIssue> = p
            .llm
            .issues()
            .into_iter()
            .map(|(field, msg)| ParamIssue::new(format!("with.llm.{field}"), msg))
            .collect();
        if p.rubric.trim().is_empty() {
            issues.push(ParamIssue::new(
                "with.rubric",
                "the rubric is empty: say what makes a reply good",
            ));
        }
        if let Some(t) = &p.prompt {
            for key in ["{replies}", "{rubric}"] {
                if !t.contains(key) {
                    issues.push(ParamIssue::new(
                        "with.prompt",
                        format!("the judge prompt must contain {key}"),
                    ));
                }
            }
        }
        if !(p.min_margin > 0.0 && p.min_margin.is_finite()) {
            issues.push(ParamIssue::new(
                "with.min_margin",
                format!("min_margin must be positive, got {}", p.min_margin),
            ));
        }
        if !(0.0..1.0).contains(&p.test_size) {
            issues.push(ParamIssue::new(
                "with.test_size",
                format!("test_size {} is outside 0..1", p.test_size),
            ));
        }
        issues
    }

    async fn run(&self, p: &RankParams, ctx: &StepContext) -> Result<StepOutputs, StepError> {
        let lines: Vec<Value> =
            crate::documents::read_jsonl(&ctx.input_path("samples")?).map_err(StepError::Failed)?;
        let mut drops = Drops::default();
        let mut prompts = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            match Prompted::read(line, i) {
                Some(pr) if pr.replies.len() >= 2 => prompts.push(pr),
                Some(pr) => drops.drop("fewer than 2 samples (sample with n >= 2)", pr.id),
                None => drops.drop("not a samples line", format!("line {}", i + 1)),
            }
        }
        let client = Arc::new(
            llm::Client::new(p.llm.clone(), Some(ctx.store.root()))
                .map_err(|e| StepError::Failed(e.to_string()))?,
        );
        let template = p.prompt.clone().unwrap_or_else(|| RANK_PROMPT.to_string());
        let mut tasks = tokio::task::JoinSet::new();
        for (i, pr) in prompts.iter().enumerate() {
            let replies = pr
                .replies
                .iter()
                .enumerate()
                .map(|(k, r)| format!("[{}] {r}", k + 1))
                .collect::<Vec<_>>()
                .join("\n\n");
            let user = template
                .replace("{rubric}", &p.rubric)
                .replace("{prompt}", &pr.text())
                .replace("{replies}", &replies);
            let client = client.clone();
            let cancel = ctx.cancel.clone();
            tasks.spawn(async move {
                (
                    i,
                    client.chat(&[ChatMessage::user(user)], true, &cancel).await,
                )
            });
        }
        let progress = ctx.progress.clone();
        progress.set_length(tasks.len() as u64);
        progress.set_message("judging");
        let mut verdicts: Vec<Option<Scores>> = vec![None; prompts.len()];
        while let Some(joined) = tasks.join_next().await {
            let (i, reply) =
                joined.map_err(|e| StepError::Failed(format!("judge task panicked: {e}")))?;
            match reply {
                Ok(c) => match parse_scores(&c.content, prompts[i].replies.len()) {
                    Ok(s) => verdicts[i] = Some(s),
                    Err(e) => {
                        drops.drop("judge reply unparseable", format!("{}: {e}", prompts[i].id))
                    }
                },
                Err(LlmError::Cancelled) => return Err(StepError::Cancelled),
                Err(e) => {
                    tasks.abort_all();
                    return Err(StepError::Failed(format!("judge: {e}")));
                }
            }
            progress.inc(1);
        }
        let mut examples = Vec::new();
        let mut judged = 0usize;
        for (pr, verdict) in prompts.iter().zip(&verdicts) {
            let Some(v) = verdict else { continue };
            judged += 1;
            match pairs_of(&v.scores, p.pairs, p.min_margin) {
                Ok(pairs) => {
                    for (c, r) in pairs {
                        if pr.replies[c] == pr.replies[r] {
                            drops.drop(
                                "chosen and rejected replies are the same text",
                                pr.id.clone(),
                            );
                            continue;
                        }
                        let reason =
                            format!("scores {} vs {}: {}", v.scores[c], v.scores[r], v.reason);
                        examples.push(pr.example(&pr.replies[c], &pr.replies[r], &reason));
                    }
                }
                Err(why) => drops.drop(why, pr.id.clone()),
            }
        }
        let (dropped, samples) = drops.to_json();
        let mut llm_meta = serde_json::to_value(client.totals()).unwrap_or_default();
        llm_meta["model"] = json!(p.llm.model);
        let info = json!({"builder": "rank", "judged": judged, "prompts": prompts.len(),
            "dropped": dropped, "llm": llm_meta});
        let out = ctx.output_path("dataset");
        let test_size = p.test_size;
        let written = {
            let examples = examples.clone();
            let info = info.clone();
            tokio::task::spawn_blocking(move || {
                dataset::write(
                    &out,
                    &examples,
                    Format::Preference,
                    test_size,
                    info,
                    (0, &[]),
                )
            })
            .await
            .map_err(|e| StepError::Failed(format!("writing the dataset panicked: {e}")))?
            .map_err(StepError::Failed)?
        };
        let note = format!(
            "{} pairs ({} train / {} test) from {} prompts, {} dropped; LLM: {} calls, {} cached, ${:.4}",
            examples.len(),
            written.train,
            written.test,
            prompts.len(),
            drops.total(),
            llm_meta["calls"],
            llm_meta["cached_calls"],
            llm_meta["cost_usd"].as_f64().unwrap_or(0.0)
        );
        let meta = json!({
            "builder": "rank", "format": "preference", "count": examples.len(),
            "train": written.train, "test": written.test, "judged": judged,
            "prompts": prompts.len(), "dropped": dropped, "drop_samples": samples,
            "llm": llm_meta, "rubric": p.rubric,
        });
        ctx.single_output("dataset", meta, note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_replies_are_read_or_refused_with_a_reason() {
        let s = parse_scores(
            "```json\n{\"scores\": [3, 9, 5], \"reason\": \"two is warm\"}\n```",
            3,
        )
        .unwrap();
        assert_eq!(s.scores, vec![3.0, 9.0, 5.0]);
        assert_eq!(s.reason, "two is warm");
        assert!(parse_scores("Reply 2 is best.", 3)
            .unwrap_err()
            .contains("not JSON"));
        assert!(parse_scores("{\"scores\": [1, 2]}", 3)
            .unwrap_err()
            .contains("2 scores for 3"));
        assert!(parse_scores("{\"winner\": 2}", 3)
            .unwrap_err()
            .contains("no `scores`"));
    }

    #[test]
    fn pairs_come_from_scores_and_ties_make_none() {
        assert_eq!(
            pairs_of(&[3.0, 9.0, 5.0], Pairs::BestVsWorst, 1.0),
            Ok(vec![(1, 0)])
        );
        assert_eq!(
            pairs_of(&[3.0, 9.0, 5.0], Pairs::All, 2.0),
            Ok(vec![(1, 0), (1, 2), (2, 0)])
        );
        assert!(pairs_of(&[4.0, 4.0, 4.0], Pairs::BestVsWorst, 1.0).is_err());
        assert!(pairs_of(&[4.0, 4.5], Pairs::BestVsWorst, 1.0).is_err());
    }
}
