//! Blockwise schedule: which blocks are active (state-full) in each period of T steps.
//!
//! With N blocks and k active:
//! - `ascending`: {0..k}, then {k..2k}, … wrapping around modulo N;
//! - `descending`: {N−1, …, N−k}, then the next k below, … wrapping around;
//! - `mirror`: ⌈k/2⌉ blocks ascending from the front and ⌊k/2⌋ descending from the back, both
//!   cursors moving towards the middle each period and restarting from the ends once they meet;
//! - `random`: a uniformly random k-subset each period.

use crate::config::{round_half_even, BlockOrder, BlockUnit};
use crate::labels::{ParamInfo, Role};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Cursor state of the block order; serialised with the optimizer state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSchedule {
    pub order: BlockOrder,
    pub blocks: usize,
    pub active_count: usize,
    /// Next block of the ascending walk.
    pub front: usize,
    /// Next block of the descending walk.
    pub back: usize,
}

impl BlockSchedule {
    /// A schedule over `blocks` blocks with `active_count` active at a time.
    pub fn new(order: BlockOrder, blocks: usize, active_count: usize) -> Self {
        BlockSchedule {
            order,
            blocks,
            active_count: active_count.min(blocks),
            front: 0,
            back: blocks.saturating_sub(1),
        }
    }

    /// The schedule over `blocks` blocks at density ρ: round(blocks·ρ) active, half to even.
    pub fn for_config(order: BlockOrder, density: f64, blocks: usize) -> Self {
        let mut s = Self::new(order, blocks, 0);
        s.set_density(density);
        s
    }

    /// Sets the active count for density ρ (a decaying density changes it between periods).
    pub fn set_density(&mut self, density: f64) {
        self.active_count = round_half_even(self.blocks as f64 * density).min(self.blocks);
    }

    /// The active blocks of the next period, sorted.
    pub fn next(&mut self, rng: &mut impl Rng) -> Vec<usize> {
        let (n, k) = (self.blocks, self.active_count);
        if k == 0 || n == 0 {
            return Vec::new();
        }
        let mut active: Vec<usize> = match self.order {
            BlockOrder::Random => rand::seq::index::sample(rng, n, k).into_vec(),
            BlockOrder::Ascending => self.walk_front(k),
            BlockOrder::Descending => self.walk_back(k),
            BlockOrder::Mirror => {
                let mut a = self.walk_front(k.div_ceil(2));
                a.extend(self.walk_back(k / 2));
                if self.front > self.back {
                    // The cursors met in the middle: start again from both ends.
                    (self.front, self.back) = (0, n - 1);
                }
                a
            }
        };
        active.sort_unstable();
        active.dedup();
        // Cursors that crossed may pick a block twice: top up from the front.
        while active.len() < k {
            let b = self.walk_front(1)[0];
            if let Err(pos) = active.binary_search(&b) {
                active.insert(pos, b);
            }
        }
        active
    }

    fn walk_front(&mut self, count: usize) -> Vec<usize> {
        let out = (0..count).map(|i| (self.front + i) % self.blocks).collect();
        self.front = (self.front + count) % self.blocks;
        out
    }

    fn walk_back(&mut self, count: usize) -> Vec<usize> {
        let n = self.blocks;
        let out = (0..count)
            .map(|i| (self.back + n * count - i) % n)
            .collect();
        self.back = (self.back + n * count - count) % n;
        out
    }
}

/// Block id of each projectable parameter (given in model order) and the number of blocks: one
/// block per tensor, or, for [`BlockUnit::Layer`], one per run of tensors of the same labelled
/// group (a tensor without a group is a block of its own).
pub fn assign_blocks(infos: &[ParamInfo], unit: BlockUnit) -> (Vec<Option<usize>>, usize) {
    let mut count = 0;
    let mut last_group: Option<usize> = None;
    let ids = infos
        .iter()
        .map(|info| {
            if info.role != Role::Projectable {
                return None;
            }
            let same_group =
                unit == BlockUnit::Layer && info.block.is_some() && info.block == last_group;
            if !same_group {
                count += 1;
            }
            last_group = info.block;
            Some(count - 1)
        })
        .collect();
    (ids, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn periods(order: BlockOrder, n: usize, k: usize, count: usize) -> Vec<Vec<usize>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut s = BlockSchedule::new(order, n, k);
        (0..count).map(|_| s.next(&mut rng)).collect()
    }

    #[test]
    fn documented_sequences() {
        assert_eq!(
            periods(BlockOrder::Ascending, 7, 3, 3),
            [vec![0, 1, 2], vec![3, 4, 5], vec![0, 1, 6]]
        );
        assert_eq!(
            periods(BlockOrder::Descending, 7, 3, 3),
            [vec![4, 5, 6], vec![1, 2, 3], vec![0, 5, 6]]
        );
        assert_eq!(
            periods(BlockOrder::Mirror, 8, 4, 3),
            [vec![0, 1, 6, 7], vec![2, 3, 4, 5], vec![0, 1, 6, 7]]
        );
        for set in periods(BlockOrder::Random, 10, 4, 5) {
            assert_eq!(set.len(), 4);
            assert!(set.windows(2).all(|w| w[0] < w[1]) && set[3] < 10);
        }
        assert_eq!(
            periods(BlockOrder::Descending, 5, 0, 2),
            [Vec::<usize>::new(), vec![]]
        );
        assert_eq!(
            periods(BlockOrder::Descending, 3, 3, 2),
            [vec![0, 1, 2], vec![0, 1, 2]]
        );
    }
}
