//! Preference tuning over (chosen, rejected) pairs: DPO's losses against a frozen
//! reference, computed as TRL's `DPOTrainer` computes them, and ORPO's odds-ratio loss as
//! TRL's `ORPOTrainer` computes it. The two rows of every pair go through one forward
//! pass (chosen rows first, as TRL concatenates them).
//!
//! DPO: a reply's log-probability is the sum over its tokens (the EOS or end-of-turn
//! token included). The reference is the policy itself with its adapters swapped out
//! (LoRA: PEFT's `disable_adapter`, so no second copy of the base weights) or a frozen
//! copy (full fine-tuning), its log-probabilities computed without gradients.
//!
//! ORPO: no reference; the loss is the chosen rows' mean cross-entropy, over every real
//! token as in the ORPO paper's code and TRL (the prompt included, unlike `sft`), minus
//! `beta` x log sigmoid of the log odds ratio of the replies' per-token mean
//! log-probabilities.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use cairn::ml::data::{Pair, Row, IGNORE};
use cairn::ml::job::{DpoLoss, TrainSettings};

use crate::decoder::Model;
use crate::train::Batch;

/// What DPO compares the policy with.
pub enum Reference {
    /// The policy with [`Model::as_reference`]: the base without adapters, or the input
    /// adapters as they came in.
    Adapters,
    /// A frozen copy of the starting weights.
    Frozen(Box<Model>),
    /// Log-probabilities computed before training, kept in each pair.
    Precomputed,
    /// No reference (ORPO).
    None,
}

impl Reference {
    /// The reference's log-probabilities of each row's labelled tokens.
    fn logps(&self, policy: &Model, batch: &Batch, pairs: &[&Pair], bf16: bool) -> Option<Tensor> {
        let _guard = tch::no_grad_guard();
        let of = |m: &Model| reply_logps(&logits(m, batch, bf16), &batch.labels).0;
        match self {
            Reference::Adapters => Some(policy.as_reference(|| of(policy))),
            Reference::Frozen(model) => Some(of(model)),
            Reference::Precomputed => {
                let stored = |pick: fn(&(f32, f32)) -> f32| {
                    pairs
                        .iter()
                        .map(move |p| pick(&p.reference.expect("precomputed reference")))
                };
                let values: Vec<f32> = stored(|r| r.0).chain(stored(|r| r.1)).collect();
                Some(Tensor::from_slice(&values).to_device(policy.device))
            }
            Reference::None => None,
        }
    }
}

/// Stores in every pair the log-probabilities its replies have under `model` as its own
/// reference ([`Model::as_reference`]: the starting weights, before any step).
pub fn precompute(model: &Model, pairs: &mut [Pair], batch: usize, pad: i64, bf16: bool) {
    let _guard = tch::no_grad_guard();
    for chunk in pairs.chunks_mut(batch.max(1)) {
        let values: Vec<f32> = {
            let refs: Vec<&Pair> = chunk.iter().collect();
            let batch = pair_batch(model, &refs, pad, model.device);
            let logps =
                model.as_reference(|| reply_logps(&logits(model, &batch, bf16), &batch.labels).0);
            Vec::try_from(logps.to_kind(Kind::Float)).unwrap_or_default()
        };
        let n = chunk.len();
        for (i, pair) in chunk.iter_mut().enumerate() {
            pair.reference = Some((values[i], values[n + i]));
        }
    }
}

/// The metrics TRL logs for DPO, as means over pairs (`loss` included).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    #[serde(rename = "rewards/chosen")]
    pub rewards_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub rewards_rejected: f64,
    #[serde(rename = "rewards/margins")]
    pub rewards_margins: f64,
    #[serde(rename = "rewards/accuracies")]
    pub rewards_accuracies: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// ORPO: the chosen rows' cross-entropy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nll_loss: Option<f64>,
    /// ORPO: log sigmoid of the log odds ratio.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_odds_ratio: Option<f64>,
    /// ORPO: the log odds ratio.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub log_odds_chosen: Option<f64>,
}

/// Metric sums over the pairs seen so far.
#[derive(Clone, Debug, Default)]
pub struct Sums {
    sums: Metrics,
    pub pairs: usize,
}

impl Sums {
    /// Adds another batch's sums.
    pub fn add(&mut self, other: &Sums) {
        let (a, b) = (&mut self.sums, &other.sums);
        a.loss += b.loss;
        a.rewards_chosen += b.rewards_chosen;
        a.rewards_rejected += b.rewards_rejected;
        a.rewards_margins += b.rewards_margins;
        a.rewards_accuracies += b.rewards_accuracies;
        a.logps_chosen += b.logps_chosen;
        a.logps_rejected += b.logps_rejected;
        for (x, y) in [
            (&mut a.nll_loss, b.nll_loss),
            (&mut a.log_odds_ratio, b.log_odds_ratio),
            (&mut a.log_odds_chosen, b.log_odds_chosen),
        ] {
            if let Some(y) = y {
                *x = Some(x.unwrap_or(0.0) + y);
            }
        }
        self.pairs += other.pairs;
    }

    /// The sums of one batch: its summed `loss`, rewards `beta` x `chosen`/`rejected`
    /// (per pair), and the policy's log-probabilities `logps` (chosen, rejected).
    fn of(
        loss: &Tensor,
        chosen: &Tensor,
        rejected: &Tensor,
        logps: (&Tensor, &Tensor),
        beta: f64,
    ) -> Self {
        let chosen_rewards = chosen.detach() * beta;
        let rejected_rewards = rejected.detach() * beta;
        let accurate = chosen_rewards
            .gt_tensor(&rejected_rewards)
            .to_kind(Kind::Float);
        Sums {
            sums: Metrics {
                loss: tensor_sum(loss),
                rewards_chosen: tensor_sum(&chosen_rewards),
                rewards_rejected: tensor_sum(&rejected_rewards),
                rewards_margins: tensor_sum(&(&chosen_rewards - &rejected_rewards)),
                rewards_accuracies: tensor_sum(&accurate),
                logps_chosen: tensor_sum(logps.0),
                logps_rejected: tensor_sum(logps.1),
                ..Metrics::default()
            },
            pairs: chosen.size()[0] as usize,
        }
    }

    /// The summed loss.
    pub fn loss(&self) -> f64 {
        self.sums.loss
    }

    /// Means over the pairs (`None` without pairs).
    pub fn means(&self) -> Option<Metrics> {
        let n = self.pairs as f64;
        let m = &self.sums;
        (self.pairs > 0).then(|| Metrics {
            loss: m.loss / n,
            rewards_chosen: m.rewards_chosen / n,
            rewards_rejected: m.rewards_rejected / n,
            rewards_margins: m.rewards_margins / n,
            rewards_accuracies: m.rewards_accuracies / n,
            logps_chosen: m.logps_chosen / n,
            logps_rejected: m.logps_rejected / n,
            nll_loss: m.nll_loss.map(|x| x / n),
            log_odds_ratio: m.log_odds_ratio.map(|x| x / n),
            log_odds_chosen: m.log_odds_chosen.map(|x| x / n),
        })
    }
}

/// The model's next-token log-probabilities [rows, t - 1, vocab] (f32) for a batch.
fn logits(model: &Model, batch: &Batch, bf16: bool) -> Tensor {
    let logits = tch::autocast(bf16, || batch.logits(model));
    let t = logits.size()[1];
    logits
        .narrow(1, 0, t - 1)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float)
}

/// The sum of a tensor's elements, as a number.
fn tensor_sum(t: &Tensor) -> f64 {
    t.detach().sum(Kind::Float).double_value(&[])
}

/// Per row: the summed log-probability of the tokens `labels` marks (shifted as the
/// loss shifts them) and how many there are.
fn reply_logps(logp: &Tensor, labels: &Tensor) -> (Tensor, Tensor) {
    let t = labels.size()[1];
    let targets = labels.narrow(1, 1, t - 1);
    let mask = targets.ne(IGNORE).to_kind(Kind::Float);
    let picked = logp
        .gather(2, &targets.clamp_min(0).unsqueeze(-1), false)
        .squeeze_dim(-1);
    (
        (picked * &mask).sum_dim_intlist(&[1i64][..], false, Kind::Float),
        mask.sum_dim_intlist(&[1i64][..], false, Kind::Float),
    )
}

/// log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's `log1mexp`).
fn log1mexp(x: &Tensor) -> Tensor {
    let near = (-x.expm1()).log();
    let far = (-x.exp()).log1p();
    far.where_self(&x.lt(-std::f64::consts::LN_2), &near)
}

/// The rows of `pairs` as one batch: every chosen row, then every rejected one.
fn pair_batch(model: &Model, pairs: &[&Pair], pad: i64, device: Device) -> Batch {
    let rows: Vec<&Row> = pairs
        .iter()
        .map(|p| &p.chosen)
        .chain(pairs.iter().map(|p| &p.rejected))
        .collect();
    Batch::new(model, &rows, pad, device)
}

/// The summed ORPO loss of the pairs of one batch, in units of pairs (the chosen rows'
/// mean cross-entropy times the pairs, minus beta x the summed odds-ratio terms), and the
/// metric sums. `nll` is the chosen rows' mean cross-entropy.
fn orpo_loss(logps: &Tensor, counts: &Tensor, nll: &Tensor, s: &TrainSettings) -> (Tensor, Sums) {
    let n = logps.size()[0] / 2;
    let mean = |k: i64| logps.narrow(0, k * n, n) / counts.narrow(0, k * n, n).clamp_min(1.0);
    let (chosen, rejected) = (mean(0), mean(1));
    let log_odds = (&chosen - &rejected) - (log1mexp(&chosen) - log1mexp(&rejected));
    let ratio = log_odds.log_sigmoid();
    let loss = nll * n as f64 - ratio.sum(Kind::Float) * s.beta;
    let mut sums = Sums::of(&loss, &chosen, &rejected, (&chosen, &rejected), s.beta);
    sums.sums.nll_loss = Some(nll.double_value(&[]) * n as f64);
    sums.sums.log_odds_ratio = Some(tensor_sum(&ratio));
    sums.sums.log_odds_chosen = Some(tensor_sum(&log_odds));
    (loss, sums)
}

/// The chosen rows' mean cross-entropy over every real token (prompt included) after
/// the first, as ORPO's NLL term; decoder-only rows. For an encoder-decoder model the
/// source is not predicted, so the reply's tokens are used.
fn chosen_nll(model: &Model, logp: &Tensor, batch: &Batch, pairs: &[&Pair]) -> Tensor {
    let n = pairs.len() as i64;
    let t = batch.labels.size()[1];
    let chosen_logp = logp.narrow(0, 0, n);
    let targets = if model.is_seq2seq() {
        batch.labels.narrow(0, 0, n)
    } else {
        let mut labels = Vec::with_capacity((n * t) as usize);
        for p in pairs {
            labels.extend(p.chosen.ids.iter().map(|&i| i64::from(i)));
            labels.extend(std::iter::repeat_n(IGNORE, t as usize - p.chosen.ids.len()));
        }
        Tensor::from_slice(&labels)
            .view([n, t])
            .to_device(logp.device())
    };
    let (sums, counts) = reply_logps(&chosen_logp, &targets);
    -(sums.sum(Kind::Float) / counts.sum(Kind::Float).clamp_min(1.0))
}

/// The summed DPO loss of the pairs of one batch (a tensor with gradients) and the
/// metric sums.
fn dpo_loss(
    logps: &Tensor,
    counts: &Tensor,
    reference: &Tensor,
    s: &TrainSettings,
) -> (Tensor, Sums) {
    let n = logps.size()[0] / 2;
    let half = |t: &Tensor, k: i64| t.narrow(0, k * n, n);
    let chosen_ratio = half(logps, 0) - half(reference, 0);
    let rejected_ratio = half(logps, 1) - half(reference, 1);
    let per_pair = match s.dpo_loss {
        DpoLoss::Sigmoid => {
            let z = (&chosen_ratio - &rejected_ratio) * s.beta;
            let e = s.label_smoothing;
            -(z.log_sigmoid() * (1.0 - e)) - (-&z).log_sigmoid() * e
        }
        DpoLoss::Ipo => {
            // TRL normalizes each margin by its reply's length.
            let delta = &chosen_ratio / half(counts, 0).clamp_min(1.0)
                - &rejected_ratio / half(counts, 1).clamp_min(1.0);
            (delta - 1.0 / (2.0 * s.beta)).square()
        }
    };
    let loss = per_pair.sum(Kind::Float);
    let sums = Sums::of(
        &loss,
        &chosen_ratio,
        &rejected_ratio,
        (&half(logps, 0), &half(logps, 1)),
        s.beta,
    );
    (loss, sums)
}

/// Forward and backward of one micro-batch of pairs with the summed loss scaled by
/// `scale`; returns the metric sums.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    model: &Model,
    reference: &Reference,
    pairs: &[&Pair],
    pad: i64,
    device: Device,
    bf16: bool,
    s: &TrainSettings,
    scale: f64,
) -> Sums {
    let batch = pair_batch(model, pairs, pad, device);
    let (loss, sums) = pair_loss(model, reference, &batch, pairs, bf16, s);
    (loss * scale).backward();
    sums
}

/// The summed loss of one batch of pairs (with gradients) and its metric sums.
fn pair_loss(
    model: &Model,
    reference: &Reference,
    batch: &Batch,
    pairs: &[&Pair],
    bf16: bool,
    s: &TrainSettings,
) -> (Tensor, Sums) {
    let reference = reference.logps(model, batch, pairs, bf16);
    let logp = logits(model, batch, bf16);
    let (logps, counts) = reply_logps(&logp, &batch.labels);
    match reference {
        Some(reference) => dpo_loss(&logps, &counts, &reference, s),
        None => {
            let nll = chosen_nll(model, &logp, batch, pairs);
            orpo_loss(&logps, &counts, &nll, s)
        }
    }
}

/// The metrics over `pairs` (no gradients).
pub fn evaluate(
    model: &Model,
    reference: &Reference,
    pairs: &[Pair],
    batch: usize,
    pad: i64,
    bf16: bool,
    s: &TrainSettings,
) -> Option<Metrics> {
    let _guard = tch::no_grad_guard();
    let mut total = Sums::default();
    for chunk in pairs.chunks(batch.max(1)) {
        let refs: Vec<&Pair> = chunk.iter().collect();
        let batch = pair_batch(model, &refs, pad, model.device);
        total.add(&pair_loss(model, reference, &batch, &refs, bf16, s).1);
    }
    total.means()
}

/// The rows of a micro-batch of pairs as the parity tests read them: ids and labels,
/// chosen rows first.
pub fn dump_batch(model: &Model, pairs: &[&Pair], pad: i64) -> Batch {
    pair_batch(model, pairs, pad, Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: serde_json::Value) -> TrainSettings {
        let mut v = serde_json::json!({"objective": "dpo", "beta": 0.5});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    /// The losses by their formulas on hand-picked log-probabilities: two pairs, policy
    /// rows [chosen.., rejected..], reference likewise, reply lengths 4, 2 / 2, 4.
    #[test]
    fn losses_and_rewards_follow_their_formulas() {
        let logps = Tensor::from_slice(&[-10.0f32, -8.0, -12.0, -6.0]);
        let reference = Tensor::from_slice(&[-11.0f32, -8.5, -11.0, -7.0]);
        let counts = Tensor::from_slice(&[4.0f32, 2.0, 2.0, 4.0]);
        // Margins: (1 - (-1)) = 2 and (0.5 - 1) = -0.5.
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let (loss, sums) = dpo_loss(
            &logps,
            &counts,
            &reference,
            &settings(serde_json::json!({})),
        );
        let want = -(sigmoid(0.5 * 2.0).ln() + sigmoid(0.5 * -0.5).ln());
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
        let m = sums.means().unwrap();
        assert!(
            (m.rewards_chosen - 0.5 * (1.0 + 0.5) / 2.0).abs() < 1e-6,
            "{m:?}"
        );
        assert!(
            (m.rewards_rejected - 0.5 * (-1.0 + 1.0) / 2.0).abs() < 1e-6,
            "{m:?}"
        );
        assert_eq!(m.rewards_accuracies, 0.5);
        assert!((m.logps_chosen - -9.0).abs() < 1e-6);

        // Conservative DPO: a fraction e of the labels assumed flipped.
        let e = 0.2;
        let (loss, _) = dpo_loss(
            &logps,
            &counts,
            &reference,
            &settings(serde_json::json!({"label_smoothing": e})),
        );
        let want: f64 = [2.0, -0.5]
            .iter()
            .map(|m: &f64| -(1.0 - e) * sigmoid(0.5 * m).ln() - e * sigmoid(-0.5 * m).ln())
            .sum();
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);

        // IPO: margins per reply token against 1/(2 beta).
        let (loss, _) = dpo_loss(
            &logps,
            &counts,
            &reference,
            &settings(serde_json::json!({"dpo_loss": "ipo"})),
        );
        let want =
            (1.0 / 4.0 - -1.0 / 2.0 - 1.0f64).powi(2) + (0.5 / 2.0 - 1.0 / 4.0 - 1.0f64).powi(2);
        assert!((loss.double_value(&[]) - want).abs() < 1e-6);
    }
}
