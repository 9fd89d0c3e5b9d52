//! Cross-entropy of a linear head's logits computed in chunks of tokens (and, optionally, of
//! the vocabulary), so that the logits of the whole batch, (tokens × vocabulary) floats, and
//! their gradient never exist at once.
//!
//! With whole-vocabulary chunks the loss and its gradients are formed in one pass: each token
//! chunk's logits are computed once, turned into softmax − onehot, and multiplied out into the
//! gradients of the hidden states and the head, which wait for the backward pass. With
//! vocabulary chunks as well, the forward pass keeps only each row's log-sum-exp and the
//! backward pass computes the logits again, chunk by chunk. Off the CPU's f32 kernels the
//! chunks run as tensor operations (see `generic`).

mod generic;

use crate::ops::{counted, cpu_f32, fused_here, lanes, log_sum_exp, IGNORE};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use serde::Serialize;

/// How the loss is split: chunks of tokens, and chunks of the vocabulary within each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LossChunks {
    /// Chunks of tokens (rows of the logits).
    pub tokens: usize,
    /// Chunks of the vocabulary (1: each token chunk's logits at once, and one pass).
    pub vocab: usize,
}

impl Default for LossChunks {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl LossChunks {
    /// The whole logits at once.
    pub const WHOLE: LossChunks = LossChunks {
        tokens: 1,
        vocab: 1,
    };

    /// True when nothing is split.
    pub fn is_whole(self) -> bool {
        self.tokens <= 1 && self.vocab <= 1
    }
}

/// Runs `f` on the contiguous f32 contents of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    crate::ops::with_f32(t, "chunked cross-entropy", f)
}

/// `len` items in `chunks` nearly equal ranges (start, length), none empty.
fn ranges(len: usize, chunks: usize) -> Vec<(usize, usize)> {
    let chunks = chunks.clamp(1, len.max(1));
    let (base, extra) = (len / chunks, len % chunks);
    let mut start = 0;
    (0..chunks)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let range = (start, n);
            start += n;
            range
        })
        .collect()
}

/// Logits of rows `h` (r, d) against vocabulary rows `w` (v, d): h·wᵀ, never tracked.
fn logits(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    h.detach().matmul(&w.detach().t()?)
}

/// Adds `part` to the running sum in `acc`.
fn add_to(acc: &mut Option<Tensor>, part: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(sum) => (sum + part)?,
        None => part,
    });
    Ok(())
}

/// The sum of an accumulation that saw at least one part.
fn total(acc: Option<Tensor>) -> Result<Tensor> {
    match acc {
        Some(t) => Ok(t),
        None => bail!("chunked cross-entropy: an empty chunk"),
    }
}

/// scale·(softmax(row) − onehot(target − v0)) of one row of a vocabulary chunk starting at
/// `v0`, given the row's log-sum-exp.
fn softmax_grad(o: &mut [f32], row: &[f32], lse: f32, target: u32, v0: usize, scale: f32) {
    if target == IGNORE {
        return; // `o` stays zero
    }
    let target = target as usize;
    lanes::exp_affine(row, 1.0, lse, o);
    o.iter_mut().for_each(|o| *o *= scale);
    if (v0..v0 + row.len()).contains(&target) {
        o[target - v0] -= scale;
    }
}

/// How a [`Loss`] forms its gradients in the backward pass.
trait LossGrads: Send + Sync {
    /// The operation's name.
    const NAME: &'static str;
    /// The gradients of `h` and `w` (none for a `w` that is not a variable) for the incoming
    /// gradient `grad` of the loss.
    fn grads(&self, h: &Tensor, w: &Tensor, grad: f32) -> Result<(Tensor, Option<Tensor>)>;
}

/// The loss as a candle operation on (hidden states, head weight): its value was computed
/// chunk by chunk before; `grads` forms the gradients.
struct Loss<G> {
    loss: f32,
    grads: G,
}

impl<G: LossGrads> CustomOp2 for Loss<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![self.loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dh, dw) = self.grads.grads(h, w, grad.to_scalar::<f32>()?)?;
        Ok((Some(dh), dw))
    }
}

/// Gradients the forward pass already formed, scaled by the incoming one.
struct Waiting {
    dh: Tensor,
    dw: Option<Tensor>,
}

impl LossGrads for Waiting {
    const NAME: &'static str = "linear-cross-entropy-one-pass";

    fn grads(&self, _h: &Tensor, _w: &Tensor, grad: f32) -> Result<(Tensor, Option<Tensor>)> {
        if grad == 1.0 {
            return Ok((self.dh.clone(), self.dw.clone()));
        }
        let g = grad as f64;
        let dw = self.dw.as_ref().map(|dw| dw * g).transpose()?;
        Ok(((&self.dh * g)?, dw))
    }
}

/// The loss and its gradients in one pass over token chunks of whole-vocabulary logits.
fn one_pass(h: &Tensor, w: &Tensor, targets: &[u32], tokens: usize) -> Result<Tensor> {
    let (n, _) = h.dims2()?;
    let vocab = w.dim(0)?;
    let counted = counted(targets);
    let scale = 1.0 / counted as f32;
    let (hd, wd) = (h.detach(), w.detach());
    let mut losses = vec![0f64; n];
    let (mut dh, mut dw) = (Vec::new(), None);
    for (r0, rn) in ranges(n, tokens) {
        let hc = hd.narrow(0, r0, rn)?;
        let z = logits(&hc, &wd)?;
        let dz = with_f32(&z, |z| {
            let mut out = vec![0f32; z.len()];
            out.par_chunks_mut(vocab)
                .zip(z.par_chunks(vocab))
                .zip(&mut losses[r0..r0 + rn])
                .zip(&targets[r0..r0 + rn])
                .for_each(|(((o, row), loss), &t)| {
                    if t == IGNORE {
                        return; // no loss, no gradient
                    }
                    let lse = log_sum_exp(row);
                    *loss = (lse - row[t as usize]) as f64;
                    softmax_grad(o, row, lse, t, 0, scale);
                });
            out
        })?;
        drop(z);
        let dz = Tensor::from_vec(dz, (rn, vocab), h.device())?;
        dh.push(dz.matmul(&wd)?);
        if w.is_variable() {
            add_to(&mut dw, dz.t()?.matmul(&hc)?)?;
        }
    }
    // Summed sequentially in f64, like the fused loss: independent of scheduling.
    let loss = (losses.iter().sum::<f64>() / counted as f64) as f32;
    let grads = Waiting {
        dh: Tensor::cat(&dh, 0)?,
        dw,
    };
    h.apply_op2(w, Loss { loss, grads })
}

/// Each row's log-sum-exp and the summed loss, over token chunks × vocabulary chunks, with a
/// running maximum and rescaled sum of exponentials per row.
fn lse_pass(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    chunks: LossChunks,
) -> Result<(Vec<f32>, f64)> {
    let (n, _) = h.dims2()?;
    let vocab = w.dim(0)?;
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    let mut target_logit = vec![0f32; n];
    let rows = ranges(n, chunks.tokens);
    for (v0, vn) in ranges(vocab, chunks.vocab) {
        let wc = w.narrow(0, v0, vn)?;
        for &(r0, rn) in &rows {
            let z = logits(&h.narrow(0, r0, rn)?, &wc)?;
            with_f32(&z, |z| {
                max[r0..r0 + rn]
                    .par_iter_mut()
                    .zip(&mut sum[r0..r0 + rn])
                    .zip(&mut target_logit[r0..r0 + rn])
                    .zip(z.par_chunks(vn))
                    .enumerate()
                    .for_each(|(i, (((m, s), tl), row))| {
                        let chunk_max = lanes::max(row);
                        let new_max = m.max(chunk_max);
                        let rescaled = if *m == f32::NEG_INFINITY {
                            0.0
                        } else {
                            *s * (*m - new_max).exp()
                        };
                        *s = rescaled + lanes::sum_exp(row, new_max);
                        *m = new_max;
                        let t = targets[r0 + i];
                        if t != IGNORE && (v0..v0 + vn).contains(&(t as usize)) {
                            *tl = row[t as usize - v0];
                        }
                    });
            })?;
        }
    }
    let lse: Vec<f32> = max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect();
    // Summed sequentially in f64, like the fused loss: independent of scheduling.
    let total: f64 = lse
        .iter()
        .zip(&target_logit)
        .zip(targets)
        .map(|((l, t), &target)| {
            if target == IGNORE {
                0.0
            } else {
                (l - t) as f64
            }
        })
        .sum();
    Ok((lse, total))
}

/// Gradients from each row's log-sum-exp, kept by the forward pass: each chunk's logits are
/// computed again.
struct Recomputed {
    targets: Vec<u32>,
    /// log Σ exp(logits) of each row.
    lse: Vec<f32>,
    chunks: LossChunks,
}

impl LossGrads for Recomputed {
    const NAME: &'static str = "linear-cross-entropy-two-pass";

    fn grads(&self, h: &Tensor, w: &Tensor, grad: f32) -> Result<(Tensor, Option<Tensor>)> {
        let (n, _) = h.dims2()?;
        let vocab = w.dim(0)?;
        let scale = grad / counted(&self.targets) as f32;
        let rows = ranges(n, self.chunks.tokens);
        let mut dh: Vec<Option<Tensor>> = vec![None; rows.len()];
        let mut dw = Vec::new();
        for (v0, vn) in ranges(vocab, self.chunks.vocab) {
            let wc = w.narrow(0, v0, vn)?.detach();
            let mut dwc = None;
            for (slot, &(r0, rn)) in dh.iter_mut().zip(&rows) {
                let hc = h.narrow(0, r0, rn)?.detach();
                let z = logits(&hc, &wc)?;
                let dz = with_f32(&z, |z| {
                    let mut out = vec![0f32; z.len()];
                    out.par_chunks_mut(vn)
                        .zip(z.par_chunks(vn))
                        .enumerate()
                        .for_each(|(i, (o, row))| {
                            let t = self.targets[r0 + i];
                            softmax_grad(o, row, self.lse[r0 + i], t, v0, scale);
                        });
                    out
                })?;
                let dz = Tensor::from_vec(dz, (rn, vn), h.device())?;
                add_to(slot, dz.matmul(&wc)?)?;
                if w.is_variable() {
                    add_to(&mut dwc, dz.t()?.matmul(&hc)?)?;
                }
            }
            if w.is_variable() {
                dw.push(total(dwc)?);
            }
        }
        let dh = dh.into_iter().map(total).collect::<Result<Vec<_>>>()?;
        let dw = match dw.is_empty() {
            true => None,
            false => Some(Tensor::cat(&dw, 0)?),
        };
        Ok((Tensor::cat(&dh, 0)?, dw))
    }
}

/// Checks the shapes and targets; returns the targets.
fn checked_targets(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Vec<u32>> {
    cpu_f32("linear_cross_entropy", h)?;
    cpu_f32("linear_cross_entropy", w)?;
    let (n, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d {
        bail!("linear_cross_entropy: hidden size {d} but head rows of {wd}");
    }
    let targets = targets.flatten_all()?.to_vec1::<u32>()?;
    if targets.len() != n {
        bail!(
            "linear_cross_entropy: {n} rows but {} targets",
            targets.len()
        );
    }
    if let Some(&bad) = targets
        .iter()
        .find(|&&t| t != IGNORE && t as usize >= vocab)
    {
        bail!("cross_entropy: target {bad} outside the vocabulary of {vocab}");
    }
    Ok(targets)
}

/// Mean cross-entropy of the logits h·wᵀ, for hidden states `h` (n, d), head weight `w`
/// (vocab, d) and `targets` (n, u32), in `chunks`: at most (n / tokens) × (vocab / vocab
/// chunks) logits exist at a time. It backpropagates to `h` and `w` (to `w` where it is a
/// variable: a frozen head gets no gradient formed). With one vocabulary chunk
/// the gradients are formed in the forward pass (no logits are computed twice); with more,
/// the backward pass recomputes the logits chunk by chunk. Off the CPU, or in another dtype than
/// f32, the same chunks run as candle tensor operations, which form every gradient in the
/// forward pass (a second pass over the vocabulary chunks gives the log-sum-exp first).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: LossChunks,
) -> Result<Tensor> {
    if !fused_here(h) {
        return generic::linear_cross_entropy(h, w, targets, chunks);
    }
    let targets = checked_targets(h, w, targets)?;
    let (h, w) = (h.contiguous()?, w.contiguous()?);
    if chunks.vocab <= 1 {
        return one_pass(&h, &w, &targets, chunks.tokens);
    }
    let (lse, total) = lse_pass(&h, &w, &targets, chunks)?;
    let loss = (total / counted(&targets) as f64) as f32;
    let grads = Recomputed {
        targets,
        lse,
        chunks,
    };
    h.apply_op2(&w, Loss { loss, grads })
}

/// The value of [`linear_cross_entropy`] alone (evaluation): no gradient is formed or kept.
pub fn linear_cross_entropy_value(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: LossChunks,
) -> Result<f32> {
    if !fused_here(h) {
        return generic::linear_cross_entropy_value(h, w, targets, chunks);
    }
    let targets = checked_targets(h, w, targets)?;
    let (_, total) = lse_pass(&h.detach(), &w.detach(), &targets, chunks)?;
    Ok((total / counted(&targets) as f64) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{max_diff, randn};
    use crate::ops::{cross_entropy, linear};
    use candle_core::{DType, Device, Var};

    #[test]
    fn ranges_cover_every_item_once() {
        assert_eq!(ranges(10, 3), [(0, 4), (4, 3), (7, 3)]);
        assert_eq!(ranges(2, 5), [(0, 1), (1, 1)]);
        assert_eq!(ranges(7, 1), [(0, 7)]);
    }

    /// Every chunking gives the loss and gradients of the whole logits through the fused loss.
    #[test]
    fn chunked_loss_matches_the_whole_logits() {
        let (n, d, vocab) = (13, 6, 23);
        let h = Var::from_tensor(&randn(&[n, d], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[vocab, d], 2)).unwrap();
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let whole = cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &targets).unwrap();
        let g = (&whole * 2.5).unwrap().backward().unwrap();
        for (tokens, vocab) in [
            (1, 1),
            (2, 1),
            (5, 1),
            (13, 1),
            (40, 1),
            (2, 2),
            (5, 3),
            (13, 40),
        ] {
            let chunks = LossChunks { tokens, vocab };
            let loss = linear_cross_entropy(&h, &w, &targets, chunks).unwrap();
            assert!(max_diff(&loss, &whole) < 1e-5, "{chunks:?}");
            let value = linear_cross_entropy_value(&h, &w, &targets, chunks).unwrap();
            assert!(
                (value - whole.to_scalar::<f32>().unwrap()).abs() < 1e-5,
                "{chunks:?}"
            );
            let gc = (&loss * 2.5).unwrap().backward().unwrap();
            for v in [&h, &w] {
                let (a, b) = (gc.get(v).unwrap(), g.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-5, "{chunks:?}");
            }
            // A frozen head: the same gradient of h, none formed for the head.
            let frozen = w.as_tensor().detach();
            let loss = linear_cross_entropy(&h, &frozen, &targets, chunks).unwrap();
            let gf = (&loss * 2.5).unwrap().backward().unwrap();
            assert!(gf.get(&frozen).is_none(), "{chunks:?}");
            assert_eq!(max_diff(gf.get(&h).unwrap(), gc.get(&h).unwrap()), 0.0);
        }
        let bad = Tensor::new(&[vocab as u32; 13], &Device::Cpu).unwrap();
        let chunks = LossChunks {
            tokens: 2,
            vocab: 1,
        };
        assert!(linear_cross_entropy(&h, &w, &bad, chunks).is_err());
    }

    /// Off the fused kernels (f64 and bf16 on the CPU, as on CUDA) every chunking gives the
    /// loss and gradients of the whole logits through the generic operations, with ignored
    /// targets, a head kept in f32 as master weights are, and a frozen head that gets none.
    #[test]
    fn generic_chunks_match_the_whole_logits() {
        let (n, d, vocab) = (13, 6, 23);
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| match i % 4 {
                1 => IGNORE,
                _ => (i * 7 + 3) % vocab as u32,
            })
            .collect();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        for (dtype, tol) in [(DType::F64, 1e-6), (DType::BF16, 1e-2)] {
            let h = Var::from_tensor(&randn(&[n, d], 1).to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&randn(&[vocab, d], 2)).unwrap();
            let as_h = |w: &Tensor| w.to_dtype(dtype).unwrap();
            let whole = crate::ops::cross_entropy(&linear(&h, &as_h(&w)).unwrap(), &targets)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            let g = (&whole * 2.5).unwrap().backward().unwrap();
            let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            let diff = |a: &Tensor, b: &Tensor| {
                scalar(&(a - b).unwrap().abs().unwrap().max_all().unwrap())
            };
            for (tokens, vocab) in [(1, 1), (5, 1), (13, 1), (2, 2), (5, 3), (13, 40)] {
                let chunks = LossChunks { tokens, vocab };
                let loss = linear_cross_entropy(&h, &w, &targets, chunks).unwrap();
                let at = format!("{dtype:?} {chunks:?}");
                assert!((scalar(&loss) - scalar(&whole)).abs() < tol, "{at}");
                let value = linear_cross_entropy_value(&h, &w, &targets, chunks).unwrap();
                assert!(
                    (value as f64 - scalar(&whole)).abs() < tol.max(1e-6),
                    "{at}"
                );
                let gc = (&loss * 2.5).unwrap().backward().unwrap();
                for v in [&h, &w] {
                    let (a, b) = (gc.get(v).unwrap(), g.get(v).unwrap());
                    assert_eq!((a.dims(), a.dtype()), (b.dims(), b.dtype()), "{at}");
                    let scale = scalar(&b.abs().unwrap().max_all().unwrap());
                    assert!(diff(a, b) < tol * scale, "{at}: {} of {scale}", diff(a, b));
                }
                let dh = gc.get(&h).unwrap().to_dtype(DType::F32).unwrap();
                let dh = dh.to_vec2::<f32>().unwrap();
                assert!(dh[1].iter().chain(&dh[5]).all(|&x| x == 0.0), "{at}");
                let frozen = w.as_tensor().detach();
                let loss = linear_cross_entropy(&h, &frozen, &targets, chunks).unwrap();
                let gf = (&loss * 2.5).unwrap().backward().unwrap();
                assert!(gf.get(&frozen).is_none(), "{at}");
                assert_eq!(diff(gf.get(&h).unwrap(), gc.get(&h).unwrap()), 0.0);
            }
            let bad = Tensor::new(&[vocab as u32; 13], &Device::Cpu).unwrap();
            let chunks = LossChunks {
                tokens: 2,
                vocab: 1,
            };
            let err = linear_cross_entropy(&h, &w, &bad, chunks).unwrap_err();
            assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        }
    }

    /// Ignored targets add nothing: the loss and gradients are those of the other rows alone
    /// (their rows of `h` get no gradient), fused or chunked.
    #[test]
    fn ignored_targets_count_for_nothing() {
        let (n, d, vocab) = (12, 5, 17);
        let h = Var::from_tensor(&randn(&[n, d], 3)).unwrap();
        let w = Var::from_tensor(&randn(&[vocab, d], 4)).unwrap();
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| {
                if i % 3 == 1 {
                    IGNORE
                } else {
                    (i * 5 + 2) % vocab as u32
                }
            })
            .collect();
        let kept: Vec<u32> = (0..n as u32).filter(|&i| i % 3 != 1).collect();
        let kept_ids: Vec<u32> = kept.iter().map(|&i| ids[i as usize]).collect();
        let rows = Tensor::new(kept.as_slice(), &Device::Cpu).unwrap();
        let sub = h.index_select(&rows, 0).unwrap();
        let reference = cross_entropy(
            &sub.matmul(&w.t().unwrap()).unwrap(),
            &Tensor::new(kept_ids.as_slice(), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let g = reference.backward().unwrap();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        let fused = cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &targets).unwrap();
        let mut losses = vec![fused];
        for (tokens, vocab) in [(1, 1), (5, 1), (4, 3)] {
            let chunks = LossChunks { tokens, vocab };
            losses.push(linear_cross_entropy(&h, &w, &targets, chunks).unwrap());
            let value = linear_cross_entropy_value(&h, &w, &targets, chunks).unwrap();
            assert!((value - reference.to_scalar::<f32>().unwrap()).abs() < 1e-5);
        }
        for loss in losses {
            assert!(max_diff(&loss, &reference) < 1e-5);
            let gl = loss.backward().unwrap();
            for v in [&h, &w] {
                assert!(max_diff(gl.get(v).unwrap(), g.get(v).unwrap()) < 1e-5);
            }
            let dh = gl.get(&h).unwrap().to_vec2::<f32>().unwrap();
            assert!(dh[1].iter().chain(&dh[4]).all(|&x| x == 0.0));
        }
        // Nothing to predict: loss 0, no gradient.
        let none = Tensor::new(&[IGNORE; 12], &Device::Cpu).unwrap();
        let loss = cross_entropy(&h.matmul(&w.t().unwrap()).unwrap(), &none).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
    }
}
