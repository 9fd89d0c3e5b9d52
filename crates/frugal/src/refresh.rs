//! Subspace changes (every T steps): the choices that need no gradient (blocks, random
//! projections and coordinates) when a step opens, the SVDs when each tensor's gradient arrives.

use crate::config::{MomentStorage, MomentTransfer, ProjSide};
use crate::error::Result;
use crate::kernels::cpu as kernels;
use crate::labels::Role;
use crate::on_device::Engine;
use crate::optimizer::{Frugal, Slot};
use crate::projection::{self, RankRule, Sketch, Subspace, TensorSplit};
use crate::quant::{Code, Packed};
use crate::rules::moment_slots;
use candle_core::Tensor;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// A step in progress: which parameters it updates, which are done, and the SVD choices that
/// wait for gradients.
pub(crate) struct OpenStep {
    /// Per slot: updated in this step (a gradient arrives for it).
    pub planned: Vec<bool>,
    /// Per slot: already updated.
    pub done: Vec<bool>,
    /// The SVDs of a step that changes SVD subspaces.
    svds: Option<PendingSvds>,
}

/// SVD subspaces to choose from gradients as they arrive.
struct PendingSvds {
    side: ProjSide,
    sketch: Option<Sketch>,
    ranks: RankRule,
    /// Per slot: a waiting choice, with the randomized solver's seed.
    seeds: Vec<Option<u64>>,
}

impl OpenStep {
    pub fn new(planned: Vec<bool>) -> Self {
        let n = planned.len();
        OpenStep {
            planned,
            done: vec![false; n],
            svds: None,
        }
    }
}

impl Frugal {
    /// Re-chooses the subspaces of a step that changes them, and resets statistics where
    /// configured. Blocks and random choices happen now, in model order; each planned SVD
    /// gets its seed now, in model order, and runs in [`Frugal::resolve_svds`].
    pub(crate) fn plan_refresh(&mut self, open: &mut OpenStep) -> Result<()> {
        let slots_count = moment_slots(self.config.state_full);
        let storage = self.config.moment_storage;
        let mut pool = Pool::default();
        if let Some(schedule) = self.schedule.as_mut() {
            schedule.set_density(self.config.density_at(self.step));
            let active = schedule.next(&mut self.rng);
            let new: Vec<Option<Subspace>> = self
                .slots
                .iter()
                .map(|s| {
                    s.block.map(|b| {
                        if active.binary_search(&b).is_ok() {
                            Subspace::All
                        } else {
                            Subspace::Nothing
                        }
                    })
                })
                .collect();
            let changed = self
                .slots
                .iter()
                .zip(&new)
                .any(|(s, n)| n.as_ref().is_some_and(|n| *n != s.subspace))
                || self.step == 0;
            let reset = self.config.reset;
            let keeps: Vec<bool> = self
                .slots
                .iter()
                .zip(&new)
                .map(|(slot, sub)| !changed || (!reset && sub.as_ref() == Some(&slot.subspace)))
                .collect();
            // Buffers of restarting tensors go to the pool first, so that the tensors becoming
            // active reuse them (same shapes) instead of touching fresh pages.
            for (slot, keep) in self.slots.iter_mut().zip(&keeps) {
                if !keep && slot.block.is_some() {
                    pool.give(std::mem::take(&mut slot.m));
                    pool.give(std::mem::take(&mut slot.v));
                }
            }
            for ((slot, sub), keep) in self.slots.iter_mut().zip(new).zip(keeps) {
                if let Some(sub) = sub {
                    install(slot, sub, keep, slots_count, storage, &mut pool);
                }
            }
        } else if let Some(split) = self.config.projection.per_tensor() {
            let ranks = self.config.rank_rule(self.step);
            let projectable: Vec<usize> = (0..self.slots.len())
                .filter(|&i| open.planned[i] && self.slots[i].info.role == Role::Projectable)
                .collect();
            if let TensorSplit::Svd(side, sketch) = split {
                // The randomized solver draws from a generator per tensor, seeded in tensor
                // order, so that the SVDs can run in any order and in parallel.
                let mut seeds = vec![None; self.slots.len()];
                for i in projectable {
                    seeds[i] = Some(sketch.map_or(0, |_| self.rng.next_u64()));
                }
                open.svds = Some(PendingSvds {
                    side,
                    sketch,
                    ranks,
                    seeds,
                });
            } else {
                for i in projectable {
                    let info = &self.slots[i].info;
                    if let Some(sub) = projection::choose_blind(split, ranks, info, &mut self.rng) {
                        self.install_choice(i, sub, &mut pool);
                    }
                }
            }
        }
        // Parameters that are state-full as a whole allocate their moments on first use.
        for slot in self.slots.iter_mut() {
            if slot.info.role == Role::StateFull && self.step == 0 {
                install(slot, Subspace::All, false, slots_count, storage, &mut pool);
            }
        }
        Ok(())
    }

    /// The slots whose state [`Frugal::plan_refresh`] may change now: every slot at the first
    /// step (state-full tensors allocate their moments), block members, and the planned
    /// projectable tensors of a projection chosen without gradients. SVD choices wait for their
    /// gradients and change nothing here.
    pub(crate) fn refresh_touches(&self, planned: &[bool]) -> Vec<bool> {
        let blind = self.schedule.is_none()
            && self
                .config
                .projection
                .per_tensor()
                .is_some_and(|split| !matches!(split, TensorSplit::Svd(..)));
        self.slots
            .iter()
            .zip(planned)
            .map(|(s, &planned)| {
                self.step == 0
                    || s.block.is_some()
                    || (blind && planned && s.info.role == Role::Projectable)
            })
            .collect()
    }

    /// Runs the waiting SVDs of the tensors in `work` (in parallel: they are independent) and
    /// installs their subspaces.
    pub(crate) fn resolve_svds(&mut self, work: &[(usize, Tensor)]) -> Result<()> {
        let Some(svds) = self.open.as_mut().and_then(|open| open.svds.as_mut()) else {
            return Ok(());
        };
        let slots = &self.slots;
        let pending: Vec<(&(usize, Tensor), u64)> = work
            .iter()
            .filter_map(|item| svds.seeds[item.0].take().map(|seed| (item, seed)))
            .filter(|((i, _), _)| slots[*i].owns())
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let (side, sketch, ranks) = (svds.side, svds.sketch, svds.ranks);
        let on_device = self.engine == Engine::Tensors;
        let chosen: Vec<Subspace> = if on_device {
            // One tensor at a time, the matrix products on the gradient's device.
            pending
                .iter()
                .map(|((i, g), seed)| {
                    let slot = &self.slots[*i];
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    let g = g.reshape(slot.info.matrix_dims())?;
                    projection::choose_svd_on_device(
                        (side, sketch),
                        ranks,
                        &slot.info,
                        &g,
                        &slot.subspace,
                        &mut rng,
                    )
                })
                .collect::<Result<_>>()?
        } else {
            pending
                .par_iter()
                .map(|((i, g), seed)| {
                    let slot = &self.slots[*i];
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    kernels::with_slice(&slot.info.name, g, |g| {
                        projection::choose_svd(
                            (side, sketch),
                            ranks,
                            &slot.info,
                            g,
                            &slot.subspace,
                            &mut rng,
                        )
                    })?
                })
                .collect::<Result<_>>()?
        };
        let mut pool = Pool::default();
        for (((i, _), _), sub) in pending.into_iter().zip(chosen) {
            let i = *i;
            if on_device {
                self.slots[i].pull()?;
            }
            self.install_choice(i, sub, &mut pool);
            if on_device {
                self.slots[i].push()?;
            }
        }
        Ok(())
    }

    /// Installs a newly chosen subspace of a projectable tensor, keeping (and carrying) its
    /// moments when the configuration and the state's size allow.
    fn install_choice(&mut self, i: usize, mut sub: Subspace, pool: &mut Pool) {
        let config = &self.config;
        let slot = &mut self.slots[i];
        let same_len =
            sub.state_len(slot.info.numel()) == slot.subspace.state_len(slot.info.numel());
        let keep = self.step > 0 && (sub == slot.subspace || (!config.reset && same_len));
        if keep && sub != slot.subspace {
            transfer(config.moment_transfer, slot, &mut sub);
        }
        let slots_count = moment_slots(config.state_full);
        install(slot, sub, keep, slots_count, config.moment_storage, pool);
    }
}

/// Makes kept moments follow a new basis (see [`MomentTransfer`]).
fn transfer(how: MomentTransfer, slot: &mut Slot, new: &mut Subspace) {
    if let (Subspace::Basis(old), Subspace::Basis(new)) = (&slot.subspace, new) {
        match how {
            MomentTransfer::Keep => {}
            MomentTransfer::Align => new.align_to(old),
            MomentTransfer::Project => match &mut slot.packed {
                None => new.carry(old, [&mut slot.m, &mut slot.v]),
                Some((pm, pv)) => {
                    let (mut m, mut v) = (Vec::new(), Vec::new());
                    pm.unpack_into(&mut m);
                    pv.unpack_into(&mut v);
                    new.carry(old, [&mut m, &mut v]);
                    pm.pack_from(&m);
                    pv.pack_from(&v);
                }
            },
        }
    }
}

/// Moment buffers released during a refresh, reused by tensors that need the same length (a
/// recycled buffer is zeroed in place instead of faulting in fresh pages). Dropped after the
/// refresh, so it holds no memory between steps.
#[derive(Default)]
struct Pool(Vec<Vec<f32>>);

impl Pool {
    fn give(&mut self, buffer: Vec<f32>) {
        if buffer.capacity() > 0 {
            self.0.push(buffer);
        }
    }

    /// `len` zeros, in a released buffer of exactly that capacity if there is one.
    fn zeros(&mut self, len: usize) -> Vec<f32> {
        match self.0.iter().position(|b| b.capacity() == len) {
            Some(i) => {
                let mut buffer = self.0.swap_remove(i);
                buffer.clear();
                buffer.resize(len, 0.0);
                buffer
            }
            None => vec![0.0; len],
        }
    }
}

/// Installs a new subspace; `keep` retains the moments and the step count, otherwise they restart.
fn install(
    slot: &mut Slot,
    sub: Subspace,
    keep: bool,
    moment_buffers: usize,
    storage: MomentStorage,
    pool: &mut Pool,
) {
    let len = match (&sub, &slot.owned) {
        (Subspace::All, Some(piece)) => piece.len(),
        _ => sub.state_len(slot.info.numel()),
    };
    slot.subspace = sub;
    if !slot.owns() {
        slot.release();
        return;
    }
    let (m_len, v_len) = (
        if moment_buffers >= 1 { len } else { 0 },
        if moment_buffers >= 2 { len } else { 0 },
    );
    if keep && slot.moment_len() == m_len {
        return;
    }
    match storage {
        MomentStorage::F32 => {
            pool.give(std::mem::take(&mut slot.m));
            pool.give(std::mem::take(&mut slot.v));
            slot.m = pool.zeros(m_len);
            slot.v = pool.zeros(v_len);
        }
        MomentStorage::Bits8 => {
            slot.packed = Some((
                Packed::zeros(m_len, Code::Signed),
                Packed::zeros(v_len, Code::Unsigned),
            ));
        }
    }
    slot.t = 0;
}
