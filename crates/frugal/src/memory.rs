//! Memory accounting: bytes of optimizer state, held or planned, by kind and by parameter class.

use crate::config::{CoordinateAxis, OptimizerConfig, ProjectionKind};
use crate::error::Result;
use crate::params::{classify, ParamClass, ParamInfo};
use crate::projection::{assign_blocks, coordinate_count, matrix_ranks, BlockSchedule};
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
fn planned(config: &OptimizerConfig, info: &ParamInfo, active_block: bool) -> StateBytes {
    let buffers = moment_slots(config.state_full);
    let moments = |elems: usize| 4 * buffers * elems;
    let numel = info.numel();
    if info.class != ParamClass::Projectable {
        return StateBytes {
            moments: moments(numel),
            ..Default::default()
        };
    }
    let (m, n) = info.matrix_dims();
    let coords = |count: usize, total: usize, per_index: usize| match count {
        0 => StateBytes::default(),
        c if c >= total => StateBytes {
            moments: moments(numel),
            ..Default::default()
        },
        c => StateBytes {
            moments: moments(c * per_index),
            projections: 0,
            indices: 4 * c,
        },
    };
    match config.projection {
        ProjectionKind::Blocks if active_block => StateBytes {
            moments: moments(numel),
            ..Default::default()
        },
        ProjectionKind::Blocks => StateBytes::default(),
        ProjectionKind::Coordinates => {
            let count = coordinate_count(config.coordinates, m, n, config.density);
            match config.coordinates {
                CoordinateAxis::Columns => coords(count, n, m),
                CoordinateAxis::Rows => coords(count, m, n),
                CoordinateAxis::RandK => coords(count, m * n, 1),
            }
        }
        ProjectionKind::RandPerm => match matrix_ranks(config.proj_side, m, n, config.density) {
            (Some(r), _) => coords(r, m, n),
            (None, Some(r)) => coords(r, n, m),
            (None, None) => StateBytes::default(),
        },
        ProjectionKind::Svd | ProjectionKind::Random => {
            let (l, r) = matrix_ranks(config.proj_side, m, n, config.density);
            if l == Some(0) || r == Some(0) {
                return StateBytes::default();
            }
            let rows = l.unwrap_or(m);
            let cols = r.unwrap_or(n);
            StateBytes {
                moments: moments(rows * cols),
                projections: 4 * (l.map_or(0, |l| l * m) + r.map_or(0, |r| r * n)),
                indices: 0,
            }
        }
    }
}

/// State each parameter will hold after the first step, computed from shapes alone (no
/// allocation), in model order. Equals [`crate::Frugal::state_bytes`] after the first step.
pub fn plan(
    config: &OptimizerConfig,
    shapes: &[(String, Vec<usize>)],
) -> Result<Vec<(ParamInfo, StateBytes)>> {
    config.validate()?;
    let infos = classify(shapes, config)?;
    let (blocks, count) = assign_blocks(&infos, config.block_unit);
    let active = if config.projection == ProjectionKind::Blocks {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        BlockSchedule::for_config(config, count).next(&mut rng)
    } else {
        Vec::new()
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

/// Sums planned state by class: (always state-full incl. other, projectable).
pub fn by_class(plan: &[(ParamInfo, StateBytes)]) -> (StateBytes, StateBytes) {
    let mut full = StateBytes::default();
    let mut proj = StateBytes::default();
    for (info, b) in plan {
        if info.class == ParamClass::Projectable {
            proj += *b;
        } else {
            full += *b;
        }
    }
    (full, proj)
}
