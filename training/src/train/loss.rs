//! The training loss of both objectives: a weighted negative log-likelihood at chosen positions.
//!
//! A [`LossBatch`] is the model input plus, flat over (batch, sequence), the positions that carry loss,
//! the token each should predict and its weight. The objectives differ only in how a batch fills these in
//! (the batch module): diffusion lists the masked reply positions, weighted `1/t` over the reply length and
//! the batch's replies; the autoregressive twin lists every reply token, predicted from the position before
//! it, weighted one over their number. [`loss`] is then the same for both, `-sum(weight * log p(target))`,
//! with the model run causally or not.

use candle_core::Tensor;

use crate::model::{log_softmax_last, Batch, Transformer};

/// A batch ready for the loss: the padded input, the flat (batch * seq) positions that carry loss, their
/// target ids and weights (the loss is `-sum(weight * log p(target))`).
pub struct LossBatch {
    pub batch: Batch,
    pub positions: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    /// Tokens in the batch, padding excluded.
    pub tokens: usize,
}

/// `-sum(weight * log p(target))` over the batch's loss positions.
pub fn loss(model: &Transformer, lb: &LossBatch, causal: bool) -> candle_core::Result<Tensor> {
    let device = lb.batch.tokens.device();
    let hidden = model.hidden(&lb.batch, causal)?;
    let e = model.config().n_embd;
    let flat = hidden.reshape(((), e))?;
    let n = lb.positions.len();
    let rows = flat.index_select(&Tensor::from_slice(&lb.positions, n, device)?, 0)?;
    let logp = log_softmax_last(&model.logits(&rows)?)?;
    let targets = Tensor::from_slice(&lb.targets, (n, 1), device)?;
    let picked = logp.gather(&targets, 1)?.squeeze(1)?;
    let weights = Tensor::from_slice(&lb.weights, n, device)?;
    (picked * weights)?.sum_all()?.neg()
}
