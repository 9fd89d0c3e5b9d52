//! Memory accounting: bytes of optimizer state, held or planned, by kind and by parameter role.

use crate::config::{CoordinateAxis, MomentStorage, OptimizerConfig, Projection};
use crate::error::Result;
use crate::labels::{resolve, ParamInfo, ParamShape, Role};
use crate::projection::{
    assign_blocks, coordinate_count, matrix_ranks, one_side_rank, Axis, BlockSchedule,
};
use crate::quant::Packed;
use crate::rules::moment_slots;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::ops::AddAssign;

/// Bytes of optimizer state by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateBytes {
    /// Moment buffers (m, v).
    pub moments: usize,
    /// Projection matrices (svd, random).
    pub projections: usize,
    /// Coordinate indices (columns, rows, entries, randperm).
    pub indices: usize,
}

impl StateBytes {
    /// All state bytes together.
    pub fn total(&self) -> usize {
        self.moments + self.projections + self.indices
    }
}

impl AddAssign for StateBytes {
    fn add_assign(&mut self, o: Self) {
        self.moments += o.moments;
        self.projections += o.projections;
        self.indices += o.indices;
    }
}

/// State bytes of one parameter once its subspace is chosen.
pub(crate) fn planned(
    config: &OptimizerConfig,
    info: &ParamInfo,
    active_block: bool,
) -> StateBytes {
    let buffers = moment_slots(config.state_full);
    let moments = |elems: usize| match config.moment_storage {
        MomentStorage::F32 => 4 * buffers * elems,
        MomentStorage::Bits8 => buffers * Packed::bytes_for(elems),
    };
    let numel = info.numel();
    let whole = StateBytes {
        moments: moments(numel),
        ..Default::default()
    };
    match info.role {
        Role::StateFull => return whole,
        Role::StateFree => return StateBytes::default(),
        Role::Projectable => {}
    }
    let (m, n) = info.matrix_dims();
    let coords = |count: usize, total: usize, per_index: usize| match count {
        0 => StateBytes::default(),
        c if c >= total => whole,
        c => StateBytes {
            moments: moments(c * per_index),
            projections: 0,
            indices: 4 * c,
        },
    };
    match config.projection {
        Projection::Blocks { .. } if active_block => whole,
        Projection::Blocks { .. } => StateBytes::default(),
        Projection::Coordinates { coordinates } => {
            let count = coordinate_count(coordinates, m, n, config.density);
            match coordinates {
                CoordinateAxis::Columns => coords(count, n, m),
                CoordinateAxis::Rows => coords(count, m, n),
                CoordinateAxis::RandK => coords(count, m * n, 1),
            }
        }
        Projection::RandPerm { proj_side } => {
            match one_side_rank(proj_side, m, n, config.density) {
                (Axis::Rows, r) => coords(r, m, n),
                (_, r) => coords(r, n, m),
            }
        }
        Projection::Svd { proj_side, .. } | Projection::Random { proj_side, .. } => {
            let (l, r) = matrix_ranks(proj_side, m, n, config.rank_rule(0));
            if l == Some(0) || r == Some(0) {
                return StateBytes::default();
            }
            let rows = l.unwrap_or(m);
            let cols = r.unwrap_or(n);
            // The norm-growth limiter keeps one number per tensor.
            let limiter = crate::rules::scaled::scales_residual(config.state_free).is_some()
                && config.norm_growth_limit > 0.0;
            StateBytes {
                moments: moments(rows * cols) + if limiter { 4 } else { 0 },
                projections: 4 * (l.map_or(0, |l| l * m) + r.map_or(0, |r| r * n)),
                indices: 0,
            }
        }
    }
}

/// The parameters of `params` as `config` routes them (the configuration checked first).
pub(crate) fn resolve_shapes(
    config: &OptimizerConfig,
    params: &[ParamShape],
) -> Result<Vec<ParamInfo>> {
    config.validate()?;
    resolve(
        params
            .iter()
            .map(|p| (p.name.as_str(), p.shape.as_slice(), p.label)),
        config,
    )
}

/// State each parameter will hold after the first step, computed from shapes alone (no
/// allocation), in the given order. Equals [`crate::Frugal::state_bytes`] after the first step.
pub fn plan(
    config: &OptimizerConfig,
    params: &[ParamShape],
) -> Result<Vec<(ParamInfo, StateBytes)>> {
    let infos = resolve_shapes(config, params)?;
    let (blocks, active) = match config.blocks() {
        Some((order, unit)) => {
            let (blocks, count) = assign_blocks(&infos, unit);
            let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
            let active = BlockSchedule::for_config(order, config.density, count).next(&mut rng);
            (blocks, active)
        }
        None => (vec![None; infos.len()], Vec::new()),
    };
    Ok(infos
        .into_iter()
        .zip(blocks)
        .map(|(info, block)| {
            let is_active = block.is_some_and(|b| active.binary_search(&b).is_ok());
            let bytes = planned(config, &info, is_active);
            (info, bytes)
        })
        .collect())
}

/// Sums planned state by role: (always state-full, projectable); state-free tensors hold none.
pub fn by_role(plan: &[(ParamInfo, StateBytes)]) -> (StateBytes, StateBytes) {
    let mut full = StateBytes::default();
    let mut proj = StateBytes::default();
    for (info, b) in plan {
        match info.role {
            Role::Projectable | Role::StateFree => proj += *b,
            Role::StateFull => full += *b,
        }
    }
    (full, proj)
}
