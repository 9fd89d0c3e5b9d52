//! Causal attention as one operation, softmax(scale·q·kᵀ)·v over the keys at or before each
//! query, computed a block of query rows at a time: neither the scores nor the probabilities
//! (batch · heads · t² values each) are kept for the backward pass, which recomputes each
//! block's probabilities from the queries, the keys and two numbers per row (the row's maximum
//! and the inverse of its sum). Blocks above the diagonal are skipped, which halves the
//! products of a full t × t attention.
//!
//! Grouped-query attention needs no copies of the shared keys and values: query head `h`
//! reads key-value head `h / (heads / kv_heads)`. The output is laid out token-major,
//! (batch, t, heads · d), as the output projection reads it.
//!
//! The products run in the `gemm` crate on one thread each; the work is split over batch
//! items and blocks (forward) and over batch items and key-value heads (backward), each
//! output written by one worker in a fixed order, so the results do not depend on the number
//! of threads.

use super::{lanes, scaled_max};
use crate::dropout::{Dropout, Mask};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

/// Query rows per block.
const BLOCK: usize = 64;

/// Where the rows of a (batch, heads, t, d) operand lie in its storage: element `c` of row
/// `i` of head `h` of batch item `b` is at `offset + b·batch + h·head + i·row + c`.
#[derive(Clone, Copy, Debug)]
struct Rows {
    offset: usize,
    batch: usize,
    head: usize,
    row: usize,
}

impl Rows {
    /// The rows of a 4-dimensional operand whose last dimension is contiguous.
    fn of(l: &Layout, what: &str) -> Result<Rows> {
        match l.stride() {
            &[batch, head, row, 1] if l.dims().len() == 4 => Ok(Rows {
                offset: l.start_offset(),
                batch,
                head,
                row,
            }),
            s => bail!("causal_attention: {what} must be (batch, heads, t, d) with contiguous rows, got strides {s:?}"),
        }
    }

    /// The token-major layout (batch, t, heads · d) of `heads` heads of `d` over `t` tokens.
    fn token_major(t: usize, heads: usize, d: usize) -> Rows {
        Rows {
            offset: 0,
            batch: t * heads * d,
            head: d,
            row: heads * d,
        }
    }

    /// The first element of row `i` of head `h` of batch item `b`.
    fn at(&self, b: usize, h: usize, i: usize) -> usize {
        self.offset + b * self.batch + h * self.head + i * self.row
    }
}

/// The sizes of an attention: batch items, query heads, key-value heads, tokens, head size.
#[derive(Clone, Copy, Debug)]
struct Sizes {
    b: usize,
    h: usize,
    kv: usize,
    t: usize,
    d: usize,
}

impl Sizes {
    /// Query heads per key-value head.
    fn group(&self) -> usize {
        self.h / self.kv
    }
}

/// dst (m × n, rows `dst_row` apart) = a·b, or dst + a·b where `accumulate`; a is m × k and b
/// is k × n, each given by its row and column strides.
///
/// # Safety
/// Every element the strides reach must lie inside the allocation its pointer points into,
/// and dst must not overlap a or b.
unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    (a, a_row, a_col): (*const f32, usize, usize),
    (b, b_row, b_col): (*const f32, usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row as isize,
        accumulate,
        a,
        a_col as isize,
        a_row as isize,
        b,
        b_col as isize,
        b_row as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The probabilities of a block of query rows (m × `keys`, rows `keys` apart) from their
/// scores `s`, into `p`: row `i` sees its first `seen(i)` keys, from its maximum and inverse
/// sum `stats[2i..2i + 2]`, which `fresh` computes and stores (forward) and otherwise reads
/// (backward), so that both passes get the same probabilities bit for bit.
fn probabilities(
    (s, p): (&[f32], &mut [f32]),
    keys: usize,
    seen: impl Fn(usize) -> usize,
    scale: f32,
    stats: &mut [f32],
    fresh: bool,
) {
    let rows = s.chunks(keys).zip(p.chunks_mut(keys));
    for (i, ((scores, row), stat)) in rows.zip(stats.chunks_mut(2)).enumerate() {
        let len = seen(i);
        let (scores, (seen, unseen)) = (&scores[..len], row.split_at_mut(len));
        if fresh {
            stat[0] = scaled_max(scores, scale);
            stat[1] = 1.0 / lanes::exp_affine(scores, scale, stat[0], seen);
        } else {
            lanes::exp_affine(scores, scale, stat[0], seen);
        }
        seen.iter_mut().for_each(|e| *e *= stat[1]);
        unseen.fill(0.0);
    }
}

/// The scores of query rows `r0..r0 + m` of head `h` against keys `..keys` of its key-value
/// head, into `s` (m × keys).
///
/// # Safety
/// `q` and `k` hold the operands laid out as `qr` and `kr`.
unsafe fn scores(
    s: &mut [f32],
    (q, qr): (&[f32], Rows),
    (k, kr): (&[f32], Rows),
    sz: Sizes,
    (b, h): (usize, usize),
    (r0, m, keys): (usize, usize, usize),
) {
    let g = h / sz.group();
    product(
        (m, keys, sz.d),
        s.as_mut_ptr(),
        keys,
        false,
        (q.as_ptr().add(qr.at(b, h, r0)), qr.row, 1),
        (k.as_ptr().add(kr.at(b, g, 0)), 1, kr.row),
    );
}

/// The rows of head `h` of batch item `b` as a block `r0..r0 + m`: their (max, 1 / sum) pairs
/// in `stats` laid out (batch, t, heads, 2), copied into `row_stats` (m × 2).
fn gather_stats(
    stats: &[f32],
    sz: Sizes,
    (b, h): (usize, usize),
    r0: usize,
    row_stats: &mut [f32],
) {
    for (i, s) in row_stats.chunks_mut(2).enumerate() {
        s.copy_from_slice(&stats[((b * sz.t + r0 + i) * sz.h + h) * 2..][..2]);
    }
}

/// The keys each query row attends to: always a prefix of the keys.
#[derive(Clone, Debug)]
enum Visible {
    /// Those at or before the query's position (decoders).
    Causal,
    /// The first `lens[b]` keys of batch item `b`, for every query (encoders over batches
    /// padded at the end).
    Prefix(Arc<[usize]>),
}

impl Visible {
    /// The number of keys row `i` of batch item `b` attends to.
    fn keys(&self, b: usize, i: usize) -> usize {
        match self {
            Visible::Causal => i + 1,
            Visible::Prefix(lens) => lens[b],
        }
    }
}

/// Attention on f32 CPU tensors, a block of query rows at a time (see the module's
/// documentation), with dropout of the probabilities where `dropout` holds a mask of the
/// (batch, heads, t, t) probabilities.
struct FusedAttention {
    sizes: Sizes,
    scale: f32,
    visible: Visible,
    dropout: Option<Mask>,
    /// Each query row's (max, 1 / sum), from the forward pass.
    stats: OnceLock<Vec<f32>>,
}

impl FusedAttention {
    /// The probabilities of rows `r0..r0 + m` of head `h` of batch item `b` (m × keys, in `p`)
    /// from the queries and keys (their scores formed in `s`), with the row statistics in
    /// `row_stats` (computed where `fresh`, else read).
    #[allow(clippy::too_many_arguments)]
    fn block_probabilities(
        &self,
        (s, p): (&mut [f32], &mut [f32]),
        q: (&[f32], Rows),
        k: (&[f32], Rows),
        (b, h): (usize, usize),
        (r0, m, keys): (usize, usize, usize),
        row_stats: &mut [f32],
        fresh: bool,
    ) {
        // SAFETY: the operands' rows were checked to lie in q and k, and s holds m × keys
        // values.
        unsafe { scores(s, q, k, self.sizes, (b, h), (r0, m, keys)) };
        let seen = |i| self.visible.keys(b, r0 + i);
        probabilities((s, p), keys, seen, self.scale, row_stats, fresh);
    }

    /// `p` (rows `r0..` of head `h` of batch item `b`, `keys` each) times the dropout mask,
    /// in place (nothing without dropout).
    fn drop(&self, p: &mut [f32], (b, h): (usize, usize), r0: usize, keys: usize) {
        let Some(mask) = &self.dropout else { return };
        let t = self.sizes.t;
        for (i, row) in p.chunks_mut(keys).enumerate() {
            mask.multiply_in_place(row, ((b * self.sizes.h + h) * t + r0 + i) * t);
        }
    }

    /// The forward pass: the output (batch, t, heads · d) and each row's (max, 1 / sum), laid
    /// out (batch, t, heads, 2).
    fn forward(
        &self,
        q: (&[f32], Rows),
        k: (&[f32], Rows),
        (v, vr): (&[f32], Rows),
    ) -> (Vec<f32>, Vec<f32>) {
        let sz = self.sizes;
        let (t, d, heads) = (sz.t, sz.d, sz.h);
        let or = Rows::token_major(t, heads, d);
        let mut out = vec![0f32; sz.b * t * heads * d];
        let mut stats = vec![0f32; sz.b * t * heads * 2];
        out.par_chunks_mut(t * heads * d)
            .zip(stats.par_chunks_mut(t * heads * 2))
            .enumerate()
            .for_each(|(b, (o_item, st_item))| {
                o_item
                    .par_chunks_mut(BLOCK * heads * d)
                    .zip(st_item.par_chunks_mut(BLOCK * heads * 2))
                    .enumerate()
                    .for_each(|(blk, (o, st))| {
                        let r0 = blk * BLOCK;
                        let m = (t - r0).min(BLOCK);
                        let keys = self.visible.keys(b, r0 + m - 1);
                        let (mut s, mut p) = (vec![0f32; m * keys], vec![0f32; m * keys]);
                        let mut row_stats = vec![0f32; m * 2];
                        for h in 0..heads {
                            let block = (r0, m, keys);
                            self.block_probabilities(
                                (&mut s, &mut p),
                                q,
                                k,
                                (b, h),
                                block,
                                &mut row_stats,
                                true,
                            );
                            self.drop(&mut p, (b, h), r0, keys);
                            // SAFETY: o holds rows r0..r0 + m of batch item b, heads · d
                            // values each, of which head h's d start at h·d; the values' rows
                            // were checked to lie in v.
                            unsafe {
                                product(
                                    (m, d, keys),
                                    o.as_mut_ptr().add(h * d),
                                    or.row,
                                    false,
                                    (p.as_ptr(), keys, 1),
                                    (v.as_ptr().add(vr.at(b, h / sz.group(), 0)), vr.row, 1),
                                );
                            }
                            for (i, s) in row_stats.chunks(2).enumerate() {
                                st[(i * heads + h) * 2..][..2].copy_from_slice(s);
                            }
                        }
                    });
            });
        (out, stats)
    }

    /// The gradients (dq, dk, dv), laid out (batch, heads, t, d) and (batch, kv heads, t, d),
    /// from the output's gradient `dout` (token-major) and the forward pass's `stats`.
    fn backward(
        &self,
        q: (&[f32], Rows),
        k: (&[f32], Rows),
        (v, vr): (&[f32], Rows),
        dout: &[f32],
        stats: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let sz = self.sizes;
        let (t, d, group) = (sz.t, sz.d, sz.group());
        let (qr, kr, or) = (q.1, k.1, Rows::token_major(t, sz.h, d));
        let mut dq = vec![0f32; sz.b * sz.h * t * d];
        let mut dk = vec![0f32; sz.b * sz.kv * t * d];
        let mut dv = vec![0f32; sz.b * sz.kv * t * d];
        dq.par_chunks_mut(group * t * d)
            .zip(dk.par_chunks_mut(t * d))
            .zip(dv.par_chunks_mut(t * d))
            .enumerate()
            .for_each(|(task, ((dq, dk), dv))| {
                let (b, g) = (task / sz.kv, task % sz.kv);
                // s holds a block's scores, then its probabilities after dropout.
                let (mut s, mut p, mut ds) = (Vec::new(), Vec::new(), Vec::new());
                let mut row_stats = vec![0f32; BLOCK * 2];
                for (dq, h) in dq.chunks_mut(t * d).zip(g * group..) {
                    for r0 in (0..t).step_by(BLOCK) {
                        let m = (t - r0).min(BLOCK);
                        let keys = self.visible.keys(b, r0 + m - 1);
                        s.resize(m * keys, 0.0);
                        p.resize(m * keys, 0.0);
                        ds.resize(m * keys, 0.0);
                        let row_stats = &mut row_stats[..m * 2];
                        gather_stats(stats, sz, (b, h), r0, row_stats);
                        let block = (r0, m, keys);
                        let sp = (&mut s[..], &mut p[..]);
                        self.block_probabilities(sp, q, k, (b, h), block, row_stats, false);
                        // The probabilities as the values met them: after dropout.
                        let used = if self.dropout.is_some() {
                            s.copy_from_slice(&p);
                            self.drop(&mut s, (b, h), r0, keys);
                            &s
                        } else {
                            &p
                        };
                        let dout_block = (dout[or.at(b, h, r0)..].as_ptr(), or.row, 1);
                        // SAFETY (every product below): the operands' rows were checked to
                        // lie in q, k, v and dout; s, p and ds hold m × keys values; dq,
                        // dk and dv hold t rows of d.
                        unsafe {
                            // dv += usedᵀ·dout
                            product(
                                (keys, d, m),
                                dv.as_mut_ptr(),
                                d,
                                true,
                                (used.as_ptr(), 1, keys),
                                dout_block,
                            );
                            // ds = dout·vᵀ, the gradient of the used probabilities
                            product(
                                (m, keys, d),
                                ds.as_mut_ptr(),
                                keys,
                                false,
                                dout_block,
                                (v[vr.at(b, g, 0)..].as_ptr(), 1, vr.row),
                            );
                        }
                        // The probabilities' gradient (through the dropout mask), then the
                        // scores': scale·p⊙(dp − Σ p⊙dp) for each row.
                        self.drop(&mut ds, (b, h), r0, keys);
                        for (ds, p) in ds.chunks_mut(keys).zip(p.chunks(keys)) {
                            let dot = lanes::dot(p, ds);
                            for (ds, &p) in ds.iter_mut().zip(p) {
                                *ds = self.scale * p * (*ds - dot);
                            }
                        }
                        unsafe {
                            // dq = ds·k
                            product(
                                (m, d, keys),
                                dq[r0 * d..].as_mut_ptr(),
                                d,
                                false,
                                (ds.as_ptr(), keys, 1),
                                (k.0[kr.at(b, g, 0)..].as_ptr(), kr.row, 1),
                            );
                            // dk += dsᵀ·q
                            product(
                                (keys, d, m),
                                dk.as_mut_ptr(),
                                d,
                                true,
                                (ds.as_ptr(), 1, keys),
                                (q.0[qr.at(b, h, r0)..].as_ptr(), qr.row, 1),
                            );
                        }
                    }
                }
            });
        (dq, dk, dv)
    }
}

/// The f32 contents of a CPU storage, whole (operands are read through their [`Rows`]).
fn all_f32<'a>(s: &'a CpuStorage, what: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("attention: {what} must be f32"),
    }
}

/// The CPU storage of a tensor's storage.
fn cpu(s: &candle_core::Storage) -> Result<&CpuStorage> {
    match s {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => bail!("attention: the backward pass runs on the CPU"),
    }
}

/// An operand's storage with its rows, checked to hold `heads` heads of `sz.t` rows of `sz.d`.
fn operand<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    heads: usize,
    sz: Sizes,
    what: &str,
) -> Result<(&'a [f32], Rows)> {
    let (data, rows) = (all_f32(s, what)?, Rows::of(l, what)?);
    if l.dims() != [sz.b, heads, sz.t, sz.d] {
        bail!(
            "attention: {what} is {:?}, expected {:?}",
            l.dims(),
            [sz.b, heads, sz.t, sz.d]
        );
    }
    if rows.at(sz.b - 1, heads - 1, sz.t - 1) + sz.d > data.len() {
        bail!("attention: {what}'s rows reach past its storage");
    }
    Ok((data, rows))
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let sz = self.sizes;
        let q = operand(s1, l1, sz.h, sz, "the queries")?;
        let k = operand(s2, l2, sz.kv, sz, "the keys")?;
        let v = operand(s3, l3, sz.kv, sz, "the values")?;
        let (out, stats) = self.forward(q, k, v);
        // A second forward pass of the same operation keeps the first one's values (equal).
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(out), Shape::from((sz.b, sz.t, sz.h * sz.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(stats) = self.stats.get() else {
            bail!("attention: the backward pass ran before the forward pass");
        };
        let sz = self.sizes;
        let grad = grad.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let dout = match gl.contiguous_offsets() {
            Some((a, b)) if b - a == sz.b * sz.t * sz.h * sz.d => {
                &all_f32(cpu(&gs)?, "grad")?[a..b]
            }
            _ => bail!("attention: the output's gradient must be (batch, t, heads · d)"),
        };
        let (dq, dk, dv) = self.backward(
            operand(cpu(&qs)?, ql, sz.h, sz, "the queries")?,
            operand(cpu(&ks)?, kl, sz.kv, sz, "the keys")?,
            operand(cpu(&vs)?, vl, sz.kv, sz, "the values")?,
            dout,
            stats,
        );
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, (sz.b, sz.h, sz.t, sz.d), device)?),
            Some(Tensor::from_vec(dk, (sz.b, sz.kv, sz.t, sz.d), device)?),
            Some(Tensor::from_vec(dv, (sz.b, sz.kv, sz.t, sz.d), device)?),
        ))
    }
}

/// The sizes of queries (batch, heads, t, d) and keys and values (batch, kv heads, t, d), where
/// kv heads divides heads; `op` names the caller in errors.
fn sizes(q: &Tensor, k: &Tensor, v: &Tensor, op: &str) -> Result<Sizes> {
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, kt, kd) = k.dims4()?;
    if (kb, kt, kd) != (b, t, d) || v.dims() != k.dims() || kv == 0 || h % kv != 0 {
        bail!(
            "{op}: queries {:?}, keys {:?} and values {:?} do not fit (batch, heads, t, d) with kv heads dividing heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    Ok(Sizes { b, h, kv, t, d })
}

/// True where the fused operation runs: f32 CPU operands with something to attend over.
fn fused_here(ops: [&Tensor; 3], sz: Sizes) -> bool {
    ops.iter().all(|x| super::fused_here(x)) && sz.b * sz.t * sz.d > 0
}

/// Runs `op` on `q`, `k` and `v` with their rows contiguous (a copy of an operand whose last
/// dimension is not).
fn apply(q: &Tensor, k: &Tensor, v: &Tensor, op: FusedAttention) -> Result<Tensor> {
    let rows = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    rows(q)?.apply_op3(&rows(k)?, &rows(v)?, op)
}

/// Causal attention softmax(scale·q·kᵀ)·v of queries `q` (batch, heads, t, d) over keys and
/// values `k`, `v` (batch, kv heads, t, d), where kv heads divides heads (query head `h` reads
/// key-value head `h / (heads / kv heads)`), as (batch, t, heads · d). On f32 CPU tensors it
/// is one operation that keeps no t × t tensor (see the module's documentation); elsewhere it
/// is [`whole_causal_attention`].
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let sz = sizes(q, k, v, "causal_attention")?;
    if !fused_here([q, k, v], sz) {
        return whole_causal_attention(q, k, v, scale);
    }
    let op = FusedAttention {
        sizes: sz,
        scale: scale as f32,
        visible: Visible::Causal,
        dropout: None,
        stats: OnceLock::new(),
    };
    apply(q, k, v, op)
}

/// Causal attention as in [`causal_attention`], computed whole: the key-value heads repeated
/// for their query heads, the scores (batch, heads, t, t), [`super::causal_softmax`] and the
/// product with the values, which keep the scores and the probabilities for the backward pass.
pub fn whole_causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let sz = sizes(q, k, v, "causal_attention")?;
    let probs = super::causal_softmax(&q.matmul(&repeated(k, sz)?.t()?)?, scale)?;
    merged(&probs.matmul(&repeated(&v.contiguous()?, sz)?)?, sz)
}

/// Attention softmax(scale·q·kᵀ)·v of queries `q` (batch, heads, n, d) that come after every
/// key of `k` and `v` (batch, kv heads, t, d), t ≥ n, the last n keys being the queries' own
/// tokens: query i sees the keys up to t − n + i. This is decoding with the earlier tokens'
/// keys and values kept. As (batch, n, heads · d), computed with tensor operations (the
/// scores are n × t).
pub fn attention_after(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let (kb, kv, t, kd) = k.dims4()?;
    if (kb, kd) != (b, d) || v.dims() != k.dims() || kv == 0 || h % kv != 0 || t < n {
        bail!(
            "attention_after: queries {:?}, keys {:?} and values {:?} do not fit (batch, heads, n, d) after (batch, kv heads, t ≥ n, d)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let sz = Sizes { b, h, kv, t, d };
    let scores = (q.matmul(&repeated(&k.contiguous()?, sz)?.t()?)? * scale)?;
    let scores = if n > 1 {
        let hidden: Vec<f32> = (0..n)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > t - n + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(hidden, (n, t), q.device())?.to_dtype(scores.dtype())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    let max = scores.max_keepdim(candle_core::D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)?;
    merged(
        &probs.matmul(&repeated(&v.contiguous()?, sz)?)?,
        Sizes { t: n, ..sz },
    )
}

/// Keys or values (batch, kv heads, t, d) repeated for their query heads (batch, heads, t, d).
fn repeated(x: &Tensor, sz: Sizes) -> Result<Tensor> {
    if sz.kv == sz.h {
        return Ok(x.clone());
    }
    x.unsqueeze(2)?
        .expand((sz.b, sz.kv, sz.group(), sz.t, sz.d))?
        .reshape((sz.b, sz.h, sz.t, sz.d))
}

/// Heads (batch, heads, t, d) as token-major rows (batch, t, heads · d).
fn merged(x: &Tensor, sz: Sizes) -> Result<Tensor> {
    x.transpose(1, 2)?.reshape((sz.b, sz.t, sz.h * sz.d))
}

/// Encoder attention: softmax(scale·q·kᵀ)·v of queries `q` (batch, heads, t, d) over the keys
/// of each batch item whose entry in `keep` (batch · t, row-major) is true, with dropout at
/// rate `p` from `dropout` (none: no dropout) on the probabilities, as (batch, t, heads · d);
/// keys and values as in [`causal_attention`]. Its values and gradients are those of
/// [`whole_padded_attention`], which it runs on other devices and dtypes and where a batch
/// item's kept keys are not a prefix of its keys. On the CPU it keeps, besides its inputs and
/// output, the dropout mask's bits and two numbers per query row.
pub fn padded_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    keep: Arc<[bool]>,
    dropout: &mut Option<&mut Dropout>,
    p: f64,
) -> Result<Tensor> {
    let sz = sizes(q, k, v, "padded_attention")?;
    let lens = prefix_lengths(&keep, sz);
    let Some(lens) = lens.filter(|_| fused_here([q, k, v], sz)) else {
        return whole_padded_attention((q, k, v), scale, keep, dropout, p);
    };
    let dropout = dropout
        .as_deref_mut()
        .filter(|_| p > 0.0)
        .map(|stream| stream.mask(sz.b * sz.h * sz.t * sz.t, p));
    let op = FusedAttention {
        sizes: sz,
        scale: scale as f32,
        visible: Visible::Prefix(lens),
        dropout,
        stats: OnceLock::new(),
    };
    apply(q, k, v, op)
}

/// The number of kept keys of each batch item, where `keep` (batch · t) keeps a non-empty
/// prefix of every item's keys; else none.
fn prefix_lengths(keep: &[bool], sz: Sizes) -> Option<Arc<[usize]>> {
    if keep.len() != sz.b * sz.t || sz.t == 0 {
        return None;
    }
    keep.chunks(sz.t)
        .map(|item| {
            let len = item.iter().take_while(|&&k| k).count();
            (len > 0 && item[len..].iter().all(|&k| !k)).then_some(len)
        })
        .collect()
}

/// Encoder attention as in [`padded_attention`], computed whole: the scores (batch, heads, t,
/// t), [`super::key_masked_softmax_dropout`] and the product with the values.
pub fn whole_padded_attention(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    keep: Arc<[bool]>,
    dropout: &mut Option<&mut Dropout>,
    p: f64,
) -> Result<Tensor> {
    let sz = sizes(q, k, v, "padded_attention")?;
    let scores = q
        .contiguous()?
        .matmul(&repeated(&k.contiguous()?, sz)?.t()?)?;
    let probs = super::key_masked_softmax_dropout(&scores, scale, keep, dropout, p)?;
    merged(&probs.matmul(&repeated(&v.contiguous()?, sz)?)?, sz)
}

#[cfg(test)]
mod tests {
    use super::super::generic::tests::agree;
    use super::super::tests::{max_diff, randn};
    use super::*;

    #[test]
    fn fused_matches_the_whole_attention_in_value_and_gradients() {
        // 150 tokens: two whole blocks of query rows and a part; grouped (4 query heads over
        // 2 key-value heads) and plain; values as a transposed view, as the models pass them.
        for (kv, seed) in [(2, 10), (4, 20)] {
            let q = randn(&[2, 4, 150, 8], seed);
            let k = randn(&[2, kv, 150, 8], seed + 1);
            let v = randn(&[2, 150, kv, 8], seed + 2);
            let views = |t: &[Tensor]| (t[0].clone(), t[1].clone(), t[2].transpose(1, 2).unwrap());
            agree(
                |t| {
                    let (q, k, v) = views(t);
                    causal_attention(&q, &k, &v, 0.35)
                },
                |t| {
                    let (q, k, v) = views(t);
                    whole_causal_attention(&q, &k, &v, 0.35)
                },
                &[q, k, v],
                (2e-5, 3e-2),
            );
        }
    }

    /// The output and the gradients of q, k and v under a fixed weighting of the output.
    fn run(q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<Tensor> {
        let vars: Vec<_> = [q, k, v]
            .iter()
            .map(|x| candle_core::Var::from_tensor(x).unwrap())
            .collect();
        let y = causal_attention(&vars[0], &vars[1], &vars[2], 0.3).unwrap();
        let w = randn(y.dims(), 7);
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![y];
        out.extend(vars.iter().map(|v| grads.get(v).unwrap().clone()));
        out
    }

    #[test]
    fn padded_attention_matches_the_whole_form_with_dropout() {
        // 70 tokens (rows of the probabilities start off the mask's 64-element words), items
        // padded after 70 and 33 tokens, grouped heads.
        let t = 70;
        let keep: Arc<[bool]> = (0..2 * t).map(|i| i < t || i % t < 33).collect();
        for p in [0.0, 0.2] {
            let attend = |fused: bool, x: &[Tensor]| {
                let mut stream = Dropout::new(11);
                let mut dropout = Some(&mut stream);
                let v = x[2].transpose(1, 2)?;
                let run = if fused {
                    padded_attention
                } else {
                    whole_padded_attention
                };
                run((&x[0], &x[1], &v), 0.4, keep.clone(), &mut dropout, p)
            };
            agree(
                |x| attend(true, x),
                |x| attend(false, x),
                &[
                    randn(&[2, 4, t, 8], 31),
                    randn(&[2, 2, t, 8], 32),
                    randn(&[2, t, 2, 8], 33),
                ],
                (2e-5, 3e-2),
            );
        }
    }

    #[test]
    fn only_prefixes_of_kept_keys_run_fused() {
        let sz = Sizes {
            b: 2,
            h: 1,
            kv: 1,
            t: 3,
            d: 1,
        };
        let lens = |keep: &[bool]| prefix_lengths(keep, sz).map(|l| l.to_vec());
        assert_eq!(
            lens(&[true, true, false, true, false, false]),
            Some(vec![2, 1])
        );
        assert_eq!(lens(&[true, false, true, true, true, true]), None);
        assert_eq!(lens(&[false, false, false, true, true, true]), None);
    }

    #[test]
    fn results_do_not_depend_on_the_number_of_threads() {
        let (q, k, v) = (
            randn(&[3, 4, 130, 8], 1),
            randn(&[3, 2, 130, 8], 2),
            randn(&[3, 2, 130, 8], 3),
        );
        let pool = |n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap()
        };
        let one = pool(1).install(|| run(&q, &k, &v));
        let three = pool(3).install(|| run(&q, &k, &v));
        for (a, b) in one.iter().zip(&three) {
            assert_eq!(max_diff(a, b), 0.0);
        }
    }

    #[test]
    fn short_sequences_match_the_whole_attention() {
        // One token (it attends to itself only: the output is its value) and a part block.
        for t in [1, 5] {
            let (q, k, v) = (
                randn(&[2, 2, t, 4], 4),
                randn(&[2, 1, t, 4], 5),
                randn(&[2, 1, t, 4], 6),
            );
            let fused = causal_attention(&q, &k, &v, 0.5).unwrap();
            let whole = whole_causal_attention(&q, &k, &v, 0.5).unwrap();
            assert!(max_diff(&fused, &whole) < 1e-6);
            if t == 1 {
                let own = v
                    .repeat((1, 2, 1, 1))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((2, 1, 8))
                    .unwrap();
                assert_eq!(max_diff(&fused, &own), 0.0);
            }
        }
    }

    #[test]
    fn mismatched_operands_are_errors() {
        let q = randn(&[1, 3, 4, 2], 1);
        let k = randn(&[1, 2, 4, 2], 2);
        let err = causal_attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(err.contains("kv heads dividing heads"), "{err}");
        let short = randn(&[1, 1, 3, 2], 3);
        assert!(causal_attention(&q, &short, &short, 1.0).is_err());
    }
}
