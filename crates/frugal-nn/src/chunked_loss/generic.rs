//! The chunked loss from candle's tensor operations, for every device and dtype (CUDA, bf16).
//!
//! The forward pass forms the loss and its gradients chunk by chunk, as the fused one-pass loss
//! does: each chunk's logits (in the compute dtype, reduced in at least f32) are turned into
//! softmax − onehot and multiplied out into the gradients of the hidden states and the head, and
//! freed. With vocabulary chunks as well, a first pass over a token chunk's vocabulary chunks
//! takes each row's log-sum-exp with a running maximum, and a second computes the logits again.
//!
//! The gradients, held until the backward pass as the fused loss holds them, enter the graph
//! through a term whose value is zero: h·Gh − (h·Gh)ᵀ with the second product out of the graph
//! (and the same for the head), each product a (1 × k)·(k × 1) matrix product of views, so that
//! the graph keeps no tensor beyond the inputs and the gradients.

use super::{ranges, LossChunks};
use crate::ops::generic::{check_targets, f32_of};
use crate::ops::IGNORE;
use candle_core::{DType, Result, Tensor, D};

/// A token chunk's loss terms: each row's log-sum-exp and target logit (both (rows, 1), in at
/// least f32), and each row's weight: 1 where its target counts, else 0.
struct RowTerms {
    lse: Tensor,
    picked: Tensor,
    kept: Tensor,
}

/// The logits of rows `h` against vocabulary rows `w`, widened to at least f32.
fn logits(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    f32_of(&h.matmul(&w.t()?)?)
}

/// 1 where a row's target is vocabulary entry `v0 + j`, else 0: (rows, vn) in `dtype`.
fn onehot(targets: &Tensor, v0: usize, vn: usize, dtype: DType) -> Result<Tensor> {
    let ids = Tensor::arange(v0 as u32, (v0 + vn) as u32, targets.device())?;
    targets
        .unsqueeze(1)?
        .broadcast_eq(&ids.unsqueeze(0)?)?
        .to_dtype(dtype)
}

/// The first pass over a token chunk `h` with targets `t` (u32, IGNORE where none): each row's
/// log-sum-exp over the vocabulary chunks of `w` and its target logit. With one vocabulary
/// chunk its logits and their one-hot rows are handed back for the second pass.
fn row_terms(
    h: &Tensor,
    w: &Tensor,
    t: &Tensor,
    vocab_chunks: &[(usize, usize)],
) -> Result<(RowTerms, Option<(Tensor, Tensor)>)> {
    let (mut max, mut sum, mut picked): (Option<Tensor>, Option<Tensor>, Option<Tensor>) =
        (None, None, None);
    let mut whole = None;
    for &(v0, vn) in vocab_chunks {
        let z = logits(h, &w.narrow(0, v0, vn)?)?;
        let chunk_max = z.max_keepdim(D::Minus1)?;
        let new_max = match &max {
            Some(m) => m.maximum(&chunk_max)?,
            None => chunk_max,
        };
        let exps = z.broadcast_sub(&new_max)?.exp()?.sum_keepdim(D::Minus1)?;
        sum = Some(match (&sum, &max) {
            (Some(s), Some(m)) => ((s * (m - &new_max)?.exp()?)? + exps)?,
            _ => exps,
        });
        max = Some(new_max);
        let hot = onehot(t, v0, vn, z.dtype())?;
        let here = (&z * &hot)?.sum_keepdim(D::Minus1)?;
        picked = Some(match picked {
            Some(p) => (p + here)?,
            None => here,
        });
        if vocab_chunks.len() == 1 {
            whole = Some((z, hot));
        }
    }
    let (Some(max), Some(sum), Some(picked)) = (max, sum, picked) else {
        candle_core::bail!("chunked cross-entropy: an empty vocabulary");
    };
    let kept = t.ne(IGNORE)?.to_dtype(max.dtype())?.unsqueeze(1)?;
    let lse = (max + sum.log()?)?;
    Ok((RowTerms { lse, picked, kept }, whole))
}

/// The sum of a token chunk's losses, in f64.
fn chunk_loss(terms: &RowTerms) -> Result<f64> {
    let losses = ((&terms.lse - &terms.picked)? * &terms.kept)?;
    losses.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()
}

/// The loss's inputs, out of the graph (the head in the hidden states' dtype), its targets as
/// a flat u32 tensor checked against the vocabulary, how many of them count, and the chunks.
struct Prepared {
    h: Tensor,
    w: Tensor,
    targets: Tensor,
    counted: f64,
    tokens: Vec<(usize, usize)>,
    vocab: Vec<(usize, usize)>,
}

impl Prepared {
    fn new(h: &Tensor, w: &Tensor, targets: &Tensor, chunks: LossChunks) -> Result<Self> {
        let (n, _) = h.dims2()?;
        let vocab = w.dim(0)?;
        let targets = targets.flatten_all()?;
        if targets.elem_count() != n {
            candle_core::bail!(
                "linear_cross_entropy: {n} rows but {} targets",
                targets.elem_count()
            );
        }
        check_targets(&targets, vocab)?;
        let counted = targets.ne(IGNORE)?.to_dtype(DType::F64)?.sum_all()?;
        Ok(Prepared {
            h: h.detach(),
            w: w.detach().to_dtype(h.dtype())?,
            counted: counted.to_scalar::<f64>()?,
            targets,
            tokens: ranges(n, chunks.tokens),
            vocab: ranges(vocab, chunks.vocab),
        })
    }

    /// Token chunk (`r0`, `rn`)'s rows and targets, and its first pass (see [`row_terms`]).
    fn first_pass(&self, (r0, rn): (usize, usize)) -> Result<TokenChunk> {
        let (h, t) = (self.h.narrow(0, r0, rn)?, self.targets.narrow(0, r0, rn)?);
        let (terms, whole) = row_terms(&h, &self.w, &t, &self.vocab)?;
        Ok(TokenChunk { h, t, terms, whole })
    }
}

/// A token chunk after the first pass: its rows, targets and loss terms, and with one
/// vocabulary chunk its logits and one-hot rows.
struct TokenChunk {
    h: Tensor,
    t: Tensor,
    terms: RowTerms,
    whole: Option<(Tensor, Tensor)>,
}

/// The mean loss of the logits h·wᵀ over `targets` in `chunks`, with its gradients formed
/// chunk by chunk and held for the backward pass (`w` gets one where it is a variable).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: LossChunks,
) -> Result<Tensor> {
    let inputs = Prepared::new(h, w, targets, chunks)?;
    let scale = 1.0 / inputs.counted.max(1.0);
    let mut total = 0f64;
    let (mut dh, mut dw) = (Vec::new(), vec![None::<Tensor>; inputs.vocab.len()]);
    for &rows in &inputs.tokens {
        let TokenChunk {
            h: hc,
            t: tc,
            terms,
            mut whole,
        } = inputs.first_pass(rows)?;
        total += chunk_loss(&terms)?;
        let row_scale = (&terms.kept * scale)?;
        let mut dhc: Option<Tensor> = None;
        for (&(v0, vn), dwv) in inputs.vocab.iter().zip(&mut dw) {
            let wv = inputs.w.narrow(0, v0, vn)?;
            let (z, hot) = match whole.take() {
                Some(both) => both,
                None => {
                    let z = logits(&hc, &wv)?;
                    let hot = onehot(&tc, v0, vn, z.dtype())?;
                    (z, hot)
                }
            };
            let p = z.broadcast_sub(&terms.lse)?.exp()?;
            let dz = (p - hot)?.broadcast_mul(&row_scale)?.to_dtype(h.dtype())?;
            let part = dz.matmul(&wv)?;
            dhc = Some(match dhc {
                Some(d) => (d + part)?,
                None => part,
            });
            if w.is_variable() {
                let part = f32_of(&dz.t()?.matmul(&hc)?)?;
                *dwv = Some(match dwv.take() {
                    Some(d) => (d + part)?,
                    None => part,
                });
            }
        }
        dh.extend(dhc);
    }
    let dtype = reduced(h);
    let loss = Tensor::new(total * scale, h.device())?.to_dtype(dtype)?;
    let mut loss = (loss + zero_with_gradient(h, &Tensor::cat(&dh, 0)?, dtype)?)?;
    if w.is_variable() {
        let dw: Vec<Tensor> = dw.into_iter().flatten().collect();
        let dw = Tensor::cat(&dw, 0)?.to_dtype(w.dtype())?;
        loss = (loss + zero_with_gradient(w, &dw, dtype)?)?;
    }
    Ok(loss)
}

/// The value of [`linear_cross_entropy`] alone: no gradient is formed.
pub fn linear_cross_entropy_value(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: LossChunks,
) -> Result<f32> {
    let inputs = Prepared::new(h, w, targets, chunks)?;
    let mut total = 0f64;
    for &rows in &inputs.tokens {
        total += chunk_loss(&inputs.first_pass(rows)?.terms)?;
    }
    Ok((total / inputs.counted.max(1.0)) as f32)
}

/// The dtype the loss is reduced and returned in: f64 for f64 hidden states, else f32.
fn reduced(h: &Tensor) -> DType {
    match h.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// A scalar of value 0 in `dtype` whose gradient with respect to `x` is `g` (of x's shape and
/// dtype, out of the graph): x·g less its own value out of the graph, the product a
/// (1 × k)·(k × 1) one over x flattened.
fn zero_with_gradient(x: &Tensor, g: &Tensor, dtype: DType) -> Result<Tensor> {
    let k = x.elem_count();
    let dot = x
        .reshape((1, k))?
        .matmul(&g.reshape((k, 1))?)?
        .to_dtype(dtype)?
        .reshape(())?;
    &dot - dot.detach()
}
