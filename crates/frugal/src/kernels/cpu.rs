//! Fused CPU passes over f32 storage. Each pass reads every tensor it needs once and writes the weight (and the
//! moments) in the same sweep, in parallel chunks over the available cores.

use crate::error::{Error, Result};
use crate::projection::{Axis, Selection};
use crate::quant::{self, Packed};
use crate::rules::scaled::Channels;
use crate::rules::{FreeRule, FullRule};
use candle_core::{CpuStorage, InplaceOp2, Layout, Storage, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Elements per parallel work item: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 15;

fn contiguous_range(layout: &Layout, name: &str) -> Result<(usize, usize)> {
    layout
        .contiguous_offsets()
        .ok_or_else(|| Error::UnsupportedTensor {
            name: name.to_string(),
            reason: "tensor is not contiguous".into(),
        })
}

fn unsupported(name: &str) -> Error {
    Error::UnsupportedTensor {
        name: name.to_string(),
        reason: "the fused engine steps f32 tensors on the CPU; tensors elsewhere need the tensor engine (Frugal::set_engine)".into(),
    }
}

/// Runs `f` on the f32 contents of a CPU tensor.
pub fn with_slice<T>(name: &str, t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => {
            let (a, b) = contiguous_range(layout, name)?;
            Ok(f(&data[a..b]))
        }
        _ => Err(unsupported(name)),
    }
}

/// In-place op that lends the weight's storage (mutable) and the gradient's (shared) to a closure.
struct Lend<'n, F> {
    name: &'n str,
    f: RefCell<Option<F>>,
    result: RefCell<Option<Result<()>>>,
}

impl<F: FnOnce(&mut [f32], &[f32]) -> Result<()>> InplaceOp2 for Lend<'_, F> {
    fn name(&self) -> &'static str {
        "frugal-fused-step"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let run = || -> Result<()> {
            let (CpuStorage::F32(w), CpuStorage::F32(g)) = (s1, s2) else {
                return Err(unsupported(self.name));
            };
            let (wa, wb) = contiguous_range(l1, self.name)?;
            let (ga, gb) = contiguous_range(l2, self.name)?;
            let f = self.f.borrow_mut().take().expect("closure runs once");
            f(&mut w[wa..wb], &g[ga..gb])
        };
        *self.result.borrow_mut() = Some(run());
        Ok(())
    }
}

/// Runs `f` with the weight's data (mutable, in place) and the gradient's data.
pub fn with_weight_and_grad(
    name: &str,
    w: &Tensor,
    g: &Tensor,
    f: impl FnOnce(&mut [f32], &[f32]) -> Result<()>,
) -> Result<()> {
    if !w.device().is_cpu() || !g.device().is_cpu() {
        return Err(unsupported(name));
    }
    let op = Lend {
        name,
        f: RefCell::new(Some(f)),
        result: RefCell::new(None),
    };
    w.inplace_op2(g, &op)?;
    op.result
        .into_inner()
        .unwrap_or_else(|| Err(unsupported(name)))
}

/// True if every value is finite. Integer tests on the exponent bits (all ones: Inf or NaN),
/// without early exit, so the loop vectorizes and runs at memory speed.
pub fn all_finite(g: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    g.par_chunks(CHUNK).all(|c| {
        c.iter().fold(0u32, |any, x| {
            any | ((x.to_bits() & EXPONENT) == EXPONENT) as u32
        }) == 0
    })
}

/// Splits `s` into pieces of the given lengths (an empty `s` gives empty pieces).
fn split_lengths<T>(mut s: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    lens.map(|len| {
        let take = len.min(s.len());
        let (head, tail) = std::mem::take(&mut s).split_at_mut(take);
        s = tail;
        head
    })
    .collect()
}

fn chunk_lens(total: usize) -> impl Iterator<Item = usize> + Clone {
    (0..total.div_ceil(CHUNK)).map(move |i| CHUNK.min(total - i * CHUNK))
}

/// One element of a state-full update applied to `w`; unused moments point at a dummy.
#[inline(always)]
fn full_at<R: FullRule>(rule: R, g: f32, m: &mut [f32], v: &mut [f32], r: usize) -> f32 {
    let mut dm = 0.0;
    let mut dv = 0.0;
    let mi = if R::SLOTS >= 1 { &mut m[r] } else { &mut dm };
    let vi = if R::SLOTS >= 2 { &mut v[r] } else { &mut dv };
    rule.update(g, mi, vi)
}

/// w ← keep·w + R(g) over one span, moments alongside.
#[inline(always)]
fn full_span<R: FullRule>(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    rule: R,
    keep: f32,
) {
    match R::SLOTS {
        2 => {
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *w = *w * keep + rule.update(g, m, v);
            }
        }
        1 => {
            let mut dv = 0.0;
            for ((w, &g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                *w = *w * keep + rule.update(g, m, &mut dv);
            }
        }
        _ => {
            let (mut dm, mut dv) = (0.0, 0.0);
            for (w, &g) in w.iter_mut().zip(g) {
                *w = *w * keep + rule.update(g, &mut dm, &mut dv);
            }
        }
    }
}

/// w ← keep·w + R(g) over the whole tensor (state-full parameters, active blocks).
pub fn dense_full<R: FullRule>(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    rule: R,
    keep: f32,
) {
    let ms = split_lengths(m, chunk_lens(w.len()));
    let vs = split_lengths(v, chunk_lens(w.len()));
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(ms.into_par_iter().zip(vs.into_par_iter()))
        .for_each(|((w, g), (m, v))| full_span(w, g, m, v, rule, keep));
}

/// The chunks of a packed moment buffer: codes per [`CHUNK`] values and their block scales
/// (empty pieces for an unused buffer).
fn packed_chunks(p: &mut Packed, total: usize) -> Vec<(&mut [u8], &mut [f32])> {
    let lens = chunk_lens(total);
    let codes = split_lengths(&mut p.codes, lens.clone());
    let scales = split_lengths(&mut p.scales, lens.map(|l| l.div_ceil(quant::BLOCK)));
    codes.into_iter().zip(scales).collect()
}

/// [`dense_full`] with 8-bit moments: each chunk is unpacked, updated and packed again.
pub fn dense_full_packed<R: FullRule>(
    w: &mut [f32],
    g: &[f32],
    (m, v): (&mut Packed, &mut Packed),
    rule: R,
    keep: f32,
) {
    let (m_code, v_code) = (m.code, v.code);
    let ms = packed_chunks(m, w.len());
    let vs = packed_chunks(v, w.len());
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(ms.into_par_iter().zip(vs.into_par_iter()))
        .for_each(|((w, g), ((mc, msc), (vc, vsc)))| {
            UNPACKED.with(|buffers| {
                let (mf, vf) = &mut *buffers.borrow_mut();
                mf.resize(mc.len(), 0.0);
                vf.resize(vc.len(), 0.0);
                quant::unpack(mc, msc, m_code, mf);
                quant::unpack(vc, vsc, v_code, vf);
                full_span(w, g, mf, vf, rule, keep);
                quant::pack(mf, m_code, mc, msc);
                quant::pack(vf, v_code, vc, vsc);
            })
        });
}

thread_local! {
    /// One chunk of unpacked 8-bit moments per worker thread (reused every step).
    static UNPACKED: RefCell<(Vec<f32>, Vec<f32>)> = RefCell::default();
}

/// w ← keep·w + F(g) over the whole tensor (inactive blocks, zero-rank subspaces).
pub fn dense_free<F: FreeRule>(w: &mut [f32], g: &[f32], rule: F, keep: f32) {
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .for_each(|(w, g)| {
            for (w, &g) in w.iter_mut().zip(g) {
                *w = *w * keep + rule.update(g);
            }
        });
}

/// Coordinate split in one pass: selected entries get R (moments at their rank), the others F.
/// Work is split into chunks of whole rows (columns, rows) or flat ranges (entries).
pub fn selected<R: FullRule, F: FreeRule>(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    sel: &Selection,
    (full, free): (R, F),
    keep: f32,
) {
    let step = match sel.axis {
        Axis::Entries => CHUNK,
        Axis::Columns | Axis::Rows => sel.n * (CHUNK / sel.n).max(1),
    };
    let starts: Vec<usize> = (0..=w.len().div_ceil(step))
        .map(|i| (i * step).min(w.len()))
        .collect();
    let ranks: Vec<usize> = starts.iter().map(|&p| sel.rank_before(p)).collect();
    let state_lens = ranks.windows(2).map(|b| b[1] - b[0]);
    let ms = split_lengths(m, state_lens.clone());
    let vs = split_lengths(v, state_lens);
    w.par_chunks_mut(step)
        .zip(g.par_chunks(step))
        .zip(ms.into_par_iter().zip(vs.into_par_iter()))
        .enumerate()
        .for_each(|(c, ((w, g), (m, v)))| {
            let start = starts[c];
            let free_span = |w: &mut [f32], g: &[f32]| {
                for (w, &g) in w.iter_mut().zip(g) {
                    *w = *w * keep + free.update(g);
                }
            };
            match sel.axis {
                Axis::Columns => {
                    let k = sel.idx.len();
                    for (row, (w, g)) in w.chunks_mut(sel.n).zip(g.chunks(sel.n)).enumerate() {
                        let mut from = 0;
                        for (p, &col) in sel.idx.iter().enumerate() {
                            let col = col as usize;
                            free_span(&mut w[from..col], &g[from..col]);
                            w[col] = w[col] * keep + full_at(full, g[col], m, v, row * k + p);
                            from = col + 1;
                        }
                        free_span(&mut w[from..], &g[from..]);
                    }
                }
                Axis::Rows => {
                    let mut r = 0;
                    for (row, (w, g)) in w.chunks_mut(sel.n).zip(g.chunks(sel.n)).enumerate() {
                        if sel
                            .idx
                            .binary_search(&((start / sel.n + row) as u32))
                            .is_ok()
                        {
                            for (j, (w, &g)) in w.iter_mut().zip(g).enumerate() {
                                *w = *w * keep + full_at(full, g, m, v, r + j);
                            }
                            r += sel.n;
                        } else {
                            free_span(w, g);
                        }
                    }
                }
                Axis::Entries => {
                    let (r0, r1) = (ranks[c], ranks[c + 1]);
                    let mut from = 0;
                    for (r, &pos) in sel.idx[r0..r1].iter().enumerate() {
                        let at = pos as usize - start;
                        free_span(&mut w[from..at], &g[from..at]);
                        w[at] = w[at] * keep + full_at(full, g[at], m, v, r);
                        from = at + 1;
                    }
                    free_span(&mut w[from..], &g[from..]);
                }
            }
        });
}

/// x ← R(x) in place: turns the low-dimensional gradient into the low-dimensional update.
pub fn full_in_place<R: FullRule>(x: &mut [f32], m: &mut [f32], v: &mut [f32], rule: R) {
    let ms = split_lengths(m, chunk_lens(x.len()));
    let vs = split_lengths(v, chunk_lens(x.len()));
    x.par_chunks_mut(CHUNK)
        .zip(ms.into_par_iter().zip(vs.into_par_iter()))
        .for_each(|(x, (m, v))| {
            for (i, x) in x.iter_mut().enumerate() {
                *x = full_at(rule, *x, m, v, i);
            }
        });
}

/// Matrix split: w ← keep·w + up(u) + F(g − up(down(g))). `projected_g` is up(down(g)), only
/// needed when F updates.
pub fn projected<F: FreeRule>(
    w: &mut [f32],
    g: &[f32],
    up_u: &[f32],
    projected_g: &[f32],
    free: F,
    keep: f32,
) {
    if F::UPDATES {
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(up_u.par_chunks(CHUNK).zip(projected_g.par_chunks(CHUNK)))
            .for_each(|((w, g), (u, p))| {
                for (((w, &g), &u), &p) in w.iter_mut().zip(g).zip(u).zip(p) {
                    *w = *w * keep + u + free.update(g - p);
                }
            });
    } else {
        w.par_chunks_mut(CHUNK)
            .zip(up_u.par_chunks(CHUNK))
            .for_each(|(w, u)| {
                for (w, &u) in w.iter_mut().zip(u) {
                    *w = *w * keep + u;
                }
            });
    }
}

/// Scaled split: w ← keep·w + u + c·(g − p), with c the coefficient of the element's channel
/// (`coefficients` holds one per row, per column, or one). `up_u` (u) and `projected_g` (p) may
/// be empty (zero). Work is split into chunks of whole rows of length `n`.
#[allow(clippy::too_many_arguments)]
pub fn scaled(
    w: &mut [f32],
    g: &[f32],
    up_u: &[f32],
    projected_g: &[f32],
    coefficients: &[f32],
    ch: Channels,
    n: usize,
    keep: f32,
) {
    let step = n * (CHUNK / n.max(1)).max(1);
    let (with_u, with_p) = (!up_u.is_empty(), !projected_g.is_empty());
    w.par_chunks_mut(step)
        .zip(g.par_chunks(step))
        .enumerate()
        .for_each(|(c, (w, g))| {
            let start = c * step;
            for (r, (w, g)) in w.chunks_mut(n).zip(g.chunks(n)).enumerate() {
                let at = start + r * n;
                let row = at / n;
                let u = if with_u { &up_u[at..at + n] } else { &[][..] };
                let p = if with_p {
                    &projected_g[at..at + n]
                } else {
                    &[][..]
                };
                for j in 0..n {
                    let coefficient = match ch {
                        Channels::Rows => coefficients[row],
                        Channels::Columns => coefficients[j],
                        Channels::Tensor => coefficients[0],
                    };
                    let residual = if with_p { g[j] - p[j] } else { g[j] };
                    let update = if with_u { u[j] } else { 0.0 };
                    w[j] = w[j] * keep + update + coefficient * residual;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finiteness_sees_every_nan_and_infinity() {
        let mut g = vec![1.5f32; 3 * CHUNK + 7];
        g[5] = f32::MAX;
        g[6] = f32::MIN_POSITIVE / 4.0; // subnormal
        g[7] = -0.0;
        assert!(all_finite(&g));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, CHUNK - 1, 2 * CHUNK + 3, g.len() - 1] {
                let mut h = g.clone();
                h[at] = bad;
                assert!(!all_finite(&h), "{bad} at {at}");
            }
        }
    }
}
