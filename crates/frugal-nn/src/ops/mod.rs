//! Fused CPU operations with their own backward passes: causal attention, cross-entropy,
//! causal softmax, RMSNorm, the SwiGLU gate, rotary embedding into heads, and for encoders
//! LayerNorm, softmax over unpadded keys, exact GELU and bias addition. Each reads its inputs
//! once per pass instead of chaining a dozen tensor operations (candle's built-in fast variants
//! of these have no backward). Their exponentials and row sums run in eight lanes (`lanes`).
//! They run on f32 CPU tensors; on other devices and dtypes each public operation runs its
//! [`generic`] twin (attention: its whole form) instead.

mod attention;
mod bias;
mod frozen_linear;
mod gelu;
pub mod generic;
mod key_softmax;
pub(crate) mod lanes;
mod layer_norm;
mod lora_linear;
mod rope;
mod swiglu;

pub use attention::{
    attention_after, causal_attention, padded_attention, whole_causal_attention,
    whole_padded_attention,
};
pub use bias::add_bias;
pub use frozen_linear::frozen_linear;
pub use gelu::gelu_erf;
pub use key_softmax::{key_masked_softmax, key_masked_softmax_dropout};
pub use lanes::{limit_row_kernels, RowKernels};
pub use layer_norm::layer_norm;
pub use lora_linear::lora_linear;
pub use rope::rope_heads;
pub use swiglu::swiglu;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// An element type the fused operations read from CPU storage.
trait Elem: Sized + Sync {
    /// The contiguous contents of `s` laid out as `l`.
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [Self]>;
}

impl Elem for f32 {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => bail!("{op}: expects a contiguous f32 tensor"),
        }
    }
}

impl Elem for u32 {
    fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [u32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::U32(v), Some((a, b))) => Ok(&v[a..b]),
            _ => bail!("{op}: expects contiguous u32 targets"),
        }
    }
}

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    f32::slice(s, l, op)
}

/// Runs `f` on the contiguous f32 contents of a CPU tensor (`op` names the caller in errors).
pub(crate) fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(f(&v[a..b])),
        _ => bail!("{op}: expects f32 tensors on the CPU"),
    }
}

/// x·Wᵀ for the contiguous f32 input `x` (..., in) of a CPU operation and a W (out, in) on the
/// CPU, written straight into a new storage: the product [`linear`] computes, bit for bit,
/// without copying the input into a tensor or the output out of one.
pub(crate) fn cpu_linear(
    x: &CpuStorage,
    xl: &Layout,
    w: &CpuStorage,
    wl: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (Some((start, _)), [outputs, inputs]) = (xl.contiguous_offsets(), wl.dims()) else {
        bail!("cpu-linear: expects a contiguous input and a matrix");
    };
    let dims = xl.dims();
    let Some((last, lead)) = dims.split_last() else {
        bail!("cpu-linear: the input is a scalar");
    };
    if last != inputs {
        bail!(
            "cpu-linear: an input of width {last} for a weight of shape {:?}",
            wl.dims()
        );
    }
    let rows: usize = lead.iter().product();
    let x_rows = Layout::contiguous_with_offset((rows, *inputs), start);
    let y = candle_core::backend::BackendStorage::matmul(
        x,
        w,
        (1, rows, *outputs, *inputs),
        &x_rows,
        &wl.transpose(0, 1)?,
    )?;
    let mut shape = lead.to_vec();
    shape.push(*outputs);
    Ok((y, Shape::from(shape)))
}

/// [`cpu_linear`] with W a tensor on the CPU.
pub(crate) fn cpu_linear_by(
    x: &CpuStorage,
    xl: &Layout,
    w: &Tensor,
) -> Result<(CpuStorage, Shape)> {
    let (storage, wl) = w.storage_and_layout();
    let candle_core::Storage::Cpu(w) = &*storage else {
        bail!("cpu-linear: expects the weight on the CPU");
    };
    cpu_linear(x, xl, w, wl)
}

/// The CPU's kernels on this machine: the matrix products' library (see [`crate::matmul`])
/// and the instruction set of the fused row kernels.
pub fn cpu_kernels() -> String {
    format!(
        "matrix products: {}; row kernels: {}",
        crate::matmul::library(),
        lanes::kernel_isa()
    )
}

/// Off: every operation takes its device-generic form, even on the CPU in f32.
static FUSED_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the fused CPU kernels run where they apply (the default), or every operation takes
/// the device-generic form it takes on CUDA or in bf16: candle tensor operations, which keep
/// more for the backward pass. Off, the CPU checks and measures the device path in f32.
pub fn use_fused_kernels(on: bool) {
    FUSED_KERNELS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fused CPU kernels are in use (see [`use_fused_kernels`]).
pub fn fused_kernels() -> bool {
    FUSED_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// True where the fused kernels run: `t` is an f32 tensor on the CPU, and they are in use.
pub(crate) fn fused_here(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && fused_kernels()
}

/// Checks that `t` is an f32 tensor on the CPU, where the fused operation `op` runs.
pub fn cpu_f32(op: &str, t: &Tensor) -> Result<()> {
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::F32 {
        bail!(
            "{op} is a fused CPU operation on f32 tensors; got {:?} on {:?}",
            t.dtype(),
            t.device().location()
        );
    }
    Ok(())
}

/// `len` elements written in parallel, chunk by chunk: `fill(i, out)` gets chunk `i` (`chunk`
/// elements, the last one shorter) zeroed, and returns a value per chunk. The worker that fills
/// a chunk zeroes it first, while it is in cache, instead of one thread zeroing the whole
/// buffer in a pass of its own.
pub(crate) fn filled_chunks<R: Send>(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) -> R + Sync,
) -> (Vec<f32>, Vec<R>) {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let results = out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .map(|(i, c)| {
            c.fill(MaybeUninit::new(0.0));
            // SAFETY: every element of the chunk has just been initialised, and
            // MaybeUninit<f32> has the layout of f32.
            let c = unsafe { &mut *(c as *mut [MaybeUninit<f32>] as *mut [f32]) };
            fill(i, c)
        })
        .collect();
    // SAFETY: the chunks cover the first `len` elements, and each was initialised.
    unsafe { out.set_len(len) };
    (out, results)
}

/// [`filled_chunks`] where a chunk returns nothing.
pub(crate) fn filled(
    len: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    filled_chunks(len, chunk, fill).0
}

/// Applies `f(out_row, a_row, b_row)` to matching rows of `row` elements, in parallel.
fn map_row_pairs(
    a: &[f32],
    b: &[f32],
    row: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    filled(a.len(), row, |i, o| {
        f(o, &a[i * row..][..o.len()], &b[i * row..][..o.len()])
    })
}

/// A backward pass over an f32 input `a` and a second input `b` (it has no gradient itself).
trait GradPass: Send + Sync {
    /// The operation's name in errors.
    const NAME: &'static str;
    /// The element type of `b`.
    type B: Elem;
    /// The output and its shape, from `a` (laid out as `layout`) and `b`.
    fn run(&self, a: &[f32], b: &[Self::B], layout: &Layout) -> (Vec<f32>, Shape);
}

/// Runs a [`GradPass`] as a candle operation on the CPU.
struct Pass<P>(P);

impl<P: GradPass> CustomOp2 for Pass<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32s(s1, l1, P::NAME)?, P::B::slice(s2, l2, P::NAME)?);
        let (out, shape) = self.0.run(a, b, l1);
        Ok((CpuStorage::F32(out), shape))
    }
}

/// x·Wᵀ for x of shape (..., in) and W of shape (out, in).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some((last, lead)) = dims.split_last() else {
        bail!("linear: the input is a scalar");
    };
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, *last))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// log Σ exp(row).
pub(crate) fn log_sum_exp(row: &[f32]) -> f32 {
    let max = lanes::max(row);
    max + lanes::sum_exp(row, max).ln()
}

/// Mean cross-entropy of logits (n, v) against targets (n). The forward pass keeps each row's
/// log Σ exp for the backward pass.
#[derive(Default)]
struct CrossEntropy {
    lse: std::sync::OnceLock<Vec<f32>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let logits = f32s(s1, l1, self.name())?;
        let targets = u32::slice(s2, l2, self.name())?;
        let v = l1.dims()[1];
        // Checked here, where the targets are at hand; the backward pass runs only after this.
        if let Some(&bad) = targets.iter().find(|&&t| t != IGNORE && t as usize >= v) {
            bail!("cross_entropy: target {bad} outside the vocabulary of {v}");
        }
        let lse: Vec<f32> = logits.par_chunks(v).map(log_sum_exp).collect();
        // Summed in order: the result does not depend on scheduling.
        let total: f64 = lse
            .iter()
            .zip(logits.chunks(v).zip(targets))
            .filter(|(_, (_, &t))| t != IGNORE)
            .map(|(lse, (row, &t))| (lse - row[t as usize]) as f64)
            .sum();
        // A second forward pass of the same operation keeps the first one's values (equal).
        let _ = self.lse.set(lse);
        Ok((
            CpuStorage::F32(vec![(total / counted(targets) as f64) as f32]),
            Shape::from(()),
        ))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let counted = counted(&targets.flatten_all()?.to_vec1::<u32>()?);
        let scale = grad.to_scalar::<f32>()? / counted as f32;
        let Some(lse) = self.lse.get() else {
            bail!("cross_entropy: the backward pass ran before the forward pass");
        };
        let grad_pass = CrossEntropyGrad {
            scale,
            lse: lse.clone(),
        };
        Ok((
            Some(logits.apply_op2_no_bwd(targets, &Pass(grad_pass))?),
            None,
        ))
    }
}

/// scale·(softmax(logits) − onehot(targets)), from each row's log Σ exp.
struct CrossEntropyGrad {
    scale: f32,
    lse: Vec<f32>,
}

impl GradPass for CrossEntropyGrad {
    const NAME: &'static str = "fused-cross-entropy-grad";
    type B = u32;

    fn run(&self, logits: &[f32], targets: &[u32], layout: &Layout) -> (Vec<f32>, Shape) {
        let v = layout.dims()[1];
        let out = filled(logits.len(), v, |r, o| {
            let (t, lse) = (targets[r], self.lse[r]);
            if t == IGNORE {
                return;
            }
            lanes::exp_affine(&logits[r * v..][..v], 1.0, lse, o);
            o.iter_mut().for_each(|o| *o *= self.scale);
            o[t as usize] -= self.scale;
        });
        (out, layout.shape().clone())
    }
}

/// A target that is not predicted: its row adds nothing to a cross-entropy, which is the mean
/// over the other rows (the prompt of an instruction, padding).
pub const IGNORE: u32 = u32::MAX;

/// The number of targets that count in a mean cross-entropy (at least 1, so that a batch of
/// ignored targets has loss 0).
pub fn counted(targets: &[u32]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE).count().max(1)
}

/// Mean next-token cross-entropy of `logits` (n, vocab) against `targets` (n, u32), over the
/// targets that are not [`IGNORE`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, vocab) = logits.dims2()?;
    if targets.dims1()? != n {
        bail!(
            "cross_entropy: {n} rows of logits but {} targets",
            targets.elem_count()
        );
    }
    if !fused_here(logits) {
        generic::check_targets(targets, vocab)?;
        return generic::cross_entropy(logits, targets);
    }
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropy::default())
}

/// Softmax over the last dimension of scale·x with a causal mask (query i sees keys ≤ i), for
/// scores of shape (..., t, t).
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "fused-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let t = l.dims()[l.dims().len() - 1];
        let out = filled(x.len(), t, |r, o| {
            let (o, row) = (&mut o[..r % t + 1], &x[r * t..][..r % t + 1]);
            let max = scaled_max(row, self.scale);
            let inv = 1.0 / lanes::exp_affine(row, self.scale, max, o);
            o.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        softmax_grad(y, dy, self.scale).map(Some)
    }
}

/// max(scale·row): scale·max(row) for scale ≥ 0 (rounding keeps the order, so the two are
/// equal), else a scan.
pub(crate) fn scaled_max(row: &[f32], scale: f32) -> f32 {
    if scale >= 0.0 {
        scale * lanes::max(row)
    } else {
        row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale))
    }
}

/// The gradient of softmax(scale·x) from its output `y` and the output's gradient `dy`.
fn softmax_grad(y: &Tensor, dy: &Tensor, scale: f32) -> Result<Tensor> {
    y.apply_op2_no_bwd(&dy.contiguous()?, &Pass(SoftmaxGrad { scale }))
}

/// dx = scale·y⊙(dy − Σ y⊙dy) per row.
struct SoftmaxGrad {
    scale: f32,
}

impl GradPass for SoftmaxGrad {
    type B = f32;
    const NAME: &'static str = "fused-softmax-grad";

    fn run(&self, y: &[f32], dy: &[f32], layout: &Layout) -> (Vec<f32>, Shape) {
        let t = layout.dims()[layout.dims().len() - 1];
        let out = map_row_pairs(y, dy, t, |o, y, dy| {
            let dot = lanes::dot(y, dy);
            for ((o, &y), &dy) in o.iter_mut().zip(y).zip(dy) {
                *o = self.scale * y * (dy - dot);
            }
        });
        (out, layout.shape().clone())
    }
}

/// Causal softmax of `scale·scores` over the last dimension; scores are (..., t, t).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    match scores.dims() {
        [.., q, k] if q == k => {}
        dims => bail!("causal_softmax: scores must be (..., t, t), got {dims:?}"),
    }
    if !fused_here(scores) {
        return generic::causal_softmax(scores, scale);
    }
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })
}

/// RMSNorm over the last dimension: y = x / sqrt(mean(x²) + eps) ⊙ w.
struct RmsNorm {
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = lanes::dot(row, row) / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s1, l1, self.name())?;
        let w = f32s(s2, l2, self.name())?;
        let d = w.len();
        let out = filled(x.len(), d, |i, o| {
            let row = &x[i * d..][..d];
            let r = inv_rms(row, self.eps);
            for ((o, &x), &w) in o.iter_mut().zip(row).zip(w) {
                *o = x * r * w;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let weights = w.to_vec1::<f32>()?;
        let dx = x.apply_op2_no_bwd(
            &dy,
            &Pass(RmsNormGradX {
                eps: self.eps,
                w: weights,
            }),
        )?;
        let dw = x.apply_op2_no_bwd(&dy, &Pass(RmsNormGradW { eps: self.eps }))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// dx = r·(w⊙dy) − r³·x·mean(x⊙w⊙dy) per row.
struct RmsNormGradX {
    eps: f32,
    w: Vec<f32>,
}

impl GradPass for RmsNormGradX {
    type B = f32;
    const NAME: &'static str = "fused-rms-norm-grad-x";

    fn run(&self, x: &[f32], dy: &[f32], layout: &Layout) -> (Vec<f32>, Shape) {
        let d = self.w.len();
        let out = map_row_pairs(x, dy, d, |o, x, dy| {
            let r = inv_rms(x, self.eps);
            let dot: f32 = x
                .iter()
                .zip(dy)
                .zip(&self.w)
                .map(|((x, dy), w)| x * dy * w)
                .sum::<f32>()
                / d as f32;
            let c = r * r * r * dot;
            for (((o, &x), &dy), &w) in o.iter_mut().zip(x).zip(dy).zip(&self.w) {
                *o = r * w * dy - c * x;
            }
        });
        (out, layout.shape().clone())
    }
}

/// dw = Σ_rows dy⊙x·r.
struct RmsNormGradW {
    eps: f32,
}

impl GradPass for RmsNormGradW {
    type B = f32;
    const NAME: &'static str = "fused-rms-norm-grad-w";

    fn run(&self, x: &[f32], dy: &[f32], layout: &Layout) -> (Vec<f32>, Shape) {
        let d = layout.dims()[layout.dims().len() - 1];
        let dw = sum_over_rows(x, dy, d, |acc, x, dy| {
            let r = inv_rms(x, self.eps);
            for ((a, &x), &dy) in acc.iter_mut().zip(x).zip(dy) {
                *a += dy * x * r;
            }
        });
        (dw, Shape::from(d))
    }
}

/// Σ over rows of `add(acc, x_row, dy_row)` for rows of `d` elements: partial sums over runs of
/// rows in parallel, combined in a fixed order so that results are reproducible.
fn sum_over_rows(
    x: &[f32],
    dy: &[f32],
    d: usize,
    add: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    let rows_per = (4096 / d).max(1);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(d * rows_per)
        .zip(dy.par_chunks(d * rows_per))
        .map(|(x, dy)| {
            let mut acc = vec![0f32; d];
            for (x, dy) in x.chunks(d).zip(dy.chunks(d)) {
                add(&mut acc, x, dy);
            }
            acc
        })
        .collect();
    sum_partials(partials, d)
}

/// The element-wise sum of per-chunk `partials` of `len` elements each, added in chunk order.
fn sum_partials(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut sum = vec![0f32; len];
    for p in partials {
        sum.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    sum
}

/// RMSNorm of `x` (..., d) with weight `w` (d).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if !fused_here(x) {
        return generic::rms_norm(x, w, eps);
    }
    x.contiguous()?.apply_op2(w, RmsNorm { eps: eps as f32 })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// A tensor of uniform values in [−2, 2), seeded.
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest absolute difference of two tensors.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn filled_chunks_start_zeroed_and_cover_the_buffer() {
        // 10 elements in chunks of 4: two whole chunks and a last one of 2.
        let (out, lens) = filled_chunks(10, 4, |i, c| {
            assert!(c.iter().all(|&v| v == 0.0), "chunk {i} not zeroed");
            c[0] = i as f32 + 1.0;
            c.len()
        });
        assert_eq!(out, [1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
        assert_eq!(lens, [4, 4, 2]);
        assert!(filled(0, 4, |_, _| unreachable!()).is_empty());
    }

    /// Fused forward and backward agree with candle's composed (differentiable) operations.
    #[test]
    fn fused_ops_match_composed_ops() {
        // Cross-entropy.
        let logits = Var::from_tensor(&randn(&[6, 11], 1)).unwrap();
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
        let a = cross_entropy(&logits, &targets).unwrap();
        let b = candle_nn::loss::cross_entropy(&logits, &targets).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let (ga, gb) = (
            (&a * 3.0).unwrap().backward().unwrap(),
            (&b * 3.0).unwrap().backward().unwrap(),
        );
        assert!(max_diff(ga.get(&logits).unwrap(), gb.get(&logits).unwrap()) < 1e-6);

        // Causal softmax.
        let t = 5;
        let x = Var::from_tensor(&randn(&[2, 3, t, t], 2)).unwrap();
        let mask = generic::causal_mask(t, &Device::Cpu).unwrap();
        let a = causal_softmax(&x, 0.7).unwrap();
        let b = candle_nn::ops::softmax(
            &(x.as_tensor() * 0.7).unwrap().broadcast_add(&mask).unwrap(),
            D::Minus1,
        )
        .unwrap();
        assert!(max_diff(&a, &b) < 1e-6);
        let w = randn(&[2, 3, t, t], 3);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-5);

        // RMSNorm.
        let x = Var::from_tensor(&randn(&[4, 3, 8], 4)).unwrap();
        let g = Var::from_tensor(&randn(&[8], 5)).unwrap();
        let a = rms_norm(&x, &g, 1e-6).unwrap();
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let inv = (ms + 1e-6).unwrap().sqrt().unwrap().recip().unwrap();
        let b = x.broadcast_mul(&inv).unwrap().broadcast_mul(&g).unwrap();
        assert!(max_diff(&a, &b) < 1e-5);
        let w = randn(&[4, 3, 8], 6);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-4);
        assert!(max_diff(ga.get(&g).unwrap(), gb.get(&g).unwrap()) < 1e-4);
    }

    #[test]
    fn cross_entropy_rejects_out_of_vocabulary_targets() {
        let logits = randn(&[2, 4], 7);
        let targets = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
        assert!(cross_entropy(&logits, &targets).is_err());
    }

    #[test]
    fn causal_softmax_needs_square_scores() {
        let err = causal_softmax(&randn(&[2, 3, 5], 8), 1.0).unwrap_err();
        assert!(err.to_string().contains("(..., t, t)"), "{err}");
        assert!(causal_softmax(&randn(&[5], 8), 1.0).is_err());
        let ok = causal_softmax(&randn(&[2, 4, 4], 8), 1.0).unwrap();
        // Row i of a causal softmax sums to one over keys 0..=i and is zero beyond.
        let rows = ok.to_vec3::<f32>().unwrap();
        for (i, row) in rows[1].iter().enumerate() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            assert!(row[i + 1..].iter().all(|&p| p == 0.0));
        }
        let bf16 = randn(&[4, 4], 9)
            .to_dtype(candle_core::DType::BF16)
            .unwrap();
        // Other dtypes take the generic path: the same mask, in bf16 precision.
        let low = causal_softmax(&bf16, 1.0).unwrap();
        assert_eq!(low.dtype(), candle_core::DType::BF16);
        let low = low
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in low.iter().enumerate() {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 2e-2, "{row:?}");
            assert!(row[i + 1..].iter().all(|&p| p == 0.0));
        }
    }
}
