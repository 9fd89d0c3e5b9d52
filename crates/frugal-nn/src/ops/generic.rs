//! The fused operations built from candle's own tensor operations, which run on every device
//! and dtype (CUDA, bf16). The public operations in [`crate::ops`] use these wherever the fused
//! CPU kernels do not apply. Reductions (softmax, norms, log-sum-exp) run in at least f32
//! (f64 stays f64), and the result comes back in the input's dtype.

use super::IGNORE;
use candle_core::{bail, DType, Device, Result, Tensor, D};
use std::sync::{Arc, Mutex};

/// `x` in at least f32 precision (16-bit floats widened, others unchanged).
pub(crate) fn f32_of(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 | DType::F16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

/// Softmax over the last dimension of `x` (f32) plus an additive `mask` (broadcast), with the
/// row maximum taken out of the graph: it cancels in the value, and its gradient is zero.
fn softmax_plus(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let x = match mask {
        Some(m) => x.broadcast_add(m)?,
        None => x.clone(),
    };
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Rotary embedding in Hugging Face's rotate-half convention, x·cos + rotate_half(x)·sin, of
/// heads `x` (..., t, d) with tables `cos` and `sin` (t, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Mean cross-entropy of `logits` (n, vocab) against `targets` (n, u32), over the targets that
/// are not [`IGNORE`] (a batch of ignored targets has loss 0).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let x = f32_of(logits)?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let kept = targets.ne(IGNORE)?;
    let safe = kept.where_cond(targets, &targets.zeros_like()?)?;
    let picked = shifted.gather(&safe.unsqueeze(1)?, 1)?;
    let kept = kept.to_dtype(x.dtype())?.unsqueeze(1)?;
    let total = ((lse - picked)? * &kept)?.sum_all()?;
    total.broadcast_div(&kept.sum_all()?.maximum(1.0)?)
}

/// Additive causal masks (0 on and below the diagonal, −∞ above), one per sequence length and
/// device, built once and shared by every step.
static CAUSAL_MASKS: Mutex<Vec<Tensor>> = Mutex::new(Vec::new());

/// The additive causal mask of sequence length `t` on `device` (cached).
pub(crate) fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let mut masks = CAUSAL_MASKS
        .lock()
        .map_err(|_| candle_core::Error::Msg("the causal mask cache lock is poisoned".into()))?;
    if let Some(m) = masks
        .iter()
        .find(|m| m.dim(0).ok() == Some(t) && m.device().same_device(device))
    {
        return Ok(m.clone());
    }
    let values: Vec<f32> = (0..t * t)
        .map(|i| {
            if i % t > i / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(values, (t, t), device)?;
    masks.push(mask.clone());
    Ok(mask)
}

/// Causal softmax of `scale·scores` over the last dimension; scores are (..., t, t).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let x = (f32_of(scores)? * scale)?;
    let mask = causal_mask(t, scores.device())?.to_dtype(x.dtype())?;
    softmax_plus(&x, Some(&mask))?.to_dtype(scores.dtype())
}

/// Softmax of `scale·scores` (batch, heads, q, k) over the keys whose entry in `keep`
/// (batch · k) is true.
pub fn key_masked_softmax(scores: &Tensor, scale: f64, keep: Arc<[bool]>) -> Result<Tensor> {
    let (b, _, _, k) = scores.dims4()?;
    let mask: Vec<f32> = keep
        .iter()
        .map(|&kept| if kept { 0.0 } else { f32::NEG_INFINITY })
        .collect();
    let x = (f32_of(scores)? * scale)?;
    let mask = Tensor::from_vec(mask, (b, 1, 1, k), scores.device())?.to_dtype(x.dtype())?;
    softmax_plus(&x, Some(&mask))?.to_dtype(scores.dtype())
}

/// 1 / sqrt(mean(x²) + eps) over the last dimension of `x` (f32), kept as a dimension of 1.
fn inv_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
}

/// RMSNorm of `x` (..., d) with weight `w` (d).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = f32_of(x)?;
    let normed = xf.broadcast_mul(&inv_rms(&xf, eps)?)?;
    normed.broadcast_mul(&f32_of(w)?)?.to_dtype(x.dtype())
}

/// LayerNorm of `x` (..., d) with weight `w` (d) and bias `b` (d).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let xf = f32_of(x)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let normed = centred.broadcast_mul(&inv_rms(&centred, eps)?)?;
    normed
        .broadcast_mul(&f32_of(w)?)?
        .broadcast_add(&f32_of(b)?)?
        .to_dtype(x.dtype())
}

/// `x` (..., d) plus the bias `b` (d) on every row.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(&b.to_dtype(x.dtype())?)
}

/// x·Wᵀ with W out of the graph (it gets no gradient).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::linear(x, &w.detach().to_dtype(x.dtype())?)
}

/// Checks that every target is in the vocabulary or [`IGNORE`] (the fused loss checks as it
/// reads them; this one needs the values on the host).
pub fn check_targets(targets: &Tensor, vocab: usize) -> Result<()> {
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| t != IGNORE && t as usize >= vocab)
    {
        bail!("cross_entropy: target {bad} outside the vocabulary of {vocab}");
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::{max_diff, randn};
    use candle_core::{DType, Tensor, Var};
    use std::sync::Arc;

    /// Value and input gradients of `op` under a fixed random weighting of its output.
    fn value_and_grads(
        op: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        inputs: &[Tensor],
        dtype: DType,
    ) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap())
            .collect();
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = op(&xs).unwrap().to_dtype(DType::F32).unwrap();
        let weights = randn(y.dims(), 99);
        let grads = (&y * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grads = vars
            .iter()
            .map(|v| grads.get(v).unwrap().to_dtype(DType::F32).unwrap())
            .collect();
        (y, grads)
    }

    /// The fused operation (f32, CPU) and its generic twin agree in value and gradients, to
    /// `tol` in f32 and to `bf16_tol` (relative to the largest value) with bf16 inputs.
    pub(in crate::ops) fn agree(
        fused: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        generic: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
        inputs: &[Tensor],
        (tol, bf16_tol): (f32, f32),
    ) {
        let (y, gs) = value_and_grads(&fused, inputs, DType::F32);
        let (y2, gs2) = value_and_grads(&generic, inputs, DType::F32);
        assert!(
            max_diff(&y, &y2) < tol,
            "values differ by {}",
            max_diff(&y, &y2)
        );
        for (i, (g, g2)) in gs.iter().zip(&gs2).enumerate() {
            assert!(
                max_diff(g, g2) < tol,
                "gradient {i} differs by {}",
                max_diff(g, g2)
            );
        }
        // In bf16 the public operation itself takes the generic path.
        let (y3, gs3) = value_and_grads(&fused, inputs, DType::BF16);
        let scale = |t: &Tensor| -> f32 {
            let m: f32 = t.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            m.max(1e-3)
        };
        assert!(max_diff(&y, &y3) < bf16_tol * scale(&y), "bf16 values");
        for (i, (g, g3)) in gs.iter().zip(&gs3).enumerate() {
            assert!(
                max_diff(g, g3) < bf16_tol * scale(g),
                "bf16 gradient {i} differs by {} (scale {})",
                max_diff(g, g3),
                scale(g)
            );
        }
    }

    #[test]
    fn norms_and_bias_match_the_fused_kernels() {
        let x = randn(&[3, 5, 16], 1);
        let (w, b) = (randn(&[16], 2), randn(&[16], 3));
        agree(
            |t| super::super::rms_norm(&t[0], &t[1], 1e-5),
            |t| super::rms_norm(&t[0], &t[1], 1e-5),
            &[x.clone(), w.clone()],
            (1e-5, 2e-2),
        );
        agree(
            |t| super::super::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| super::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &[x.clone(), w.clone(), b.clone()],
            (1e-4, 3e-2),
        );
        // 600 rows: the fused backward pass sums dw and db over three chunks of rows.
        agree(
            |t| super::super::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            |t| super::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &[randn(&[4, 150, 16], 4), w.clone(), b.clone()],
            (1e-4, 3e-2),
        );
        agree(
            |t| super::super::add_bias(&t[0], &t[1]),
            |t| super::add_bias(&t[0], &t[1]),
            &[x.clone(), b],
            (1e-6, 1e-2),
        );
        agree(
            |t| super::super::gelu_erf(&t[0]),
            |t| t[0].gelu_erf(),
            &[x],
            (1e-5, 1e-2),
        );
    }

    #[test]
    fn softmaxes_match_the_fused_kernels() {
        let scores = randn(&[2, 3, 6, 6], 4);
        agree(
            |t| super::super::causal_softmax(&t[0], 0.7),
            |t| super::causal_softmax(&t[0], 0.7),
            std::slice::from_ref(&scores),
            (1e-6, 2e-2),
        );
        let keep: Arc<[bool]> = (0..12).map(|i| i % 6 < 4 || i == 7).collect();
        agree(
            |t| super::super::key_masked_softmax(&t[0], 0.5, keep.clone()),
            |t| super::key_masked_softmax(&t[0], 0.5, keep.clone()),
            &[scores],
            (1e-6, 2e-2),
        );
    }

    #[test]
    fn losses_match_the_fused_kernels() {
        use crate::chunked_loss::{linear_cross_entropy, LossChunks};
        let logits = randn(&[7, 11], 5);
        let targets = Tensor::new(
            &[3u32, 0, 10, super::IGNORE, 5, 5, 1],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        agree(
            |t| super::super::cross_entropy(&t[0], &targets),
            |t| super::cross_entropy(&t[0], &targets),
            &[logits],
            (1e-6, 2e-2),
        );
        let (h, w) = (randn(&[7, 8], 6), randn(&[11, 8], 7));
        let chunks = LossChunks {
            tokens: 3,
            vocab: 2,
        };
        agree(
            |t| linear_cross_entropy(&t[0], &t[1], &targets, chunks),
            |t| super::cross_entropy(&super::super::linear(&t[0], &t[1])?, &targets),
            &[h, w],
            (1e-5, 3e-2),
        );
        // Every target ignored: loss 0, as the fused loss gives.
        let none = Tensor::new(&[super::IGNORE; 7], &candle_core::Device::Cpu).unwrap();
        let zero: f32 = super::cross_entropy(&randn(&[7, 11], 8), &none)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(zero, 0.0);
        let bad = Tensor::new(&[11u32; 7], &candle_core::Device::Cpu).unwrap();
        let err =
            super::super::cross_entropy(&randn(&[7, 11], 8).to_dtype(DType::BF16).unwrap(), &bad)
                .unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn frozen_linear_passes_no_gradient_to_its_weight() {
        let (x, w) = (randn(&[4, 6], 9), randn(&[5, 6], 10));
        agree(
            |t| super::super::frozen_linear(&t[0], &w),
            |t| super::frozen_linear(&t[0], &w),
            std::slice::from_ref(&x),
            (1e-5, 2e-2),
        );
        let wv = Var::from_tensor(&w).unwrap();
        let y = super::frozen_linear(&x, wv.as_tensor()).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&wv).is_none());
    }
}
