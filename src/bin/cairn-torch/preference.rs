//! Preference tuning: DPO's losses over (chosen, rejected) pairs against a frozen
//! reference, computed as TRL's `DPOTrainer` computes them. A pair's log-probabilities
//! are the sums over its reply tokens (the EOS or end-of-turn token included); the two
//! rows of every pair go through one forward pass (chosen rows first, as TRL
//! concatenates them). The reference is the policy itself with its adapters swapped out
//! (LoRA: PEFT's `disable_adapter`, so no second copy of the base weights) or a frozen
//! copy (full fine-tuning), its log-probabilities computed without gradients.

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
}

impl Reference {
    /// The reference's log-probabilities of each row's labelled tokens.
    fn logps(&self, policy: &Model, batch: &Batch, bf16: bool) -> Tensor {
        let _guard = tch::no_grad_guard();
        match self {
            Reference::Adapters => policy.as_reference(|| sequence_logps(policy, batch, bf16).0),
            Reference::Frozen(model) => sequence_logps(model, batch, bf16).0,
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
        self.pairs += other.pairs;
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
        })
    }
}

/// Per row: the summed log-probability of its labelled tokens and how many there are.
fn sequence_logps(model: &Model, batch: &Batch, bf16: bool) -> (Tensor, Tensor) {
    let logits = tch::autocast(bf16, || batch.logits(model));
    let t = logits.size()[1];
    let logits = logits.narrow(1, 0, t - 1).to_kind(Kind::Float);
    let targets = batch.labels.narrow(1, 1, t - 1);
    let mask = targets.ne(IGNORE).to_kind(Kind::Float);
    let logp = logits
        .log_softmax(-1, Kind::Float)
        .gather(2, &targets.clamp_min(0).unsqueeze(-1), false)
        .squeeze_dim(-1);
    (
        (logp * &mask).sum_dim_intlist(&[1i64][..], false, Kind::Float),
        mask.sum_dim_intlist(&[1i64][..], false, Kind::Float),
    )
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
    let sum = |t: &Tensor| t.detach().sum(Kind::Float).double_value(&[]);
    let chosen_rewards = chosen_ratio.detach() * s.beta;
    let rejected_rewards = rejected_ratio.detach() * s.beta;
    let sums = Sums {
        sums: Metrics {
            loss: sum(&loss),
            rewards_chosen: sum(&chosen_rewards),
            rewards_rejected: sum(&rejected_rewards),
            rewards_margins: sum(&(&chosen_rewards - &rejected_rewards)),
            rewards_accuracies: sum(&chosen_rewards
                .gt_tensor(&rejected_rewards)
                .to_kind(Kind::Float)),
            logps_chosen: sum(&half(logps, 0)),
            logps_rejected: sum(&half(logps, 1)),
        },
        pairs: n as usize,
    };
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
    let reference = reference.logps(model, &batch, bf16);
    let (logps, counts) = sequence_logps(model, &batch, bf16);
    let (loss, sums) = dpo_loss(&logps, &counts, &reference, s);
    (loss * scale).backward();
    sums
}

/// The DPO metrics over `pairs` (no gradients).
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
        let reference = reference.logps(model, &batch, bf16);
        let (logps, counts) = sequence_logps(model, &batch, bf16);
        total.add(&dpo_loss(&logps, &counts, &reference, s).1);
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
