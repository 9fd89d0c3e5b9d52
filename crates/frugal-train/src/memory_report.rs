//! `frugal memory`: exact bytes of parameters, gradients and optimizer state for any model and
//! optimizer, from shapes alone (nothing is allocated).

use anyhow::Result;
use frugal::config::DensitySchedule;
use frugal::labels::RoleCounts;
use frugal::memory::{by_role, plan};
use frugal::{OptimizerConfig, StateBytes};
use frugal_nn::chunked_loss::LossChunks;
use frugal_nn::llama::{DecoderLora, LlamaConfig};
use frugal_nn::{StepMemory, StepMode};
use serde::Serialize;

/// Bytes of one parameter role.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ClassMemory {
    pub parameters: usize,
    pub parameter_bytes: usize,
    pub gradient_bytes: usize,
    pub state: StateBytes,
}

/// The memory of training a model with an optimizer (fp32 weights, gradients and state).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MemoryReport {
    pub state_full: ClassMemory,
    pub projectable: ClassMemory,
    /// Weights that are not trained (under LoRA): no gradient, no state.
    pub frozen: ClassMemory,
    pub total: ClassMemory,
    /// LoRA adapters on the frozen linears, when they are what is trained.
    pub lora: Option<DecoderLora>,
    /// With a decaying density: the state once ρ has reached its minimum (the figures above
    /// are the peak, at the start).
    pub end_state: Option<StateBytes>,
    /// With a batch shape: the planned step memory of every memory mode.
    pub steps: Vec<ModePlan>,
    /// With a batch shape: the peak of plain AdamW in the normal mode, for comparison.
    pub adamw_normal_peak_bytes: Option<usize>,
    /// Under data parallelism with sharded state: the state each rank holds, in rank order
    /// (weights and gradients are whole on every rank).
    pub state_per_rank: Vec<StateBytes>,
    /// The tensors whose state is split into one piece per rank.
    pub split_tensors: Vec<String>,
}

/// The planned memory of training steps in one memory mode.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModePlan {
    pub mode: String,
    pub settings: StepMode,
    pub step: StepMemory,
    /// Weights, optimizer state and the step's peak.
    pub peak_bytes: usize,
    /// The mode the given settings select.
    pub selected: bool,
}

impl ModePlan {
    /// The plan of the mode a run's settings select, out of `plans` (a report's modes).
    pub fn selected(plans: Vec<ModePlan>) -> Result<ModePlan> {
        plans
            .into_iter()
            .find(|s| s.selected)
            .ok_or_else(|| anyhow::anyhow!("the run's memory mode has no plan"))
    }

    /// The planned peak and its parts, for micro-batches of `batch` × `seq` tokens: "about N
    /// MiB: weights and optimizer state …, activations …, gradients … and working set … MiB …".
    pub fn describe(&self, batch: usize, seq: usize) -> String {
        let mib = |b: usize| b as f64 / MIB;
        let s = &self.step;
        format!(
            "about {:.0} MiB: weights and optimizer state {:.0}, activations {:.0}, gradients {:.0} and working set {:.0} MiB for micro-batches of {batch} × {seq} tokens {}",
            mib(self.peak_bytes),
            mib(self.peak_bytes - s.peak),
            mib(s.activations),
            mib(s.gradients),
            mib(s.working),
            self.settings.kernels.describe(),
        )
    }

    /// The plans of `modes`, and of `selected` where it is not one of them, each step planned
    /// by `plan`, beside `fixed` bytes (weights and optimizer state).
    pub fn of_modes(
        mut modes: Vec<(&'static str, StepMode)>,
        selected: StepMode,
        fixed: usize,
        plan: impl Fn(StepMode) -> StepMemory,
    ) -> Vec<ModePlan> {
        if !modes.iter().any(|(_, m)| *m == selected) {
            modes.push(("selected", selected));
        }
        modes
            .into_iter()
            .map(|(name, settings)| {
                let step = plan(settings);
                ModePlan {
                    mode: name.to_string(),
                    settings,
                    peak_bytes: fixed + step.peak,
                    step,
                    selected: settings == selected,
                }
            })
            .collect()
    }
}

/// The memory modes a report plans, by name: each technique alone, and all of them, with
/// the micro-batches, attention and operations of `run`.
pub fn modes(run: StepMode) -> Vec<(&'static str, StepMode)> {
    let mode = |checkpointing, per_layer_updates, tokens| StepMode {
        checkpointing,
        per_layer_updates,
        loss_chunks: LossChunks { tokens, vocab: 1 },
        ..run
    };
    vec![
        ("normal", mode(false, false, 1)),
        ("checkpointing", mode(true, false, 1)),
        ("per-layer updates", mode(false, true, 1)),
        ("loss chunks 8", mode(false, false, 8)),
        ("low", mode(true, true, 8)),
    ]
}

const MIB: f64 = 1024.0 * 1024.0;

/// The line a run prints when it starts: the planned peak of its step in micro-batches of
/// `batch` × `seq` tokens (per rank where `world` is more than one), and `command`, the `frugal
/// memory` call that plans each mode.
pub fn start_line(
    plan: &ModePlan,
    (batch, seq): (usize, usize),
    world: usize,
    command: &str,
) -> String {
    format!(
        "memory: planned peak {}{}; {command}",
        plan.describe(batch, seq),
        if world > 1 { " per rank" } else { "" },
    )
}

/// What a `device` that ran out of memory was asked for: the `planned` step, where it could be
/// planned, with the `command` that plans each mode; then what to change (`advice`).
pub fn out_of_memory_note(
    device: &candle_core::Device,
    planned: Option<&ModePlan>,
    (batch, seq): (usize, usize),
    command: &str,
    advice: &str,
) -> String {
    let needs = match planned {
        Some(plan) => format!("{} ({command})", plan.describe(batch, seq)),
        None => "more than the device has".into(),
    };
    format!(
        "{} ran out of memory; the run needs {needs}. {advice}",
        crate::device::name(device)
    )
}

impl MemoryReport {
    /// Plans the memory of `model` trained with `optimizer`: every weight, or with `lora` its
    /// adapters (and what else it trains).
    pub fn new(
        model: &LlamaConfig,
        optimizer: &OptimizerConfig,
        lora: Option<&DecoderLora>,
    ) -> Result<Self> {
        let shapes = model.trained_shapes(lora);
        let planned = plan(optimizer, &shapes)?;
        let infos: Vec<_> = planned.iter().map(|(i, _)| i.clone()).collect();
        let counts = RoleCounts::of(&infos);
        let (full_state, proj_state) = by_role(&planned);
        let class = |n: usize, state: StateBytes| ClassMemory {
            parameters: n,
            parameter_bytes: 4 * n,
            gradient_bytes: 4 * n,
            state,
        };
        let full = class(counts.state_full, full_state);
        let proj = class(counts.projectable, proj_state);
        let mut total_state = full_state;
        total_state += proj_state;
        let trained = full.parameters + proj.parameters;
        let adapters = lora.map_or(0, |l| l.adapter_count(model));
        let frozen = model.num_params() + adapters - trained;
        let frozen = ClassMemory {
            parameters: frozen,
            parameter_bytes: 4 * frozen,
            ..ClassMemory::default()
        };
        let total = ClassMemory {
            parameters: trained + frozen.parameters,
            parameter_bytes: 4 * (trained + frozen.parameters),
            ..class(trained, total_state)
        };
        let end_state = match optimizer.density_schedule {
            DensitySchedule::Constant => None,
            _ => {
                let end = OptimizerConfig {
                    density: optimizer.density_min,
                    density_schedule: DensitySchedule::Constant,
                    ..optimizer.clone()
                };
                let (mut sum, proj) = by_role(&plan(&end, &shapes)?);
                sum += proj;
                Some(sum)
            }
        };
        Ok(MemoryReport {
            state_full: full,
            projectable: proj,
            frozen,
            total,
            lora: lora.cloned(),
            end_state,
            steps: Vec::new(),
            adamw_normal_peak_bytes: None,
            state_per_rank: Vec::new(),
            split_tensors: Vec::new(),
        })
    }

    /// Plans the optimizer state of each of `world` data-parallel ranks (see
    /// [`frugal::sharding::plan_shards`]); the step peaks then count the largest share.
    pub fn with_world_size(
        mut self,
        model: &LlamaConfig,
        optimizer: &OptimizerConfig,
        world: usize,
    ) -> Result<Self> {
        if world < 2 {
            return Ok(self);
        }
        let shapes = model.trained_shapes(self.lora.as_ref());
        self.state_per_rank = frugal::sharding::state_per_rank(optimizer, &shapes, world)?;
        let plan = frugal::sharding::plan_shards(optimizer, &shapes, world)?;
        self.split_tensors = shapes
            .iter()
            .enumerate()
            .filter(|(i, _)| plan.pieces(*i).len() > 1)
            .map(|(_, p)| p.name.clone())
            .collect();
        Ok(self)
    }

    /// The optimizer state of the rank that holds the most (all of it in one process).
    fn largest_state(&self) -> usize {
        self.state_per_rank
            .iter()
            .map(|s| s.total())
            .max()
            .unwrap_or(self.total.state.total())
    }

    /// Adds the step plans of every memory mode for micro-batches of `batch` × `seq` tokens;
    /// `selected` (the run's mode) is listed too if it is not one of them.
    pub fn with_steps(
        mut self,
        model: &LlamaConfig,
        batch: usize,
        seq: usize,
        selected: StepMode,
    ) -> Result<Self> {
        let all = modes(selected);
        let fixed = self.total.parameter_bytes + self.largest_state();
        self.steps = ModePlan::of_modes(all, selected, fixed, |mode| {
            model.step_memory(batch, seq, mode, self.lora.as_ref())
        });
        let adamw = MemoryReport::new(model, &OptimizerConfig::preset("adamw")?, None)?;
        let normal = StepMode {
            grad_accum: selected.grad_accum,
            attention: selected.attention,
            kernels: selected.kernels,
            ..StepMode::default()
        };
        self.adamw_normal_peak_bytes = Some(
            adamw.total.parameter_bytes
                + adamw.total.state.total()
                + model.step_memory(batch, seq, normal, None).peak,
        );
        Ok(self)
    }

    /// Optimizer state in MiB.
    pub fn state_mib(&self) -> f64 {
        self.total.state.total() as f64 / MIB
    }

    /// Parameters, gradients and state together, in MiB.
    pub fn training_mib(&self) -> f64 {
        (self.total.parameter_bytes + self.total.gradient_bytes + self.total.state.total()) as f64
            / MIB
    }

    /// A plain-text table in MiB.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<12} {:>12} {:>10} {:>10} {:>12} {:>12} {:>10} {:>10}\n",
            "class", "parameters", "weights", "grads", "moments", "projections", "indices", "state"
        );
        let frozen = (self.frozen.parameters > 0).then_some(("frozen", &self.frozen));
        let classes = [
            Some(("state-full", &self.state_full)),
            Some(("projectable", &self.projectable)),
            frozen,
            Some(("total", &self.total)),
        ];
        for (name, c) in classes.into_iter().flatten() {
            out += &format!(
                "{:<12} {:>12} {:>10.1} {:>10.1} {:>12.1} {:>12.1} {:>10.2} {:>10.1}\n",
                name,
                c.parameters,
                c.parameter_bytes as f64 / MIB,
                c.gradient_bytes as f64 / MIB,
                c.state.moments as f64 / MIB,
                c.state.projections as f64 / MIB,
                c.state.indices as f64 / MIB,
                c.state.total() as f64 / MIB,
            );
        }
        if !self.state_per_rank.is_empty() {
            let shares: Vec<String> = self
                .state_per_rank
                .iter()
                .enumerate()
                .map(|(r, s)| format!("rank {r} {:.1}", s.total() as f64 / MIB))
                .collect();
            out += &format!(
                "state sharded over {} ranks (MiB): {} (of {:.1})\n",
                self.state_per_rank.len(),
                shares.join(", "),
                self.state_mib()
            );
            if !self.split_tensors.is_empty() {
                out += &format!(
                    "split into one piece per rank: {}\n",
                    self.split_tensors.join(", ")
                );
            }
        }
        if !self.steps.is_empty() {
            out += &format!(
                "\n{:<20} {:>12} {:>10} {:>10} {:>10}\n",
                "memory mode", "activations", "grads", "working", "peak"
            );
            for p in &self.steps {
                let mark = if p.selected { " *" } else { "" };
                out += &format!(
                    "{:<20} {:>12.1} {:>10.1} {:>10.1} {:>10.1}{mark}\n",
                    p.mode,
                    p.step.activations as f64 / MIB,
                    p.step.gradients as f64 / MIB,
                    p.step.working as f64 / MIB,
                    p.peak_bytes as f64 / MIB,
                );
            }
            if let Some(adamw) = self.adamw_normal_peak_bytes {
                out += &format!(
                    "{:<20} {:>12} {:>10} {:>10} {:>10.1}\n",
                    "adamw, normal",
                    "",
                    "",
                    "",
                    adamw as f64 / MIB
                );
            }
        }
        out
    }
}
