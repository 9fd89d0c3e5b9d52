//! The scaled state-free rules (Fira, APOLLO). Inside a matrix subspace the state-full rule turns
//! the low-rank gradient down(G) into a direction D; the ratio ‖D‖/‖down(G)‖, per channel or per
//! tensor, says how much that rule rescales the gradient. The residual G − up(down(G)) (Fira) or
//! the whole gradient (APOLLO) is scaled by the same ratio, and a norm-growth limiter keeps the
//! scaled update's norm from growing faster than γ per step.
//!
//! Two details differ from the authors' code, on purpose. Fira's code subtracts α·up(down(G))
//! (GaLore's scale α) from G, so 1 − α of the projected gradient leaks into its "residual"; here
//! the residual is G − up(down(G)), as the paper writes it, and α scales only the subspace's
//! update (the `fira` preset's state-free rate is lr·α·(1/α) = lr). Both codes compute D without
//! bias correction and apply √(1−β₂ᵗ)/(1−β₁ᵗ) to the step; here D is the bias-corrected Adam
//! direction m̂/(√v̂ + ε), which differs only in where ε sits.

use crate::config::{OptimizerConfig, ScaleGranularity, StateFreeRule};
use crate::kernels::cpu as kernels;
use crate::projection::{Basis, Workspace};
use crate::rules::FullRule;
use rayon::prelude::*;

/// Where the scales vary over an m×n matrix (and over its low-rank image, whose unprojected side
/// is the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channels {
    /// One scale per row: the columns are projected (down(G) = G·Bᵀ).
    Rows,
    /// One scale per column: the rows are projected (down(G) = Aᵀ·G).
    Columns,
    /// One scale for the whole tensor.
    Tensor,
}

impl Channels {
    /// The channels of a basis: its unprojected side, or the tensor.
    pub fn of(basis: &Basis, granularity: ScaleGranularity) -> Self {
        match (granularity, &basis.left, &basis.right) {
            (ScaleGranularity::Tensor, _, _) => Channels::Tensor,
            (_, None, Some(_)) => Channels::Rows,
            (_, Some(_), None) => Channels::Columns,
            // Both sides projected: validation allows only the tensor scale.
            _ => Channels::Tensor,
        }
    }

    fn count(self, rows: usize, cols: usize) -> usize {
        match self {
            Channels::Rows => rows,
            Channels::Columns => cols,
            Channels::Tensor => 1,
        }
    }
}

/// Σ (x − minus)² per channel of a rows×cols matrix, in f64; `minus` may be empty (zero). The
/// sums run in a fixed order (rows in fixed groups, groups added in order), so the result does
/// not depend on how threads share the work.
pub fn channel_sq_norms(
    x: &[f32],
    minus: &[f32],
    (rows, cols): (usize, usize),
    ch: Channels,
) -> Vec<f64> {
    let count = ch.count(rows, cols);
    if rows * cols == 0 {
        return vec![0.0; count];
    }
    let sq = |i: usize, j: usize| -> f64 {
        let sub = if minus.is_empty() {
            0.0
        } else {
            minus[i * cols + j] as f64
        };
        (x[i * cols + j] as f64 - sub).powi(2)
    };
    if ch == Channels::Rows {
        return (0..rows)
            .into_par_iter()
            .map(|i| (0..cols).map(|j| sq(i, j)).sum())
            .collect();
    }
    let group = ((1 << 15) / cols).max(1);
    let partials: Vec<Vec<f64>> = (0..rows.div_ceil(group))
        .into_par_iter()
        .map(|k| {
            let mut acc = vec![0f64; count];
            for i in k * group..((k + 1) * group).min(rows) {
                match ch {
                    Channels::Columns => (0..cols).for_each(|j| acc[j] += sq(i, j)),
                    _ => acc[0] += (0..cols).map(|j| sq(i, j)).sum::<f64>(),
                }
            }
            acc
        })
        .collect();
    let mut total = vec![0f64; count];
    for p in partials {
        total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
    }
    total
}

/// Fira's norm-growth limiter: the factor (≤ 1) that keeps `norm` within γ times the previous
/// step's limited norm, which it then records. γ = 0 turns it off.
pub fn limit(norm: f64, previous: &mut Option<f32>, gamma: f64) -> f64 {
    if gamma == 0.0 {
        return 1.0;
    }
    let limiter = match *previous {
        Some(prev) => (norm / (prev as f64 + 1e-8)).max(gamma) / gamma,
        None => 1.0,
    };
    *previous = Some((norm / limiter) as f32);
    1.0 / limiter
}

/// Settings of one scaled step.
#[derive(Clone, Copy, Debug)]
pub struct Scaled {
    /// Scale the residual and add the subspace's update (Fira), or scale the whole gradient
    /// (APOLLO).
    pub residual: bool,
    pub granularity: ScaleGranularity,
    /// Norm-growth limiter γ (0: off).
    pub gamma: f64,
    /// Learning rate of the subspace's update.
    pub lr_full: f32,
    /// Learning rate of the scaled part.
    pub lr_free: f32,
    /// Weight-decay factor.
    pub keep: f32,
}

impl Scaled {
    /// The settings of this step's scaled update, when the configured state-free rule is a
    /// scaled one; `(lr_full, lr_free)` are the subspace's and the scaled part's rates, `keep`
    /// the weight-decay factor.
    pub fn configured(
        config: &OptimizerConfig,
        (lr_full, lr_free): (f64, f64),
        keep: f32,
    ) -> Option<Self> {
        scales_residual(config.state_free).map(|residual| Scaled {
            residual,
            granularity: config.scale_granularity,
            gamma: config.norm_growth_limit,
            lr_full: lr_full as f32,
            lr_free: lr_free as f32,
            keep,
        })
    }
}

/// Whether `rule` is a scaled rule, and if so whether it scales the residual (Fira) rather than the
/// whole gradient (APOLLO).
pub fn scales_residual(rule: StateFreeRule) -> Option<bool> {
    match rule {
        StateFreeRule::ScaledResidual => Some(true),
        StateFreeRule::ScaledGradient => Some(false),
        _ => None,
    }
}

/// One scaled step of weight `w` (m×n) with gradient `g` in `basis`. `unit` is the state-full
/// rule at learning rate 1 (its update is −D); `m`, `v` its moments; `previous` the limiter's
/// record.
#[allow(clippy::too_many_arguments)]
pub fn step<R: FullRule>(
    s: Scaled,
    basis: &Basis,
    (w, g): (&mut [f32], &[f32]),
    (m, v): (&mut [f32], &mut [f32]),
    unit: R,
    previous: &mut Option<f32>,
    buf: &mut Workspace,
) {
    let (rows, cols) = basis.low_shape();
    let shape = (basis.m, basis.n);
    let ch = Channels::of(basis, s.granularity);
    let Workspace {
        low,
        up_u,
        projected_g,
        tmp,
    } = buf;
    low.resize(rows * cols, 0.0);
    basis.down(g, low, tmp);
    let grad_norms = channel_sq_norms(low, &[], (rows, cols), ch);
    if s.residual {
        projected_g.resize(w.len(), 0.0);
        basis.up(low, projected_g, tmp);
    }
    kernels::full_in_place(low, m, v, unit);
    let dir_norms = channel_sq_norms(low, &[], (rows, cols), ch);
    let ratios: Vec<f64> = dir_norms
        .iter()
        .zip(&grad_norms)
        .map(|(d, r)| d.sqrt() / (r.sqrt() + 1e-8))
        .collect();
    let (up_u, projected): (&[f32], &[f32]) = if s.residual {
        low.iter_mut().for_each(|x| *x *= s.lr_full);
        up_u.resize(w.len(), 0.0);
        basis.up(low, up_u, tmp);
        (up_u, projected_g)
    } else {
        (&[], &[])
    };
    let scaled_norm = channel_sq_norms(g, projected, shape, ch)
        .iter()
        .zip(&ratios)
        .map(|(r2, s)| s * s * r2)
        .sum::<f64>()
        .sqrt();
    let factor = limit(scaled_norm, previous, s.gamma);
    let coefficients: Vec<f32> = ratios
        .iter()
        .map(|r| -(s.lr_free as f64 * r * factor) as f32)
        .collect();
    kernels::scaled(w, g, up_u, projected, &coefficients, ch, shape.1, s.keep);
}
