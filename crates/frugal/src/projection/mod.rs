//! Projections: how a projectable gradient is split into a low-dimensional part (state-full)
//! and a residual (state-free). A [`Subspace`] is the current choice for one tensor.

pub mod basis;
pub mod blocks;
pub mod selection;

pub use basis::Basis;
pub use blocks::{assign_blocks, BlockSchedule};
pub use selection::{Axis, Selection};

use crate::config::{round_half_even, CoordinateAxis, OneSide, ProjSide, Projection};
use crate::error::Result;
use crate::labels::ParamInfo;
use rand::Rng;

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

/// Ranks (left, right) of a matrix projection of an m×n matrix.
pub fn matrix_ranks(
    side: ProjSide,
    m: usize,
    n: usize,
    density: f64,
) -> (Option<usize>, Option<usize>) {
    let left = || Some(round_half_even(m as f64 * density));
    let right = || Some(round_half_even(n as f64 * density));
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
    /// Top singular subspace of the gradient.
    Svd(ProjSide),
    /// Random semi-orthogonal factors.
    Random(ProjSide),
    /// Random rows or columns.
    RandPerm(OneSide),
    /// Random columns, rows or entries.
    Coordinates(CoordinateAxis),
}

impl Projection {
    /// The per-tensor form of this projection; `None` for blocks.
    pub fn per_tensor(&self) -> Option<TensorSplit> {
        match *self {
            Projection::Svd { proj_side } => Some(TensorSplit::Svd(proj_side)),
            Projection::Random { proj_side } => Some(TensorSplit::Random(proj_side)),
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

/// Chooses a new subspace for one projectable tensor from its current gradient `g`.
pub fn choose(
    split: TensorSplit,
    density: f64,
    info: &ParamInfo,
    g: &[f32],
    rng: &mut impl Rng,
) -> Result<Subspace> {
    let (m, n) = info.matrix_dims();
    Ok(match split {
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
        TensorSplit::Svd(side) | TensorSplit::Random(side) => {
            let (l, r) = matrix_ranks(side, m, n, density);
            if l == Some(0) || r == Some(0) {
                Subspace::Nothing
            } else if matches!(split, TensorSplit::Svd(_)) {
                Subspace::Basis(Basis::svd(g, m, n, l, r, &info.name)?)
            } else {
                Subspace::Basis(Basis::random(m, n, l, r, rng))
            }
        }
    })
}
