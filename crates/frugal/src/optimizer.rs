//! The FRUGAL optimizer: routes each parameter to the state-full rule, or splits its gradient
//! with a projection into a state-full part and a state-free residual, in one fused pass.

use crate::config::{DecayMask, OptimizerConfig, StateFreeRule};
use crate::error::{Error, Result};
use crate::kernels::cpu as kernels;
use crate::kernels::tensor::{self, Rules};
use crate::labels::{resolve, Param, ParamInfo, Role};
use crate::memory::StateBytes;
use crate::on_device::{self, Engine, OnDevice};
use crate::projection::{assign_blocks, BlockSchedule, Subspace, Workspace};
use crate::quant::Packed;
use crate::refresh::OpenStep;
use crate::rules::scaled::{self, Scaled};
use crate::rules::{Free, Full};
use crate::sharding::ShardPlan;
use crate::update_gap::UpdateGap;
use crate::with_rules;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::borrow::Cow;
use std::ops::Range;

/// Per-parameter optimizer state.
pub(crate) struct Slot {
    pub info: ParamInfo,
    pub var: Var,
    pub subspace: Subspace,
    /// First moment (AdamW m, SGDM/Lion momentum); empty when unused.
    pub m: Vec<f32>,
    /// Second moment (AdamW v); empty when unused.
    pub v: Vec<f32>,
    /// Steps since the statistics were last reset (bias-correction count).
    pub t: u64,
    /// Block id for the blockwise projection.
    pub block: Option<usize>,
    /// Scaled state-free rules: the norm-growth limiter's record of the last scaled update's norm.
    pub scaled_norm: Option<f32>,
    /// 8-bit moments (m, v), when the configuration stores them so; `m` and `v` are empty then.
    pub packed: Option<(Packed, Packed)>,
    /// The elements whose state this optimizer keeps and which it updates: all, a piece of a
    /// state-full tensor, or none (another shard's; see [`Frugal::shard`]).
    pub owned: Option<Range<usize>>,
    /// Moments and subspace tensors on the parameter's device ([`Engine::Tensors`]); `m` and
    /// `v` are empty then.
    pub device: OnDevice,
}

impl Slot {
    /// Drops the state of a parameter another shard owns. Whole-tensor subspaces (state-full,
    /// or a block's active or inactive mark) stay: they hold no memory and the block schedule
    /// compares them.
    pub(crate) fn release(&mut self) {
        self.m = Vec::new();
        self.v = Vec::new();
        self.packed = None;
        self.device = OnDevice::default();
        self.scaled_norm = None;
        self.t = 0;
        if !matches!(self.subspace, Subspace::All | Subspace::Nothing) {
            self.subspace = Subspace::Nothing;
        }
    }

    /// True where this optimizer updates some of the parameter.
    pub(crate) fn owns(&self) -> bool {
        self.owned.is_some()
    }

    /// The owned piece, where this optimizer owns part of the parameter only.
    pub(crate) fn piece(&self) -> Option<Range<usize>> {
        self.owned.clone().filter(|r| r.len() != self.info.numel())
    }

    /// Keeps the state of the elements in `range` of the whole tensor (within those held now,
    /// from `self.owned`'s start) and drops the rest.
    fn trim(&mut self, range: &Range<usize>) -> Result<()> {
        let held = self.owned.clone().unwrap_or(0..0);
        if self.subspace != Subspace::All || *range == held {
            return Ok(());
        }
        let on_device = self.device.m.is_some() || self.device.v.is_some();
        if on_device {
            self.pull()?;
        }
        let local = range.start - held.start..range.end - held.start;
        cut_moments((&mut self.m, &mut self.v, &mut self.packed), &local);
        if on_device {
            self.push()?;
        }
        Ok(())
    }

    /// Length of the first moment, however stored.
    pub(crate) fn moment_len(&self) -> usize {
        match (&self.packed, &self.device.m) {
            (Some((m, _)), _) => m.len(),
            (None, Some(m)) => m.elem_count(),
            (None, None) => self.m.len(),
        }
    }
}

/// Read-only view of one parameter's optimizer state.
#[derive(Debug)]
pub struct ParamStateView<'a> {
    pub info: &'a ParamInfo,
    /// Current subspace.
    pub subspace: &'a Subspace,
    /// First moment (empty when the rule keeps none; a host copy of moments on a device).
    pub m: Cow<'a, [f32]>,
    /// Second moment (empty when the rule keeps none).
    pub v: Cow<'a, [f32]>,
    /// Steps since the last reset.
    pub t: u64,
}

/// FRUGAL, its baselines (AdamW, GaLore, BAdam, signSGD, SGD) and relatives (Fira, APOLLO) as
/// one configurable optimizer.
pub struct Frugal {
    pub(crate) config: OptimizerConfig,
    pub(crate) slots: Vec<Slot>,
    /// Completed steps.
    pub(crate) step: u64,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) schedule: Option<BlockSchedule>,
    /// T in force and the step of the next subspace change.
    pub(crate) gap: UpdateGap,
    workspace: Workspace,
    /// The step being taken in parts, between `begin_step` and `finish_step`.
    pub(crate) open: Option<OpenStep>,
    /// Where the element-wise work runs.
    pub(crate) engine: Engine,
    /// 8-bit moments of the tensor being updated, unpacked (scratch, like the workspace).
    unpacked: (Vec<f32>, Vec<f32>),
}

/// Checks that a parameter is stored as the optimizer steps it: f32 (master weights).
fn check_storage(name: &str, var: &Var) -> Result<()> {
    if var.dtype() != DType::F32 {
        return Err(Error::UnsupportedTensor {
            name: name.to_string(),
            reason: format!(
                "it is {:?} on {:?}; the optimizer steps f32 tensors (keep fp32 master weights, compute in lower precision)",
                var.dtype(),
                var.device().location()
            ),
        });
    }
    Ok(())
}

/// Keeps the values `local` of host moments, f32 or 8-bit (those the rule keeps none of stay
/// empty).
fn cut_moments(
    (m, v, packed): (&mut Vec<f32>, &mut Vec<f32>, &mut Option<(Packed, Packed)>),
    local: &Range<usize>,
) {
    for moment in [m, v] {
        if !moment.is_empty() {
            *moment = moment[local.clone()].to_vec();
        }
    }
    if let Some((pm, pv)) = packed {
        *pm = pm.slice(local);
        *pv = pv.slice(local);
    }
}

/// Checks that `own` is a share [`Frugal::shard`] can keep of `slot`: within what it holds now,
/// and a piece only of a state-full tensor, cut at 8-bit blocks.
fn check_share(slot: &Slot, own: Option<&Range<usize>>) -> Result<()> {
    let (Some(range), Some(held)) = (own, slot.owned.as_ref()) else {
        return match own {
            None => Ok(()),
            Some(_) => Err(Error::setting(
                "shard",
                format!(
                    "`{}` is not held by this shard; a shard can only give up state",
                    slot.info.name
                ),
            )),
        };
    };
    let numel = slot.info.numel();
    let cut = |at: usize| at.is_multiple_of(crate::quant::BLOCK) || at == numel;
    let problem = if range.start >= range.end && numel > 0 {
        Some("it is empty (give none for another shard's parameter)".to_string())
    } else if range.start < held.start || range.end > held.end {
        Some(format!(
            "it is not within the held {held:?}; a shard can only give up state"
        ))
    } else if range.len() != numel && slot.info.role != Role::StateFull {
        Some("only state-full parameters are split".into())
    } else if !cut(range.start) || !cut(range.end) {
        Some(format!(
            "its ends are not multiples of {}",
            crate::quant::BLOCK
        ))
    } else {
        None
    };
    match problem {
        Some(p) => Err(Error::setting(
            "shard",
            format!(
                "the range {range:?} of `{}` cannot be kept: {p}",
                slot.info.name
            ),
        )),
        None => Ok(()),
    }
}

impl Frugal {
    /// Builds the optimizer over labelled parameters, in the caller's (model) order. Every
    /// parameter must be an f32 tensor; names must be unique. Parameters on the CPU are stepped
    /// by the fused engine, others by tensor operations on their device (see [`Engine`]).
    pub fn from_params(params: Vec<Param>, config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        for p in &params {
            check_storage(&p.name, &p.var)?;
            if !seen.insert(p.name.as_str()) {
                return Err(Error::setting(
                    "parameters",
                    format!("the name `{}` is given twice", p.name),
                ));
            }
        }
        let infos = resolve(
            params
                .iter()
                .map(|p| (p.name.as_str(), p.var.dims(), p.label)),
            &config,
        )?;
        let (blocks, schedule) = match config.blocks() {
            Some((order, unit)) => {
                let (blocks, count) = assign_blocks(&infos, unit);
                let schedule = BlockSchedule::for_config(order, config.density, count);
                (blocks, Some(schedule))
            }
            None => (vec![None; infos.len()], None),
        };
        let engine = if params.iter().all(|p| p.var.device().is_cpu()) {
            Engine::Fused
        } else {
            Engine::Tensors
        };
        let slots: Vec<Slot> = infos
            .into_iter()
            .zip(blocks)
            .zip(params)
            .map(|((info, block), param)| Slot {
                var: param.var,
                // Projectable tensors get their subspace from their first gradient; state-free
                // ones never get one.
                subspace: if info.role == Role::StateFull {
                    Subspace::All
                } else {
                    Subspace::Nothing
                },
                m: Vec::new(),
                v: Vec::new(),
                t: 0,
                block,
                scaled_norm: None,
                packed: None,
                owned: Some(0..info.numel()),
                device: OnDevice::default(),
                info,
            })
            .collect();
        Ok(Frugal {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            gap: UpdateGap::new(&config),
            config,
            slots,
            step: 0,
            schedule,
            workspace: Workspace::default(),
            open: None,
            engine,
            unpacked: Default::default(),
        })
    }

    /// Builds the optimizer over named parameters in the given order, labelled by
    /// [`crate::Label::default_for`] (2-D weights projectable, the rest state-full) unless the
    /// configuration's patterns say otherwise.
    pub fn from_named(params: Vec<(String, Var)>, config: OptimizerConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| Param::with_default_label(name, var))
            .collect();
        Self::from_params(params, config)
    }

    /// Builds the optimizer over every variable of a `VarMap`, in name order, with default labels
    /// (see [`Frugal::from_named`]).
    pub fn from_varmap(varmap: &VarMap, config: OptimizerConfig) -> Result<Self> {
        let mut params: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| Error::setting("varmap", "the VarMap's lock is poisoned"))?
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_named(params, config)
    }

    /// Sets the learning rate of the next steps (schedules call this every step).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// The learning rate in force.
    pub fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    /// The configuration in force.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Number of completed steps.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// The parameters as the optimizer treats them, in model order.
    pub fn params(&self) -> impl Iterator<Item = &ParamInfo> {
        self.slots.iter().map(|s| &s.info)
    }

    /// Names of the parameters whose whole tensor is currently state-full (including active blocks).
    pub fn state_full_now(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.subspace == Subspace::All)
            .map(|s| s.info.name.as_str())
            .collect()
    }

    /// Records the training loss of the step just taken: the plateau detector of a growing
    /// update gap (`gap_growth`) reads it; without growth it changes nothing.
    pub fn observe_loss(&mut self, loss: f64) {
        self.gap.observe(loss);
    }

    /// The update gap T in force and the step of the next subspace change.
    pub fn update_gap(&self) -> &UpdateGap {
        &self.gap
    }

    /// The block schedule of the blockwise projection (block count, active count, cursors).
    pub fn block_schedule(&self) -> Option<&BlockSchedule> {
        self.schedule.as_ref()
    }

    /// The variable of a parameter, by name.
    pub fn var(&self, name: &str) -> Option<&Var> {
        self.slots
            .iter()
            .find(|s| s.info.name == name)
            .map(|s| &s.var)
    }

    /// Read-only view of one parameter's state, for inspection and tests (`None` also when
    /// moments on a device cannot be read).
    pub fn param_state(&self, name: &str) -> Option<ParamStateView<'_>> {
        let s = self.slots.iter().find(|s| s.info.name == name)?;
        let (m, v) = s.host_moments().ok()?;
        Some(ParamStateView {
            info: &s.info,
            subspace: &s.subspace,
            m,
            v,
            t: s.t,
        })
    }

    /// Bytes of optimizer state held now: moments, projection matrices and indices.
    pub fn state_bytes(&self) -> StateBytes {
        let mut b = StateBytes::default();
        for s in &self.slots {
            b.moments += 4 * (s.m.capacity() + s.v.capacity()) + s.device.moment_bytes();
            b.moments += s.packed.as_ref().map_or(0, |(m, v)| m.bytes() + v.bytes());
            b.moments += if s.scaled_norm.is_some() { 4 } else { 0 };
            b.projections += s.subspace.projection_bytes();
            b.indices += s.subspace.index_bytes();
        }
        b
    }

    /// Bytes of reusable scratch buffers of the matrix projections and of unpacked 8-bit moments
    /// (not state: kept between steps only to avoid re-allocation).
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.bytes() + 4 * (self.unpacked.0.capacity() + self.unpacked.1.capacity())
    }

    /// One optimizer step from the gradients in `grads`. Parameters without a gradient are skipped.
    /// Nothing is updated if any gradient is non-finite (with `check_finite`).
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, self.config.check_finite)
    }

    /// [`Frugal::step_grads`] for gradients the caller has already found finite, e.g. by a
    /// finite global norm (a norm over f64 sums is finite only if every gradient is): skips the
    /// optimizer's own pass over the gradients.
    pub fn step_finite_grads(&mut self, grads: &GradStore) -> Result<()> {
        self.step_with(grads, false)
    }

    fn step_with(&mut self, grads: &GradStore, check_finite: bool) -> Result<()> {
        let work = self.gradients(grads, check_finite)?;
        let mut planned = vec![false; self.slots.len()];
        for (i, _) in &work {
            planned[*i] = true;
        }
        self.begin(planned)?;
        let stepped = self.apply(work).and_then(|()| self.finish_step());
        if stepped.is_err() {
            self.open = None;
        }
        stepped
    }

    /// The contiguous gradients in `grads`, in model order; with `check_finite`, an error
    /// naming the first non-finite one.
    fn gradients(&self, grads: &GradStore, check_finite: bool) -> Result<Vec<(usize, Tensor)>> {
        let mut work = Vec::new();
        let fused = self.engine == Engine::Fused;
        let non_finite = |i: usize| Error::NonFiniteGradient {
            name: self.slots[i].info.name.clone(),
        };
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(g) = grads.get(&slot.var) {
                let g = g.contiguous()?;
                if check_finite
                    && fused
                    && !kernels::with_slice(&slot.info.name, &g, kernels::all_finite)?
                {
                    return Err(non_finite(i));
                }
                work.push((i, g));
            }
        }
        if check_finite && !fused {
            // One round trip to the device for every gradient.
            if let Some(at) = tensor::first_non_finite(work.iter().map(|(_, g)| g))? {
                return Err(non_finite(work[at].0));
            }
        }
        Ok(work)
    }

    /// Opens a step that the caller takes in parts, e.g. layer by layer during the backward
    /// pass so that the whole gradient never exists at once: then [`Frugal::step_part`] for
    /// every parameter exactly once, in any order and grouping, then [`Frugal::finish_step`].
    /// The subspaces, block schedule, step count and random choices are those of
    /// [`Frugal::step_grads`] given every gradient at once, so the updates are bit for bit the
    /// same. Every parameter must get a gradient in the step.
    pub fn begin_step(&mut self) -> Result<()> {
        self.begin(vec![true; self.slots.len()])
    }

    /// Updates the parameters whose gradients are in `grads`, within the step opened by
    /// [`Frugal::begin_step`]. With `check_finite` set in the configuration, a non-finite
    /// gradient is an error and none of these parameters is updated (those of earlier parts
    /// are). A parameter given twice in one step is an error.
    pub fn step_part(&mut self, grads: &GradStore) -> Result<()> {
        let Some(open) = &self.open else {
            return Err(Error::StepInParts(
                "step_part needs an open step: call begin_step first".into(),
            ));
        };
        let again = self
            .slots
            .iter()
            .zip(&open.done)
            .find(|(s, done)| **done && grads.get(&s.var).is_some());
        if let Some((slot, _)) = again {
            return Err(Error::StepInParts(format!(
                "`{}` was already updated in this step",
                slot.info.name
            )));
        }
        let work = self.gradients(grads, self.config.check_finite)?;
        self.apply(work)
    }

    /// Closes the step opened by [`Frugal::begin_step`]; an error names a parameter that got
    /// no gradient in it (the step stays open then).
    pub fn finish_step(&mut self) -> Result<()> {
        let Some(open) = &self.open else {
            return Err(Error::StepInParts(
                "finish_step needs an open step: call begin_step first".into(),
            ));
        };
        let missing = self
            .slots
            .iter()
            .zip(open.planned.iter().zip(&open.done))
            .find(|(_, (planned, done))| **planned && !**done);
        if let Some((slot, _)) = missing {
            return Err(Error::StepInParts(format!(
                "`{}` got no gradient in a step taken in parts; every parameter needs one",
                slot.info.name
            )));
        }
        self.open = None;
        self.step += 1;
        Ok(())
    }

    /// Keeps state for, and updates, only the elements in `owned` (per parameter, in model
    /// order: all of it, none, or for a state-full parameter a range whose ends are multiples
    /// of [`crate::quant::BLOCK`] or its end): one shard of a data-parallel optimizer whose
    /// other shards update the rest. Every shard still makes every decision (blocks, random
    /// subspaces, step counts), so they stay in step; the state of the others' elements is
    /// released now and never allocated. Their updated values must come from their owners
    /// after each step. A shard may only shrink what it holds; it saves its part of the state
    /// with [`Frugal::save_state_part`].
    pub fn shard(&mut self, owned: &[Option<Range<usize>>]) -> Result<()> {
        if owned.len() != self.slots.len() {
            return Err(Error::setting(
                "shard",
                format!(
                    "{} ownership marks for {} parameters",
                    owned.len(),
                    self.slots.len()
                ),
            ));
        }
        for (slot, own) in self.slots.iter().zip(owned) {
            check_share(slot, own.as_ref())?;
        }
        for (slot, own) in self.slots.iter_mut().zip(owned) {
            match own {
                Some(range) => slot.trim(range)?,
                None => slot.release(),
            }
            slot.owned = own.clone();
        }
        Ok(())
    }

    /// Makes this optimizer rank `rank`'s shard of `world` (see
    /// [`crate::sharding::plan_shards`]); returns the plan of every rank.
    pub fn shard_evenly(&mut self, rank: usize, world: usize) -> Result<ShardPlan> {
        let infos: Vec<ParamInfo> = self.slots.iter().map(|s| s.info.clone()).collect();
        let plan = crate::sharding::shards(&self.config, &infos, world);
        self.shard(&plan.owned_by(rank))?;
        Ok(plan)
    }

    /// The elements of each parameter this optimizer updates, in model order (all of every
    /// one unless [`Frugal::shard`]ed).
    pub fn owned(&self) -> Vec<Option<Range<usize>>> {
        self.slots.iter().map(|s| s.owned.clone()).collect()
    }

    /// True while a step taken in parts is open.
    pub fn step_is_open(&self) -> bool {
        self.open.is_some()
    }

    /// Opens a step for the slots in `planned`: the subspace changes that need no gradient
    /// happen now; the SVDs wait for their tensors' gradients.
    fn begin(&mut self, planned: Vec<bool>) -> Result<()> {
        if self.open.is_some() {
            return Err(Error::StepInParts(
                "a step is already open: finish it with finish_step".into(),
            ));
        }
        let mut open = OpenStep::new(planned);
        if self.gap.due(self.step) {
            // Only the state the refresh may change comes to the host and back.
            let touched = self.refresh_touches(&open.planned);
            self.pull(&touched)?;
            self.plan_refresh(&mut open)?;
            self.push(&touched)?;
            self.gap.advance(&self.config, self.step);
        }
        self.open = Some(open);
        Ok(())
    }

    /// Chooses the waiting subspaces of the tensors in `work` from their gradients, then
    /// updates them.
    fn apply(&mut self, work: Vec<(usize, Tensor)>) -> Result<()> {
        self.resolve_svds(&work)?;
        for (i, g) in &work {
            self.update_slot(*i, g)?;
            if let Some(open) = self.open.as_mut() {
                open.done[*i] = true;
            }
        }
        Ok(())
    }

    fn update_slot(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let engine = self.engine;
        let config = &self.config;
        let slot = &mut self.slots[i];
        if !slot.owns() {
            return Ok(()); // another shard's
        }
        let lr = config.lr;
        let decays = config.decay_mask == DecayMask::All || slot.info.weight_decay;
        let keep = if decays {
            (1.0 - lr * config.weight_decay) as f32
        } else {
            1.0
        };
        let (lr_full, lr_free) = if slot.info.role != Role::StateFull {
            (
                lr * config.proj_lr_scale,
                lr * config.proj_lr_scale * config.state_free_lr_scale,
            )
        } else {
            (lr, 0.0)
        };
        if slot.subspace == Subspace::Nothing && config.state_free == StateFreeRule::None {
            return Ok(()); // frozen (BAdam's inactive blocks)
        }
        if slot.subspace != Subspace::Nothing {
            slot.t += 1;
        }
        let full = Full::new(config, lr_full, slot.t);
        let free = Free::new(config.state_free, lr_free);
        let scaled = Scaled::configured(config, (lr_full, lr_free), keep);
        if engine == Engine::Tensors {
            let rules = Rules { full, free, keep };
            return on_device::step_slot(config, slot, g, rules, scaled);
        }
        let piece = slot.piece();
        let Slot {
            info,
            var,
            subspace,
            m,
            v,
            scaled_norm,
            t,
            packed,
            ..
        } = slot;
        let ws = &mut self.workspace;
        let (m, v) = match packed {
            None => (m, v),
            Some((pm, pv)) if *subspace == Subspace::All => {
                // Whole tensors are updated chunk by chunk, never unpacked whole.
                return kernels::with_weight_and_grad(&info.name, var.as_tensor(), g, |w, g| {
                    let (w, g) = within(w, g, &piece);
                    with_rules!(full, free, |r, _f| kernels::dense_full_packed(
                        w,
                        g,
                        (pm, pv),
                        r,
                        keep
                    ));
                    Ok(())
                });
            }
            Some((pm, pv)) => {
                pm.unpack_into(&mut self.unpacked.0);
                pv.unpack_into(&mut self.unpacked.1);
                (&mut self.unpacked.0, &mut self.unpacked.1)
            }
        };
        let result = if let (Some(settings), Subspace::Basis(basis)) = (scaled, &*subspace) {
            let unit = Full::new(config, 1.0, *t);
            kernels::with_weight_and_grad(&info.name, var.as_tensor(), g, |w, g| {
                with_rules!(unit, free, |r, _f| scaled::step(
                    settings,
                    basis,
                    (w, g),
                    (m, v),
                    r,
                    scaled_norm,
                    ws
                ));
                Ok(())
            })
        } else {
            kernels::with_weight_and_grad(&info.name, var.as_tensor(), g, |w, g| {
                with_rules!(full, free, |r, f| match &*subspace {
                    Subspace::All => {
                        let (w, g) = within(w, g, &piece);
                        kernels::dense_full(w, g, m, v, r, keep)
                    }
                    Subspace::Nothing => kernels::dense_free(w, g, f, keep),
                    Subspace::Coords(sel) => kernels::selected(w, g, m, v, sel, (r, f), keep),
                    Subspace::Basis(basis) => {
                        let (lr_rows, lr_cols) = basis.low_shape();
                        let Workspace {
                            low,
                            up_u,
                            projected_g,
                            tmp,
                        } = ws;
                        low.resize(lr_rows * lr_cols, 0.0);
                        up_u.resize(w.len(), 0.0);
                        basis.down(g, low, tmp);
                        let free_updates = config.state_free != StateFreeRule::None;
                        if free_updates {
                            projected_g.resize(w.len(), 0.0);
                            basis.up(low, projected_g, tmp);
                        }
                        kernels::full_in_place(low, m, v, r);
                        basis.up(low, up_u, tmp);
                        kernels::projected(
                            w,
                            g,
                            up_u,
                            if free_updates { projected_g } else { &[] },
                            f,
                            keep,
                        );
                    }
                });
                Ok(())
            })
        };
        if let Some((pm, pv)) = packed {
            pm.pack_from(m);
            pv.pack_from(v);
        }
        result
    }
}

/// The owned piece of a weight and of its gradient (all of them where the tensor is owned
/// whole).
fn within<'a>(
    w: &'a mut [f32],
    g: &'a [f32],
    piece: &Option<Range<usize>>,
) -> (&'a mut [f32], &'a [f32]) {
    match piece {
        Some(r) => (&mut w[r.clone()], &g[r.clone()]),
        None => (w, g),
    }
}

impl candle_nn::Optimizer for Frugal {
    type Config = OptimizerConfig;

    /// Without names every ≥2-D parameter is projectable and the rest state-full (see
    /// [`crate::Label::default_for`]); use [`Frugal::from_params`] to label them.
    fn new(vars: Vec<Var>, config: OptimizerConfig) -> candle_core::Result<Self> {
        let named = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        Frugal::from_named(named, config).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_grads(grads).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}
