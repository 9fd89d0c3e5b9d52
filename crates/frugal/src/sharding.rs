//! Sharding the optimizer's state over data-parallel ranks (ZeRO-1 style, see
//! [`crate::Frugal::shard`]): which rank keeps the state of, and updates, each parameter, or
//! each range of a large state-full parameter.

use crate::config::OptimizerConfig;
use crate::error::{Error, Result};
use crate::labels::{ParamInfo, ParamShape, Role};
use crate::memory::{planned, resolve_shapes, StateBytes};
use std::ops::Range;

/// Pieces of a split parameter start at multiples of this many elements: whole blocks of 8-bit
/// moments, so a piece's moments are those of the whole tensor, bit for bit.
pub const PIECE: usize = 1 << 16;

/// A range of a parameter's elements (flat, row-major) and the rank that owns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub rank: usize,
    pub range: Range<usize>,
}

/// Where every parameter's state lives over `world` ranks: per parameter (in model order) its
/// pieces, in element order, which cover it. Most parameters are one piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardPlan {
    world: usize,
    pieces: Vec<Vec<Piece>>,
}

impl ShardPlan {
    /// Whole parameters: parameter i of `numels[i]` elements belongs to rank `owners[i]`.
    pub fn whole(owners: &[usize], numels: &[usize], world: usize) -> Self {
        let pieces = owners
            .iter()
            .zip(numels)
            .map(|(&rank, &n)| vec![Piece { rank, range: 0..n }])
            .collect();
        ShardPlan { world, pieces }
    }

    /// A plan of the given pieces: per parameter, pieces in element order from 0, each
    /// starting where the one before ends, at a multiple of [`PIECE`], and owned by one of
    /// `world` ranks.
    pub fn new(world: usize, pieces: Vec<Vec<Piece>>) -> Result<Self> {
        for (i, ps) in pieces.iter().enumerate() {
            let mut at = 0;
            for p in ps {
                if p.rank >= world || p.range.start != at || p.range.is_empty() {
                    return Err(Error::setting(
                        "shard plan",
                        format!("parameter {i}: the piece {p:?} is not the next piece of {world} ranks from element {at}"),
                    ));
                }
                if !p.range.start.is_multiple_of(PIECE) {
                    return Err(Error::setting(
                        "shard plan",
                        format!("parameter {i}: the piece {p:?} does not start at a multiple of {PIECE}"),
                    ));
                }
                at = p.range.end;
            }
            if ps.is_empty() {
                return Err(Error::setting(
                    "shard plan",
                    format!("parameter {i} has no piece"),
                ));
            }
        }
        Ok(ShardPlan { world, pieces })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// True for a plan of no parameters.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The pieces of parameter `i`, in element order.
    pub fn pieces(&self, i: usize) -> &[Piece] {
        &self.pieces[i]
    }

    /// True where `rank` owns some of parameter `i`.
    pub fn owns(&self, i: usize, rank: usize) -> bool {
        self.pieces[i].iter().any(|p| p.rank == rank)
    }

    /// The elements of each parameter that `rank` owns (model order; none where another rank
    /// owns all of it), for [`crate::Frugal::shard`].
    pub fn owned_by(&self, rank: usize) -> Vec<Option<Range<usize>>> {
        self.pieces
            .iter()
            .map(|ps| ps.iter().find(|p| p.rank == rank).map(|p| p.range.clone()))
            .collect()
    }
}

/// The plan for `params` over `world` ranks. Each state-full parameter of at least
/// `world` × [`PIECE`] elements (the embeddings and heads, the largest states) is split into
/// one even piece per rank; the other parameters with state then go whole, largest first, to
/// the rank holding the least so far (ties to the lower rank), so that no rank holds more than
/// an even share plus one unsplit tensor. A parameter of a block schedule counts with its
/// state while active times the share of blocks active (ρ), what it holds on average, so the
/// ranks' shares stay even as the blocks rotate. Parameters without state are then spread by
/// size, which evens out the work of their updates.
pub fn plan_shards(
    config: &OptimizerConfig,
    params: &[ParamShape],
    world: usize,
) -> Result<ShardPlan> {
    Ok(shards(config, &resolve_shapes(config, params)?, world))
}

/// The planned state of each of `world` ranks after the first step (see [`plan_shards`]).
pub fn state_per_rank(
    config: &OptimizerConfig,
    params: &[ParamShape],
    world: usize,
) -> Result<Vec<StateBytes>> {
    let plan = crate::memory::plan(config, params)?;
    let shards = plan_shards(config, params, world)?;
    let mut held = vec![StateBytes::default(); world.max(1)];
    for (i, (info, bytes)) in plan.iter().enumerate() {
        match shards.pieces(i) {
            [one] => held[one.rank] += *bytes,
            pieces => {
                for p in pieces {
                    held[p.rank] += piece_state(config, info, p.range.len());
                }
            }
        }
    }
    Ok(held)
}

/// State bytes of `len` elements of a state-full parameter.
fn piece_state(config: &OptimizerConfig, info: &ParamInfo, len: usize) -> StateBytes {
    let piece = ParamInfo {
        shape: vec![len],
        ..info.clone()
    };
    planned(config, &piece, true)
}

/// [`plan_shards`] of resolved parameters.
pub(crate) fn shards(config: &OptimizerConfig, infos: &[ParamInfo], world: usize) -> ShardPlan {
    let world = world.max(1);
    let rotating = config.blocks().is_some();
    let potential: Vec<usize> = infos
        .iter()
        .map(|info| {
            let bytes = planned(config, info, true).total();
            match info.role {
                Role::Projectable if rotating => (bytes as f64 * config.density).ceil() as usize,
                _ => bytes,
            }
        })
        .collect();
    let mut pieces = vec![Vec::new(); infos.len()];
    let (mut bytes, mut elements) = (vec![0usize; world], vec![0usize; world]);
    let splits = |i: usize| {
        world > 1
            && infos[i].role == Role::StateFull
            && potential[i] > 0
            && infos[i].numel() >= world * PIECE
    };
    for (i, info) in infos.iter().enumerate().filter(|(i, _)| splits(*i)) {
        // One piece per rank, in rank order; the units left over from an even split go to
        // the ranks holding the least.
        let (numel, units) = (info.numel(), info.numel().div_ceil(PIECE));
        let mut lightest: Vec<usize> = (0..world).collect();
        lightest.sort_by_key(|&r| (bytes[r], r));
        let mut extra = vec![0; world];
        for &r in &lightest[..units % world] {
            extra[r] = 1;
        }
        let mut at = 0;
        for rank in 0..world {
            let end = ((at / PIECE + units / world + extra[rank]) * PIECE).min(numel);
            let range = at..end;
            at = end;
            bytes[rank] += piece_state(config, info, range.len()).total();
            elements[rank] += range.len();
            pieces[i].push(Piece { rank, range });
        }
    }
    let mut order: Vec<usize> = (0..infos.len()).filter(|&i| !splits(i)).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse((potential[i], infos[i].numel())), i));
    for i in order {
        let load = if potential[i] > 0 { &bytes } else { &elements };
        let rank = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        bytes[rank] += potential[i];
        elements[rank] += infos[i].numel();
        pieces[i].push(Piece {
            rank,
            range: 0..infos[i].numel(),
        });
    }
    ShardPlan { world, pieces }
}
