//! The step made of candle tensor operations: the updates of the fused CPU passes in
//! [`super::cpu`], for parameters on any device (CUDA: cuBLAS matrix products, element-wise
//! kernels). Moments and subspaces live on the parameter's device; only the subspace choices
//! (SVDs, random draws) and the norm-growth limiter's scalar go through the host.

use crate::projection::{Axis, Basis, Selection, Subspace};
use crate::rules::scaled::{limit, Channels, Scaled};
use crate::rules::{Free, Full};
use candle_core::{DType, Device, Result, Tensor, Var};

/// A subspace's index or projection tensors on the parameter's device (rebuilt whenever the
/// subspace changes).
pub(crate) enum DeviceSubspace {
    /// Sorted coordinate indices (u32) and what they index; for whole columns or rows, the
    /// mask of the others (1 × n or m × 1: 1 where the state-free rule applies).
    Coords {
        idx: Tensor,
        axis: Axis,
        unchosen: Option<Tensor>,
    },
    /// A (m×r) and B (r×n), when present.
    Basis {
        left: Option<Tensor>,
        right: Option<Tensor>,
    },
}

impl DeviceSubspace {
    /// The device tensors of `sub` (none for whole-tensor subspaces).
    pub fn of(sub: &Subspace, device: &Device) -> Result<Option<Self>> {
        Ok(match sub {
            Subspace::All | Subspace::Nothing => None,
            Subspace::Coords(Selection { axis, idx, m, n }) => {
                let shape = match axis {
                    Axis::Columns => Some((1, *n)),
                    Axis::Rows => Some((*m, 1)),
                    Axis::Entries => None,
                };
                let idx = Tensor::from_slice(idx, idx.len(), device)?;
                let unchosen = shape.map(|shape| unchosen_mask(&idx, shape)).transpose()?;
                Some(DeviceSubspace::Coords {
                    idx,
                    axis: *axis,
                    unchosen,
                })
            }
            Subspace::Basis(b) => {
                let factor = |f: &Option<(Vec<f32>, usize)>, rows_first: bool| {
                    f.as_ref()
                        .map(|(data, r)| {
                            let shape = if rows_first { (b.m, *r) } else { (*r, b.n) };
                            Tensor::from_slice(data, shape, device)
                        })
                        .transpose()
                };
                Some(DeviceSubspace::Basis {
                    left: factor(&b.left, true)?,
                    right: factor(&b.right, false)?,
                })
            }
        })
    }
}

/// Moments on the device (those the rule keeps).
pub(crate) type Moments<'a> = (&'a mut Option<Tensor>, &'a mut Option<Tensor>);

/// down(G) = Aᵀ·G·Bᵀ (each factor when present).
fn down(left: &Option<Tensor>, right: &Option<Tensor>, g: &Tensor) -> Result<Tensor> {
    let x = match left {
        Some(a) => a.t()?.matmul(g)?,
        None => g.clone(),
    };
    match right {
        Some(b) => x.matmul(&b.t()?),
        None => Ok(x),
    }
}

/// up(X) = A·X·B (each factor when present).
fn up(left: &Option<Tensor>, right: &Option<Tensor>, x: &Tensor) -> Result<Tensor> {
    let x = match left {
        Some(a) => a.matmul(x)?,
        None => x.clone(),
    };
    match right {
        Some(b) => x.matmul(b),
        None => Ok(x),
    }
}

/// The state-full rule on a tensor of any shape (moments are flat).
fn full_of(full: Full, x: &Tensor, (m, v): Moments) -> Result<Tensor> {
    full.apply_tensor(&x.flatten_all()?, m, v)?
        .reshape(x.shape())
}

/// 1 where `idx` (u32 positions in a flat run of rows·cols) does not point, 0 where it does,
/// shaped rows × cols.
fn unchosen_mask(idx: &Tensor, (rows, cols): (usize, usize)) -> Result<Tensor> {
    let device = idx.device();
    let ones = Tensor::ones(idx.elem_count(), DType::F32, device)?;
    Tensor::zeros(rows * cols, DType::F32, device)?
        .index_add(idx, &ones, 0)?
        .affine(-1.0, 1.0)?
        .reshape((rows, cols))
}

/// w ← keep·w + update.
fn write(w: &Var, keep: f32, update: Option<Tensor>) -> Result<()> {
    let decayed = if keep == 1.0 {
        w.as_tensor().clone()
    } else {
        (w.as_tensor() * keep as f64)?
    };
    match update {
        Some(u) => w.set(&(decayed + u.reshape(w.shape())?)?),
        None if keep == 1.0 => Ok(()),
        None => w.set(&decayed),
    }
}

/// Everything one parameter's step needs besides its weight and gradient.
pub(crate) struct Rules {
    pub full: Full,
    pub free: Free,
    pub keep: f32,
}

/// One step of weight `w` with gradient `g` in subspace `sub` (its device tensors in `dev`).
pub(crate) fn step(
    (w, g): (&Var, &Tensor),
    (sub, dev): (&Subspace, Option<&DeviceSubspace>),
    moments: Moments,
    rules: Rules,
) -> Result<()> {
    let Rules { full, free, keep } = rules;
    match (sub, dev) {
        (Subspace::All, _) => write(w, keep, Some(full_of(full, g, moments)?)),
        (Subspace::Nothing, _) => write(w, keep, free.apply_tensor(g)?),
        (
            Subspace::Coords(sel),
            Some(DeviceSubspace::Coords {
                idx,
                axis,
                unchosen,
            }),
        ) => {
            let (m, n) = (sel.m, sel.n);
            let (g, dim) = match axis {
                Axis::Columns => (g.reshape((m, n))?, 1),
                Axis::Rows => (g.reshape((m, n))?, 0),
                Axis::Entries => (g.flatten_all()?, 0),
            };
            let chosen = g.index_select(idx, dim)?;
            let u = full_of(full, &chosen, moments)?;
            let rest = match free.apply_tensor(&g)? {
                // Single entries: the mask would be as large as the weight, so it is built
                // for the step rather than kept.
                Some(f) => match unchosen {
                    Some(mask) => f.broadcast_mul(mask)?,
                    None => f.mul(&unchosen_mask(idx, (m * n, 1))?.flatten_all()?)?,
                },
                None => g.zeros_like()?,
            };
            write(w, keep, Some(rest.index_add(idx, &u, dim)?))
        }
        (Subspace::Basis(b), Some(DeviceSubspace::Basis { left, right })) => {
            let g = g.reshape((b.m, b.n))?;
            let low = down(left, right, &g)?;
            let residual_update = if matches!(free, Free::None(_)) {
                None
            } else {
                free.apply_tensor(&(&g - up(left, right, &low)?)?)?
            };
            let u = up(left, right, &full_of(full, &low, moments)?)?;
            let update = match residual_update {
                Some(r) => (u + r)?,
                None => u,
            };
            write(w, keep, Some(update))
        }
        _ => candle_core::bail!("the subspace's device tensors are missing"),
    }
}

/// Σ x² per channel of a rows×cols matrix, shaped to broadcast over it.
fn channel_sq_norms(x: &Tensor, ch: Channels) -> Result<Tensor> {
    let sq = x.sqr()?;
    match ch {
        Channels::Rows => sq.sum_keepdim(1),
        Channels::Columns => sq.sum_keepdim(0),
        Channels::Tensor => sq.sum_all()?.reshape((1, 1)),
    }
}

/// One scaled (Fira, APOLLO) step: see [`crate::rules::scaled::step`], whose arithmetic this
/// repeats on tensors. `unit` is the state-full rule at learning rate 1.
pub(crate) fn scaled_step(
    s: Scaled,
    (w, g): (&Var, &Tensor),
    (basis, dev): (&Basis, Option<&DeviceSubspace>),
    moments: Moments,
    unit: Full,
    previous: &mut Option<f32>,
) -> Result<()> {
    let Some(DeviceSubspace::Basis { left, right }) = dev else {
        candle_core::bail!("the subspace's device tensors are missing");
    };
    let ch = Channels::of(basis, s.granularity);
    let g = g.reshape((basis.m, basis.n))?;
    let low = down(left, right, &g)?;
    let grad_norms = channel_sq_norms(&low, ch)?;
    let direction = full_of(unit, &low, moments)?;
    let ratios = (channel_sq_norms(&direction, ch)?.sqrt()? / (grad_norms.sqrt()? + 1e-8)?)?;
    let (subspace_update, residual) = if s.residual {
        let u = up(left, right, &(direction * s.lr_full as f64)?)?;
        (Some(u), (&g - up(left, right, &low)?)?)
    } else {
        (None, g.clone())
    };
    let scaled_norm: f32 = (channel_sq_norms(&residual, ch)? * ratios.sqr()?)?
        .sum_all()?
        .sqrt()?
        .to_scalar()?;
    let factor = limit(scaled_norm as f64, previous, s.gamma);
    let coefficients = (ratios * -(s.lr_free as f64 * factor))?;
    let scaled = residual.broadcast_mul(&coefficients)?;
    let update = match subspace_update {
        Some(u) => (u + scaled)?,
        None => scaled,
    };
    write(w, s.keep, Some(update))
}

/// The position of the first tensor holding a non-finite value, from one transfer per device:
/// 0·g sums to zero where every value is finite and to NaN where one is not (a sum of zeros
/// cannot overflow).
pub(crate) fn first_non_finite<'a>(gs: impl Iterator<Item = &'a Tensor>) -> Result<Option<usize>> {
    let sums = gs
        .map(|g| (g * 0.0)?.to_dtype(DType::F32)?.sum_all())
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = sums.first() else {
        return Ok(None);
    };
    let flags: Vec<f32> = if sums.iter().all(|s| s.device().same_device(first.device())) {
        Tensor::stack(&sums, 0)?.to_vec1()?
    } else {
        sums.iter().map(|s| s.to_scalar()).collect::<Result<_>>()?
    };
    Ok(flags.iter().position(|&s| s != 0.0))
}
