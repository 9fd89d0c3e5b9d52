//! Softmax over the keys that are not padding, for encoder attention.

use super::{f32s, filled, lanes, softmax_grad};
use crate::dropout::{maybe, Dropout, Mask};
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Softmax of scale·x over the last dimension of scores (batch, heads, q, k), where key j of
/// batch item i takes part only if `keep[i·k + j]`.
struct KeyMaskedSoftmax {
    scale: f32,
    keep: Arc<[bool]>,
    /// Score rows per batch item (heads · q).
    rows_per_item: usize,
}

impl CustomOp1 for KeyMaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-key-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let k = l.dims()[l.dims().len() - 1];
        let out = filled(x.len(), k, |r, o| {
            let item = r / self.rows_per_item;
            let keep = &self.keep[item * k..(item + 1) * k];
            lanes::masked_softmax(&x[r * k..][..k], keep, self.scale, o);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        softmax_grad(y, dy, self.scale).map(Some)
    }
}

/// Checks a key mask against scores (batch, heads, q, k): one entry per key of every batch
/// item, and at least one kept key per item.
fn check_keys(scores: &Tensor, keep: &[bool]) -> Result<(usize, usize, usize, usize)> {
    let (b, h, q, k) = scores.dims4()?;
    if keep.len() != b * k {
        bail!(
            "key_masked_softmax: a key mask of {} entries for {b} items of {k} keys",
            keep.len()
        );
    }
    if let Some(i) = (0..b).find(|i| !keep[i * k..(i + 1) * k].iter().any(|&x| x)) {
        bail!("key_masked_softmax: batch item {i} has no key to attend to");
    }
    Ok((b, h, q, k))
}

/// Softmax of `scale·scores` over the last dimension of scores (batch, heads, q, k), over the
/// keys whose entry in `keep` (batch · k, row-major) is true; the others get probability zero.
/// Every batch item needs at least one kept key.
pub fn key_masked_softmax(scores: &Tensor, scale: f64, keep: Arc<[bool]>) -> Result<Tensor> {
    let (_, h, q, _) = check_keys(scores, &keep)?;
    if !super::fused_here(scores) {
        return super::generic::key_masked_softmax(scores, scale, keep);
    }
    scores.contiguous()?.apply_op1(KeyMaskedSoftmax {
        scale: scale as f32,
        keep,
        rows_per_item: h * q,
    })
}

/// [`key_masked_softmax`] followed by dropout at rate `p` from `dropout` (none: no dropout),
/// with the values and gradients of the two operations one after the other. On the CPU it is
/// one operation that keeps the scores and the mask's bits for the backward pass, and
/// recomputes the probabilities there, instead of keeping them and an f32 mask.
pub fn key_masked_softmax_dropout(
    scores: &Tensor,
    scale: f64,
    keep: Arc<[bool]>,
    dropout: &mut Option<&mut Dropout>,
    p: f64,
) -> Result<Tensor> {
    let Some(stream) = dropout
        .as_deref_mut()
        .filter(|_| p > 0.0 && super::fused_here(scores))
    else {
        let probs = key_masked_softmax(scores, scale, keep)?;
        return maybe(dropout, &probs, p);
    };
    let (_, h, q, _) = check_keys(scores, &keep)?;
    let mask = stream.mask(scores.elem_count(), p);
    let softmax = KeyMaskedSoftmax {
        scale: scale as f32,
        keep,
        rows_per_item: h * q,
    };
    scores
        .contiguous()?
        .apply_op1(KeyMaskedSoftmaxDropout { softmax, mask })
}

/// The key-masked softmax, then the dropout mask.
struct KeyMaskedSoftmaxDropout {
    softmax: KeyMaskedSoftmax,
    mask: Mask,
}

impl CustomOp1 for KeyMaskedSoftmaxDropout {
    fn name(&self) -> &'static str {
        "fused-key-masked-softmax-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (probs, shape) = self.softmax.cpu_fwd(s, l)?;
        let CpuStorage::F32(mut values) = probs else {
            bail!("{}: the softmax made no f32 values", self.name());
        };
        let chunk = l.dims()[l.dims().len() - 1].max(1) * 64;
        values
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, v)| self.mask.multiply_in_place(v, c * chunk));
        Ok((CpuStorage::F32(values), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let probs = x.apply_op1_no_bwd(&self.softmax)?;
        let dp = self.mask.multiply(dy)?;
        softmax_grad(&probs, &dp, self.softmax.scale).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::{Device, Var, D};

    #[test]
    fn masked_keys_get_no_weight_and_the_gradient_matches_composed_ops() {
        let (b, h, t) = (2, 3, 4);
        let keep: Vec<bool> = vec![true, true, true, true, true, true, false, false];
        let x = Var::from_tensor(&randn(&[b, h, t, t], 21)).unwrap();
        let a = key_masked_softmax(&x, 0.6, keep.clone().into()).unwrap();
        let bias: Vec<f32> = keep
            .iter()
            .map(|&k| if k { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, 1, t), &Device::Cpu).unwrap();
        let composed = candle_nn::ops::softmax(
            &(x.as_tensor() * 0.6).unwrap().broadcast_add(&bias).unwrap(),
            D::Minus1,
        )
        .unwrap();
        assert!(max_diff(&a, &composed) < 1e-6);
        let second = a
            .get(1)
            .unwrap()
            .flatten_to(1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(second.iter().all(|row| row[2] == 0.0 && row[3] == 0.0));
        let dy = randn(&[b, h, t, t], 22);
        let ga = (&a * &dy).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&composed * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);
    }

    #[test]
    fn a_batch_item_without_keys_is_an_error() {
        let x = randn(&[2, 1, 2, 2], 23);
        let err = key_masked_softmax(&x, 1.0, vec![true, true, false, false].into()).unwrap_err();
        assert!(err.to_string().contains("item 1 has no key"), "{err}");
        let err = key_masked_softmax(&x, 1.0, vec![true; 3].into()).unwrap_err();
        assert!(err.to_string().contains("3 entries"), "{err}");
    }

    #[test]
    fn softmax_and_dropout_as_one_operation_give_the_two_s_values_and_gradient_bit_for_bit() {
        let (b, h, t) = (2, 3, 40);
        let keep: Vec<bool> = (0..b * t).map(|i| i % 7 != 3).collect();
        let x = Var::from_tensor(&randn(&[b, h, t, t], 24)).unwrap();
        let dy = randn(&[b, h, t, t], 25);
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        let (mut one, mut two) = (Dropout::new(9), Dropout::new(9));
        let fused =
            key_masked_softmax_dropout(&x, 0.4, keep.clone().into(), &mut Some(&mut one), 0.1)
                .unwrap();
        let probs = key_masked_softmax(&x, 0.4, keep.clone().into()).unwrap();
        let apart = maybe(&mut Some(&mut two), &probs, 0.1).unwrap();
        assert_eq!(bits(&fused), bits(&apart));
        assert!(bits(&fused).contains(&0) && bits(&fused) != bits(&probs));
        let grad = |y: &Tensor| {
            let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            bits(g.get(&x).unwrap())
        };
        assert_eq!(grad(&fused), grad(&apart));
        // Without a stream, or at rate 0, it is the softmax alone.
        let plain = key_masked_softmax_dropout(&x, 0.4, keep.into(), &mut None, 0.1).unwrap();
        assert_eq!(bits(&plain), bits(&probs));
    }
}
