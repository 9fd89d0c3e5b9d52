//! Projections: how a projectable gradient is split into a low-dimensional part (state-full)
//! and a residual (state-free). A [`Subspace`] is the current choice for one tensor.

pub mod basis;
pub mod blocks;
mod device_sketch;
pub mod randomized;
pub mod selection;

pub use basis::Basis;
pub use blocks::{assign_blocks, BlockSchedule};
pub use randomized::Sketch;
pub use selection::{Axis, Selection};

use crate::config::{
    round_half_even, CoordinateAxis, OneSide, ProjSide, Projection, RandomBasis, SvdSolver,
};
use crate::error::Result;
use crate::labels::ParamInfo;
use rand::Rng;

/// Reusable scratch buffers of the matrix projections (not optimizer state: sized by the largest
/// tensor, kept between steps only to avoid re-allocation).
#[derive(Default)]
pub struct Workspace {
    /// down(G), then the low-rank update.
    pub low: Vec<f32>,
    /// up(low-rank update).
    pub up_u: Vec<f32>,
    /// up(down(G)).
    pub projected_g: Vec<f32>,
    /// Intermediate of two-sided bases.
    pub tmp: Vec<f32>,
}

impl Workspace {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        4 * (self.low.capacity()
            + self.up_u.capacity()
            + self.projected_g.capacity()
            + self.tmp.capacity())
    }
}

/// The current subspace of one parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Subspace {
    /// The whole tensor is state-full (always-state-full parameters, active blocks).
    All,
    /// The whole tensor is state-free (inactive blocks, zero rank).
    Nothing,
    /// A coordinate subset (columns, rows, random entries, randperm).
    Coords(Selection),
    /// An orthonormal matrix projection (svd, random).
    Basis(Basis),
}

impl Subspace {
    /// Elements per moment buffer for a tensor of `numel` elements.
    pub fn state_len(&self, numel: usize) -> usize {
        match self {
            Subspace::All => numel,
            Subspace::Nothing => 0,
            Subspace::Coords(s) => s.count(),
            Subspace::Basis(b) => {
                let (r, c) = b.low_shape();
                r * c
            }
        }
    }

    /// Bytes of projection matrices held.
    pub fn projection_bytes(&self) -> usize {
        match self {
            Subspace::Basis(b) => b.numel() * 4,
            _ => 0,
        }
    }

    /// Bytes of coordinate indices held.
    pub fn index_bytes(&self) -> usize {
        match self {
            Subspace::Coords(s) => s.idx.len() * 4,
            _ => 0,
        }
    }
}

/// How many basis vectors a matrix projection keeps on a side of dimension `dim`: round(dim·ρ),
/// or the fixed `rank` (at most `dim`) when it is set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankRule {
    pub density: f64,
    /// Fixed rank; 0 uses the density.
    pub rank: usize,
}

impl RankRule {
    /// round(dim·ρ) on every side.
    pub fn from_density(density: f64) -> Self {
        RankRule { density, rank: 0 }
    }

    fn of(self, dim: usize) -> usize {
        if self.rank > 0 {
            self.rank.min(dim)
        } else {
            round_half_even(dim as f64 * self.density)
        }
    }
}

/// Ranks (left, right) of a matrix projection of an m×n matrix.
pub fn matrix_ranks(
    side: ProjSide,
    m: usize,
    n: usize,
    ranks: RankRule,
) -> (Option<usize>, Option<usize>) {
    let left = || Some(ranks.of(m));
    let right = || Some(ranks.of(n));
    match side {
        ProjSide::Std if m >= n => (None, right()),
        ProjSide::Std => (left(), None),
        ProjSide::ReverseStd if m >= n => (left(), None),
        ProjSide::ReverseStd => (None, right()),
        ProjSide::Left => (left(), None),
        ProjSide::Right => (None, right()),
        ProjSide::Full => (left(), right()),
    }
}

/// Number of indices a coordinate projection keeps: int(N·ρ) columns / rows / entries.
pub fn coordinate_count(axis: CoordinateAxis, m: usize, n: usize, density: f64) -> usize {
    let total = match axis {
        CoordinateAxis::Columns => n,
        CoordinateAxis::Rows => m,
        CoordinateAxis::RandK => m * n,
    };
    (total as f64 * density).floor() as usize
}

fn random_selection(axis: Axis, count: usize, m: usize, n: usize, rng: &mut impl Rng) -> Subspace {
    let total = match axis {
        Axis::Columns => n,
        Axis::Rows => m,
        Axis::Entries => m * n,
    };
    if count == 0 {
        return Subspace::Nothing;
    }
    if count >= total {
        return Subspace::All;
    }
    let idx = rand::seq::index::sample(rng, total, count)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    Subspace::Coords(Selection::new(axis, idx, m, n))
}

/// A projection chosen tensor by tensor from its gradient (every projection but blocks, which
/// are scheduled for all tensors at once by [`BlockSchedule`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorSplit {
    /// Top singular subspace of the gradient, exact or randomized.
    Svd(ProjSide, Option<Sketch>),
    /// Random factors, semi-orthogonal or Gaussian.
    Random(ProjSide, RandomBasis),
    /// Random rows or columns.
    RandPerm(OneSide),
    /// Random columns, rows or entries.
    Coordinates(CoordinateAxis),
}

impl Projection {
    /// The per-tensor form of this projection; `None` for blocks.
    pub fn per_tensor(&self) -> Option<TensorSplit> {
        match *self {
            Projection::Svd {
                proj_side,
                svd_solver,
                oversample,
                power_iters,
            } => Some(TensorSplit::Svd(
                proj_side,
                (svd_solver == SvdSolver::Randomized).then_some(Sketch {
                    oversample,
                    power_iters,
                }),
            )),
            Projection::Random {
                proj_side,
                random_basis,
            } => Some(TensorSplit::Random(proj_side, random_basis)),
            Projection::RandPerm { proj_side } => Some(TensorSplit::RandPerm(proj_side)),
            Projection::Coordinates { coordinates } => Some(TensorSplit::Coordinates(coordinates)),
            Projection::Blocks { .. } => None,
        }
    }
}

/// The axis and count of a one-sided (randperm) selection of an m×n matrix: rows on the left,
/// columns on the right, round(dim·ρ) of them.
pub fn one_side_rank(side: OneSide, m: usize, n: usize, density: f64) -> (Axis, usize) {
    let rows = match side {
        OneSide::Left => true,
        OneSide::Right => false,
        OneSide::Std => m < n,
        OneSide::ReverseStd => m >= n,
    };
    if rows {
        (Axis::Rows, round_half_even(m as f64 * density))
    } else {
        (Axis::Columns, round_half_even(n as f64 * density))
    }
}

/// Chooses a new subspace for one projectable tensor without looking at its gradient: every
/// split but the SVD, which returns `None` (see [`choose_svd`]).
pub fn choose_blind(
    split: TensorSplit,
    ranks: RankRule,
    info: &ParamInfo,
    rng: &mut impl Rng,
) -> Option<Subspace> {
    let (m, n) = info.matrix_dims();
    let density = ranks.density;
    Some(match split {
        TensorSplit::Coordinates(axis) => {
            let count = coordinate_count(axis, m, n, density);
            let axis = match axis {
                CoordinateAxis::Columns => Axis::Columns,
                CoordinateAxis::Rows => Axis::Rows,
                CoordinateAxis::RandK => Axis::Entries,
            };
            random_selection(axis, count, m, n, rng)
        }
        TensorSplit::RandPerm(side) => {
            let (axis, count) = one_side_rank(side, m, n, density);
            random_selection(axis, count, m, n, rng)
        }
        TensorSplit::Random(side, kind) => {
            let (l, r) = matrix_ranks(side, m, n, ranks);
            if l == Some(0) || r == Some(0) {
                return Some(Subspace::Nothing);
            }
            Subspace::Basis(match kind {
                RandomBasis::Gaussian => Basis::gaussian(m, n, l, r, rng),
                _ => Basis::random(m, n, l, r, rng),
            })
        }
        TensorSplit::Svd(..) => return None,
    })
}

/// [`choose_svd`] for a gradient (m×n) on its device: the randomized solver's products run there;
/// the exact SVD runs on the host, from a copy.
pub fn choose_svd_on_device(
    (side, sketch): (ProjSide, Option<Sketch>),
    ranks: RankRule,
    info: &ParamInfo,
    g: &candle_core::Tensor,
    previous: &Subspace,
    rng: &mut impl Rng,
) -> Result<Subspace> {
    let Some(sketch) = sketch else {
        let host = g.flatten_all()?.to_vec1::<f32>()?;
        return choose_svd((side, None), ranks, info, &host, previous, rng);
    };
    let (m, n) = info.matrix_dims();
    let (l, r) = matrix_ranks(side, m, n, ranks);
    if l == Some(0) || r == Some(0) {
        return Ok(Subspace::Nothing);
    }
    let warm = match previous {
        Subspace::Basis(b) => Some(b),
        _ => None,
    };
    Ok(Subspace::Basis(Basis::randomized_svd_on_device(
        g,
        (l, r),
        sketch,
        warm,
        rng,
        &info.name,
    )?))
}

/// Chooses the top singular subspace of the gradient `g` of one projectable tensor, exact or
/// randomized (`sketch`); the randomized solver starts from `previous`, the current subspace.
pub fn choose_svd(
    (side, sketch): (ProjSide, Option<Sketch>),
    ranks: RankRule,
    info: &ParamInfo,
    g: &[f32],
    previous: &Subspace,
    rng: &mut impl Rng,
) -> Result<Subspace> {
    let (m, n) = info.matrix_dims();
    let (l, r) = matrix_ranks(side, m, n, ranks);
    if l == Some(0) || r == Some(0) {
        return Ok(Subspace::Nothing);
    }
    Ok(Subspace::Basis(match sketch {
        None => Basis::svd(g, m, n, l, r, &info.name)?,
        Some(sketch) => {
            let warm = match previous {
                Subspace::Basis(b) => Some(b),
                _ => None,
            };
            Basis::randomized_svd(g, (m, n), (l, r), sketch, warm, rng, &info.name)?
        }
    }))
}
