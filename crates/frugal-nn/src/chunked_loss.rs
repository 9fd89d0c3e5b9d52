//! Cross-entropy of a linear head's logits computed in chunks of rows (tokens) and of the
//! vocabulary, so that the logits of the whole batch, (tokens × vocabulary) floats, and their
//! gradient never exist at once: each pass holds one chunk of logits.

use crate::ops::cpu_f32;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Runs `f` on the contiguous f32 contents of a CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => bail!("chunked cross-entropy: expects f32 tensors on the CPU"),
    }
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

/// The loss as a candle operation on (hidden states, head weight): the forward pass already
/// computed each row's log-sum-exp and the mean loss chunk by chunk; the backward pass
/// recomputes each chunk's logits to form its gradient.
struct LinearCrossEntropy {
    targets: Vec<u32>,
    /// log Σ exp(logits) of each row.
    lse: Vec<f32>,
    loss: f32,
    chunks: usize,
}

impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "chunked-linear-cross-entropy"
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
        let (n, d) = h.dims2()?;
        let vocab = w.dim(0)?;
        let scale = grad.to_scalar::<f32>()? / n as f32;
        let rows = ranges(n, self.chunks);
        let mut dh: Vec<Option<Tensor>> = vec![None; rows.len()];
        let mut dw = Vec::new();
        for (v0, vn) in ranges(vocab, self.chunks) {
            let wc = w.narrow(0, v0, vn)?.detach();
            let mut dwc: Option<Tensor> = None;
            for (slot, &(r0, rn)) in dh.iter_mut().zip(&rows) {
                let hc = h.narrow(0, r0, rn)?.detach();
                let z = logits(&hc, &wc)?;
                // scale·(softmax − onehot) of this chunk.
                let dz = with_f32(&z, |z| {
                    let mut out = vec![0f32; z.len()];
                    out.par_chunks_mut(vn)
                        .zip(z.par_chunks(vn))
                        .enumerate()
                        .for_each(|(i, (o, row))| {
                            let lse = self.lse[r0 + i];
                            for (o, x) in o.iter_mut().zip(row) {
                                *o = scale * (x - lse).exp();
                            }
                            let t = self.targets[r0 + i] as usize;
                            if (v0..v0 + vn).contains(&t) {
                                o[t - v0] -= scale;
                            }
                        });
                    out
                })?;
                let dz = Tensor::from_vec(dz, (rn, vn), h.device())?;
                let part = dz.matmul(&wc)?;
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
                let part = dz.t()?.matmul(&hc)?;
                dwc = Some(match dwc {
                    Some(acc) => (acc + part)?,
                    None => part,
                });
            }
            dw.push(dwc.expect("at least one row chunk"));
        }
        let dh: Vec<Tensor> = dh
            .into_iter()
            .map(|t| t.expect("every row chunk"))
            .collect();
        let dh = Tensor::cat(&dh, 0)?;
        let dw = Tensor::cat(&dw, 0)?;
        debug_assert_eq!(dh.dims(), [n, d]);
        Ok((Some(dh), Some(dw)))
    }
}

/// Mean cross-entropy of the logits h·wᵀ, for hidden states `h` (n, d), head weight `w`
/// (vocab, d) and `targets` (n, u32), over `chunks` row chunks × `chunks` vocabulary chunks:
/// at most (n / chunks) × (vocab / chunks) logits exist at a time. It backpropagates to `h` and
/// `w`; the backward pass recomputes the logits chunk by chunk.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    chunks: usize,
) -> Result<Tensor> {
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
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("cross_entropy: target {bad} outside the vocabulary of {vocab}");
    }
    // Running maximum and rescaled sum of exponentials of each row, over vocabulary chunks.
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = vec![0f32; n];
    let mut target_logit = vec![0f32; n];
    let rows = ranges(n, chunks);
    for (v0, vn) in ranges(vocab, chunks) {
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
                        let chunk_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let new_max = m.max(chunk_max);
                        let rescaled = if *m == f32::NEG_INFINITY {
                            0.0
                        } else {
                            *s * (*m - new_max).exp()
                        };
                        *s = rescaled + row.iter().map(|x| (x - new_max).exp()).sum::<f32>();
                        *m = new_max;
                        let t = targets[r0 + i] as usize;
                        if (v0..v0 + vn).contains(&t) {
                            *tl = row[t - v0];
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
        .map(|(l, t)| (l - t) as f64)
        .sum();
    let op = LinearCrossEntropy {
        targets,
        lse,
        loss: (total / n as f64) as f32,
        chunks,
    };
    h.contiguous()?.apply_op2(&w.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cross_entropy;
    use crate::ops::tests::{max_diff, randn};
    use candle_core::{Device, Var};

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
        for chunks in [1, 2, 5, 13, 40] {
            let loss = linear_cross_entropy(&h, &w, &targets, chunks).unwrap();
            assert!(max_diff(&loss, &whole) < 1e-5, "{chunks} chunks");
            let gc = (&loss * 2.5).unwrap().backward().unwrap();
            for v in [&h, &w] {
                let (a, b) = (gc.get(v).unwrap(), g.get(v).unwrap());
                assert_eq!(a.dims(), b.dims());
                assert!(max_diff(a, b) < 1e-5, "{chunks} chunks");
            }
        }
        let bad = Tensor::new(&[vocab as u32; 13], &Device::Cpu).unwrap();
        assert!(linear_cross_entropy(&h, &w, &bad, 2).is_err());
    }
}
