//! The training loop: batch → forward/backward (accumulated over micro-batches) → clip →
//! optimizer step → log → maybe evaluate → maybe checkpoint, until the last step or until the
//! caller's [`StopToken`] is set.

use crate::data_parallel::DataParallel;
use crate::grads::{accumulate, clip_factor, norm_in_name_order};
use crate::metrics::TrainRecord;
use crate::schedule::Schedule;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use frugal::{Frugal, Param};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Receives parameter gradients as a backward pass makes them.
pub type GradSink<'a> = dyn FnMut(GradStore) -> Result<()> + 'a;

/// A model the trainer can train.
pub trait Model {
    /// What a batch's inputs are: token ids (batch, seq) for a decoder, a padded
    /// [`EncoderBatch`](frugal_nn::encoder::EncoderBatch) for an encoder.
    type Input;
    /// Mean loss of a batch (a scalar tensor that backpropagates to the parameters).
    fn loss(&self, inputs: &Self::Input, targets: &Tensor) -> Result<Tensor>;
    /// The trainable parameters with their labels, in model order.
    fn params(&self) -> Vec<Param>;
    /// The loss of a batch, and its gradients (of the loss times `scale`) handed to `sink` in
    /// parts as the backward pass makes them, each parameter once. The default is one whole
    /// backward pass and one part; a layered model recomputes each layer from its saved input
    /// and hands over one layer at a time (activation checkpointing). A non-finite loss is a
    /// [`frugal_nn::Error::NonFiniteLoss`] before any gradient reaches `sink`.
    fn backward_by_layers(
        &self,
        inputs: &Self::Input,
        targets: &Tensor,
        scale: f64,
        sink: &mut GradSink<'_>,
    ) -> Result<f64> {
        let loss = self.loss(inputs, targets)?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(frugal_nn::Error::NonFiniteLoss { loss: value }.into());
        }
        let scaled = if scale == 1.0 { loss } else { (loss * scale)? };
        sink(scaled.backward()?)?;
        Ok(value as f64)
    }
}

impl Model for frugal_nn::llama::Llama {
    type Input = Tensor;

    fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor> {
        Ok(frugal_nn::llama::Llama::loss(self, inputs, targets)?)
    }

    fn params(&self) -> Vec<Param> {
        frugal_nn::llama::Llama::params(self)
    }

    fn backward_by_layers(
        &self,
        inputs: &Tensor,
        targets: &Tensor,
        scale: f64,
        sink: &mut GradSink<'_>,
    ) -> Result<f64> {
        let loss = frugal_nn::llama::Llama::backward_by_layers(self, inputs, targets, scale, sink)?;
        Ok(loss as f64)
    }
}

/// How the backward pass saves memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backward {
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward pass (see [`Model::backward_by_layers`]).
    pub checkpointing: bool,
    /// Update each layer's parameters as soon as its gradients exist, then free them: the
    /// whole gradient never exists. It runs the layered backward pass, so it recomputes the
    /// layers like `checkpointing`. Under gradient accumulation the micro-batches before the
    /// last keep whole accumulated gradients (no gradient memory is saved then); under
    /// clipping a first layered pass measures the global norm (one more forward and backward).
    pub per_layer_updates: bool,
}

impl Backward {
    /// What per-layer updates cost with `grad_accum` micro-batches per step and clipping at
    /// `clip` (0: off), to tell the user.
    pub fn notes(&self, grad_accum: usize, clip: f64) -> Vec<String> {
        let mut notes = Vec::new();
        if self.per_layer_updates && grad_accum > 1 {
            notes.push(format!(
                "per-layer updates with --grad-accum {grad_accum}: the first {} micro-batches keep whole summed gradients (no gradient memory is saved); the last one updates layer by layer",
                grad_accum - 1
            ));
        }
        if self.per_layer_updates && clip > 0.0 {
            notes.push(format!(
                "per-layer updates with --clip {clip}: a first layer-by-layer pass measures the global gradient norm before any update (one more forward and backward per step)"
            ));
        }
        notes
    }
}

/// A source of training batches, addressed by position in the data order (so that a resumed
/// run continues with the very batch it would have seen).
pub trait BatchSource<I = Tensor> {
    /// `size` (inputs, targets) pairs starting at sample `position`.
    fn batch(&mut self, position: u64, size: usize) -> Result<(I, Tensor)>;
}

/// Asks a running loop to stop at the next step boundary (after a checkpoint). The caller owns
/// it: a Ctrl-C handler, a test, or a comparison that stops all its runs.
#[derive(Clone, Debug, Default)]
pub struct StopToken(Arc<AtomicBool>);

impl StopToken {
    /// A token that is not set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the loop to stop.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// True once [`StopToken::stop`] was called on this token or a clone of it.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Where the training loop stands; saved with every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Completed optimizer steps.
    pub step: usize,
    /// Training sequences consumed by all ranks (position in the shuffled data order).
    pub position: u64,
    /// Training tokens consumed by all ranks.
    pub tokens: u64,
    /// Wall time so far, over all sessions (including evaluation and checkpoints).
    pub elapsed_s: f64,
    /// Time spent in training steps alone, over all sessions.
    #[serde(default)]
    pub train_s: f64,
}

/// How many steps, how big, and how often to log, evaluate and save.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopSettings {
    pub steps: usize,
    /// Pause after this step (evaluating and saving a checkpoint there) without changing the
    /// schedule of `steps`; a resumed loop continues from it.
    pub stop_after: Option<usize>,
    /// Sequences per micro-batch (per rank under data parallelism).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per sequence (for token counts).
    pub seq_len: usize,
    /// Global gradient-norm bound (0: off).
    pub clip: f64,
    /// Activation checkpointing and per-layer updates.
    pub backward: Backward,
    pub log_every: usize,
    /// Evaluate every N steps and after the last (0: after the last only).
    pub eval_every: usize,
    /// Save a checkpoint every N steps, after the last and when stopped (0: after the last and
    /// when stopped only).
    pub save_every: usize,
}

impl LoopSettings {
    /// Training tokens per optimizer step of one rank.
    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.seq_len
    }
}

/// True when `step` is a multiple of `every` (never for 0).
fn due(step: usize, every: usize) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// What the loop reports to: every step, logged steps, evaluations and checkpoints.
pub trait Hooks<M> {
    /// After every step (progress display).
    fn step_done(&mut self, _record: &TrainRecord) {}
    /// A step to log (every `log_every` steps and the last).
    fn log(&mut self, record: &TrainRecord) -> Result<()>;
    /// Evaluate the model (every `eval_every` steps and the last).
    fn evaluate(&mut self, model: &M, state: &TrainerState) -> Result<()>;
    /// Save a checkpoint (every `save_every` steps, the last, and when stopped). Every rank of
    /// a data-parallel run calls it, each holding its shard of the optimizer state:
    /// [`crate::checkpoint::save_with`] saves them all.
    fn checkpoint(&mut self, trainer: &Trainer<M>, stopped: bool) -> Result<()>;
}

/// How a call of [`Trainer::train`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every step ran.
    Finished,
    /// The stop token was set; a checkpoint was saved.
    Stopped,
    /// The loop reached `stop_after`; it was evaluated and a checkpoint was saved.
    Paused,
}

/// The error of a training loss that is not finite at step `step` + 1.
fn diverged(loss: f64, step: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "the training loss became {loss} at step {}; lower --lr or set --clip",
        step + 1
    )
}

/// Fails on a non-finite training loss of step `step` + 1.
fn check_loss(loss: f64, step: usize) -> Result<()> {
    if !loss.is_finite() {
        return Err(diverged(loss, step));
    }
    Ok(())
}

/// The error of a layered pass of step `step` + 1, naming the step when the loss was not finite.
fn layered_error(e: anyhow::Error, step: usize) -> anyhow::Error {
    match e.downcast_ref::<frugal_nn::Error>() {
        Some(frugal_nn::Error::NonFiniteLoss { loss }) => diverged(*loss as f64, step),
        _ => e,
    }
}

/// An optimizer error of step `step` + 1, naming the step when a gradient was not finite.
fn step_error(e: frugal::Error, step: usize) -> anyhow::Error {
    match e {
        frugal::Error::NonFiniteGradient { .. } => anyhow::anyhow!("{e} at step {}", step + 1),
        e => e.into(),
    }
}

/// Fails on the first `(name, value)` whose value is 0, naming it.
pub fn at_least_one(counts: &[(&str, usize)]) -> Result<()> {
    match counts.iter().find(|(_, v)| *v == 0) {
        Some((name, _)) => bail!("{name} must be at least 1"),
        None => Ok(()),
    }
}

/// A model, its optimizer and schedule, and the loop state.
pub struct Trainer<M> {
    pub model: M,
    pub optimizer: Frugal,
    pub schedule: Schedule,
    pub settings: LoopSettings,
    pub state: TrainerState,
    params: Vec<Param>,
    stop: StopToken,
    parallel: DataParallel,
    /// Wall time of earlier sessions and the start of this one.
    clock: (f64, Instant),
}

impl<M: Model> Trainer<M> {
    /// A trainer continuing from `state` (the default state for a new run).
    pub fn new(
        model: M,
        optimizer: Frugal,
        schedule: Schedule,
        settings: LoopSettings,
        state: TrainerState,
        stop: StopToken,
    ) -> Result<Self> {
        at_least_one(&[
            ("steps", settings.steps),
            ("batch_size", settings.batch_size),
            ("grad_accum", settings.grad_accum),
            ("log_every", settings.log_every),
        ])?;
        Ok(Trainer {
            params: model.params(),
            clock: (state.elapsed_s, Instant::now()),
            model,
            optimizer,
            schedule,
            settings,
            state,
            stop,
            parallel: DataParallel::default(),
        })
    }

    /// Trains as one of the ranks of `parallel`: each rank reads its share of every global
    /// batch, gradients and losses are averaged across the ranks, and the ranks stop together.
    /// With more than one rank the optimizer becomes this rank's shard (see
    /// [`Frugal::shard_evenly`]): it keeps the state of, and updates, its share of the
    /// parameters, and the ranks exchange the updated values after every step.
    pub fn with_data_parallel(mut self, parallel: DataParallel) -> Result<Self> {
        let (rank, world) = (parallel.rank(), parallel.world_size());
        self.parallel = match world {
            1 => parallel,
            _ => parallel.with_shards(self.optimizer.shard_evenly(rank, world)?),
        };
        Ok(self)
    }

    /// Runs steps until the last one or until the stop token is set.
    pub fn train(
        &mut self,
        data: &mut impl BatchSource<M::Input>,
        hooks: &mut impl Hooks<M>,
    ) -> Result<Outcome> {
        let s = self.settings;
        self.clock = (self.state.elapsed_s, Instant::now());
        while self.state.step < s.steps {
            if s.stop_after.is_some_and(|k| self.state.step >= k) {
                return Ok(Outcome::Paused);
            }
            let record = self.step(data)?; // forward, backward, update
            let (step, last) = (self.state.step, self.state.step == s.steps);
            let paused = s.stop_after == Some(step);
            hooks.step_done(&record);
            if step % s.log_every == 0 || last {
                hooks.log(&record)?;
            }
            if due(step, s.eval_every) || last || paused {
                hooks.evaluate(&self.model, &self.state)?;
            }
            let stopped = self.parallel.any(self.stop.is_stopped());
            if stopped || paused || due(step, s.save_every) || last {
                hooks.checkpoint(self, stopped)?;
            }
            if stopped {
                return Ok(Outcome::Stopped);
            }
        }
        Ok(Outcome::Finished)
    }

    /// One optimizer step: gradients of `grad_accum` micro-batches, clipping, the update.
    pub fn step(&mut self, data: &mut impl BatchSource<M::Input>) -> Result<TrainRecord> {
        let t0 = Instant::now();
        let lr = self.schedule.lr(self.state.step);
        self.optimizer.set_learning_rate(lr);
        let (loss, grad_norm) = if self.settings.backward.per_layer_updates {
            self.step_by_layers(data)?
        } else {
            self.step_whole(data)?
        };
        self.parallel.share_updates(&self.params)?;
        self.optimizer.observe_loss(loss);
        let tokens = self.settings.tokens_per_step() * self.parallel.world_size();
        let dt = t0.elapsed().as_secs_f64();
        let st = &mut self.state;
        st.step += 1;
        st.tokens += tokens as u64;
        st.train_s += dt;
        st.elapsed_s = self.clock.0 + self.clock.1.elapsed().as_secs_f64();
        Ok(TrainRecord {
            step: st.step,
            loss,
            lr,
            tokens: st.tokens,
            tok_per_s: tokens as f64 / dt,
            elapsed_s: st.elapsed_s,
            grad_norm,
        })
    }

    /// The step from the whole gradient: loss and global norm (when clipping).
    fn step_whole(&mut self, data: &mut impl BatchSource<M::Input>) -> Result<(f64, Option<f64>)> {
        let (loss, mut grads) = self.forward_backward(data)?;
        let loss = self.parallel.mean(loss);
        check_loss(loss, self.state.step)?;
        self.parallel.average(&mut grads, &self.params)?;
        let clip = self.settings.clip;
        let grad_norm = if clip > 0.0 {
            Some(
                self.parallel
                    .clip_grad_norm(&mut grads, &self.params, clip)?,
            )
        } else {
            None
        };
        let stepped = match grad_norm {
            // A finite global norm proves every gradient finite: the optimizer's own pass over
            // the gradients is skipped.
            Some(norm) if norm.is_finite() => self.optimizer.step_finite_grads(&grads),
            _ => self.optimizer.step_grads(&grads),
        };
        stepped.map_err(|e| step_error(e, self.state.step))?;
        Ok((loss, grad_norm))
    }

    /// The step with per-layer updates: each layer of the last micro-batch's layered backward
    /// pass is updated (with the earlier micro-batches' sums added, and clipped by a global
    /// norm measured in a first pass) as soon as its gradients exist.
    fn step_by_layers(
        &mut self,
        data: &mut impl BatchSource<M::Input>,
    ) -> Result<(f64, Option<f64>)> {
        let accum = self.settings.grad_accum;
        let scale = 1.0 / accum as f64;
        let mut acc = GradStore::default();
        let mut loss_sum = 0.0f64;
        let step = self.state.step;
        for _ in 1..accum {
            let (x, y) = self.next_batch(data)?;
            let params = &self.params;
            loss_sum += self
                .model
                .backward_by_layers(&x, &y, scale, &mut |g| Ok(accumulate(&mut acc, g, params)?))
                .map_err(|e| layered_error(e, step))?;
        }
        let (x, y) = self.next_batch(data)?;
        let (params, parallel) = (&self.params, &self.parallel);
        let clip = self.settings.clip;
        let grad_norm = if clip > 0.0 {
            let mut squares = Vec::with_capacity(params.len());
            self.model
                .backward_by_layers(&x, &y, scale, &mut |g| {
                    let mut totals = GradStore::default();
                    for p in params {
                        if let Some(g) = g.get(p.var.as_tensor()) {
                            let total = match acc.get(p.var.as_tensor()) {
                                Some(prev) => (prev + g)?,
                                None => g.clone(),
                            };
                            totals.insert(p.var.as_tensor(), total);
                        }
                    }
                    parallel.average(&mut totals, params)?;
                    squares.extend(parallel.squared_norms(&totals, params)?);
                    Ok(())
                })
                .map_err(|e| layered_error(e, step))?;
            Some(norm_in_name_order(squares))
        } else {
            None
        };
        let factor = grad_norm.and_then(|norm| clip_factor(norm, clip));
        let optimizer = &mut self.optimizer;
        optimizer.begin_step()?;
        let last = self.model.backward_by_layers(&x, &y, scale, &mut |mut g| {
            let mut part = GradStore::default();
            for p in params {
                let v = p.var.as_tensor();
                if let Some(g) = g.remove(v) {
                    let total = match acc.remove(v) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    part.insert(v, total);
                }
            }
            parallel.average(&mut part, params)?;
            if let Some(f) = factor {
                for p in params {
                    let v = p.var.as_tensor();
                    if let Some(total) = part.remove(v) {
                        part.insert(v, (total * f)?);
                    }
                }
            }
            optimizer.step_part(&part).map_err(|e| step_error(e, step))
        });
        let finished = last.map_err(|e| layered_error(e, step)).and_then(|loss| {
            self.optimizer.finish_step()?;
            Ok(loss)
        });
        let loss = self.parallel.mean((loss_sum + finished?) / accum as f64);
        check_loss(loss, step)?;
        Ok((loss, grad_norm))
    }

    /// Mean loss and summed gradients of `grad_accum` micro-batches (each loss scaled by
    /// 1/grad_accum, so the gradients are those of the mean).
    fn forward_backward(
        &mut self,
        data: &mut impl BatchSource<M::Input>,
    ) -> Result<(f64, GradStore)> {
        let accum = self.settings.grad_accum;
        let mut grads = GradStore::default();
        let mut loss_sum = 0.0f64;
        for _ in 0..accum {
            let (x, y) = self.next_batch(data)?;
            if self.settings.backward.checkpointing {
                let params = &self.params;
                loss_sum += self
                    .model
                    .backward_by_layers(&x, &y, 1.0 / accum as f64, &mut |g| {
                        Ok(accumulate(&mut grads, g, params)?)
                    })
                    .map_err(|e| layered_error(e, self.state.step))?;
                continue;
            }
            let loss = self.model.loss(&x, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let scaled = if accum > 1 {
                (loss / accum as f64)?
            } else {
                loss
            };
            accumulate(&mut grads, scaled.backward()?, &self.params)?;
        }
        Ok((loss_sum / accum as f64, grads))
    }

    /// This rank's share of the next micro-batch: the global micro-batch holds `batch_size`
    /// sequences per rank, in rank order.
    fn next_batch(&mut self, data: &mut impl BatchSource<M::Input>) -> Result<(M::Input, Tensor)> {
        let size = self.settings.batch_size;
        let p = &self.parallel;
        let start = self.state.position + (p.rank() * size) as u64;
        self.state.position += (p.world_size() * size) as u64;
        data.batch(start, size)
    }

    /// The ranks this trainer is one of (one process unless [`Trainer::with_data_parallel`]).
    pub fn parallel(&self) -> &DataParallel {
        &self.parallel
    }

    /// The stop token this trainer watches.
    pub fn stop_token(&self) -> &StopToken {
        &self.stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use frugal::Engine;

    /// Least squares: loss = mean((x·w − y)²), w of 4 weights (one 1×4 matrix).
    struct Regression {
        w: Var,
    }

    impl Model for Regression {
        type Input = Tensor;

        fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
            let pred = x.matmul(&self.w.as_tensor().t()?)?.squeeze(1)?;
            Ok((pred - y)?.sqr()?.mean_all()?)
        }
        fn params(&self) -> Vec<Param> {
            vec![Param::new(
                "w",
                self.w.clone(),
                frugal::Label::state_full(None),
            )]
        }
    }

    /// Sample i: x = (1, i, i², i³)/scale, y = x·(1, −2, 3, 0.5).
    struct Samples;

    impl BatchSource for Samples {
        fn batch(&mut self, position: u64, size: usize) -> Result<(Tensor, Tensor)> {
            let mut xs = Vec::new();
            let mut ys = Vec::new();
            for i in position..position + size as u64 {
                let t = (i % 7) as f32 / 7.0;
                let x = [1.0, t, t * t, t * t * t];
                ys.push(x[0] - 2.0 * x[1] + 3.0 * x[2] + 0.5 * x[3]);
                xs.extend(x);
            }
            Ok((
                Tensor::from_vec(xs, (size, 4), &Device::Cpu)?,
                Tensor::from_vec(ys, size, &Device::Cpu)?,
            ))
        }
    }

    #[derive(Default)]
    struct Calls {
        logged: Vec<usize>,
        evaluated: Vec<usize>,
        saved: Vec<(usize, bool)>,
        losses: Vec<f64>,
    }

    impl Hooks<Regression> for Calls {
        fn log(&mut self, r: &TrainRecord) -> Result<()> {
            self.logged.push(r.step);
            Ok(())
        }
        fn step_done(&mut self, r: &TrainRecord) {
            self.losses.push(r.loss);
        }
        fn evaluate(&mut self, _: &Regression, s: &TrainerState) -> Result<()> {
            self.evaluated.push(s.step);
            Ok(())
        }
        fn checkpoint(&mut self, t: &Trainer<Regression>, stopped: bool) -> Result<()> {
            self.saved.push((t.state.step, stopped));
            Ok(())
        }
    }

    /// The regression weights.
    fn w(t: &Trainer<Regression>) -> Vec<f32> {
        t.model
            .w
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn trainer(steps: usize, batch: usize, accum: usize, stop: StopToken) -> Trainer<Regression> {
        let w = Var::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let model = Regression { w };
        let cfg = frugal::OptimizerConfig::parse_spec("sgd:lr=0.5").unwrap();
        let opt = Frugal::from_params(model.params(), cfg).unwrap();
        let settings = LoopSettings {
            steps,
            stop_after: None,
            batch_size: batch,
            grad_accum: accum,
            seq_len: 1,
            clip: 0.0,
            backward: Backward::default(),
            log_every: 2,
            eval_every: 3,
            save_every: 4,
        };
        let schedule = Schedule::new(0.5, 0, steps, "constant", 1.0).unwrap();
        Trainer::new(
            model,
            opt,
            schedule,
            settings,
            TrainerState::default(),
            stop,
        )
        .unwrap()
    }

    #[test]
    fn the_loop_calls_its_hooks_on_schedule_and_the_loss_falls() {
        let mut t = trainer(12, 4, 1, StopToken::new());
        let (x, y) = Samples.batch(0, 7).unwrap(); // every distinct sample once
        let full_loss =
            |t: &Trainer<Regression>| t.model.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
        let before = full_loss(&t);
        let mut calls = Calls::default();
        assert_eq!(
            t.train(&mut Samples, &mut calls).unwrap(),
            Outcome::Finished
        );
        let after = full_loss(&t);
        assert!(after < 0.5 * before, "loss {before} → {after}");
        assert_eq!(calls.logged, [2, 4, 6, 8, 10, 12]);
        assert_eq!(calls.evaluated, [3, 6, 9, 12]);
        assert_eq!(calls.saved, [(4, false), (8, false), (12, false)]);
        assert_eq!(calls.losses.len(), 12);
        assert_eq!(
            (t.state.step, t.state.position, t.state.tokens),
            (12, 48, 48)
        );
    }

    #[test]
    fn every_zero_steps_means_after_the_last_only() {
        let mut t = trainer(5, 4, 1, StopToken::new());
        (t.settings.eval_every, t.settings.save_every) = (0, 0);
        let mut calls = Calls::default();
        t.train(&mut Samples, &mut calls).unwrap();
        assert_eq!(calls.evaluated, [5]);
        assert_eq!(calls.saved, [(5, false)]);
        // A stop still saves.
        let stop = StopToken::new();
        let mut t = trainer(5, 4, 1, stop.clone());
        (t.settings.eval_every, t.settings.save_every) = (0, 0);
        stop.stop();
        let mut calls = Calls::default();
        assert_eq!(t.train(&mut Samples, &mut calls).unwrap(), Outcome::Stopped);
        assert_eq!(calls.saved, [(1, true)]);
    }

    #[test]
    fn accumulated_micro_batches_step_like_one_large_batch() {
        let mut one = trainer(1, 4, 1, StopToken::new());
        let mut two = trainer(1, 2, 2, StopToken::new());
        let a = one.step(&mut Samples).unwrap();
        let b = two.step(&mut Samples).unwrap();
        assert!((a.loss - b.loss).abs() < 1e-6);
        for (x, y) in w(&one).iter().zip(w(&two)) {
            assert!((x - y).abs() < 1e-6, "{:?} vs {:?}", w(&one), w(&two));
        }
        assert_eq!(two.state.position, 4);
    }

    #[test]
    fn a_set_stop_token_ends_the_loop_after_a_checkpoint() {
        let stop = StopToken::new();
        let mut t = trainer(10, 4, 1, stop.clone());
        stop.stop();
        let mut calls = Calls::default();
        assert_eq!(t.train(&mut Samples, &mut calls).unwrap(), Outcome::Stopped);
        assert_eq!(calls.saved, [(1, true)]);
        assert!(t.stop_token().is_stopped());
    }

    #[test]
    fn a_paused_loop_evaluates_and_saves_then_continues_like_an_unbroken_one() {
        let mut straight = trainer(12, 4, 1, StopToken::new());
        straight.train(&mut Samples, &mut Calls::default()).unwrap();
        let mut paused = trainer(12, 4, 1, StopToken::new());
        paused.settings.stop_after = Some(5);
        let mut calls = Calls::default();
        assert_eq!(
            paused.train(&mut Samples, &mut calls).unwrap(),
            Outcome::Paused
        );
        assert_eq!(paused.state.step, 5);
        assert_eq!(calls.evaluated, [3, 5]);
        assert_eq!(calls.saved, [(4, false), (5, false)]);
        // Asked again with the same pause point, it stays put.
        assert_eq!(
            paused.train(&mut Samples, &mut calls).unwrap(),
            Outcome::Paused
        );
        assert_eq!(paused.state.step, 5);
        paused.settings.stop_after = None;
        assert_eq!(
            paused.train(&mut Samples, &mut calls).unwrap(),
            Outcome::Finished
        );
        assert_eq!(w(&paused), w(&straight));
        assert_eq!(calls.evaluated, [3, 5, 6, 9, 12]);
    }

    /// Token windows of a micro LLaMA: sample i is a fixed pseudo-random sequence.
    struct Tokens;

    impl BatchSource for Tokens {
        fn batch(&mut self, position: u64, size: usize) -> Result<(Tensor, Tensor)> {
            let t = 8;
            let seq = |i: u64| -> Vec<u32> {
                (0..=t as u64)
                    .map(|j| ((i * 31 + j * 7 + i * j) % 50) as u32)
                    .collect()
            };
            let (mut xs, mut ys) = (Vec::<u32>::new(), Vec::<u32>::new());
            for i in position..position + size as u64 {
                let s = seq(i);
                xs.extend(&s[..t]);
                ys.extend(&s[1..]);
            }
            Ok((
                Tensor::from_vec(xs, (size, t), &Device::Cpu)?,
                Tensor::from_vec(ys, (size, t), &Device::Cpu)?,
            ))
        }
    }

    /// Losses, gradient norms and final weights of 3 steps of a micro LLaMA.
    fn llama_run(
        spec: &str,
        accum: usize,
        clip: f64,
        backward: Backward,
        engine: frugal::Engine,
    ) -> (Vec<f64>, Vec<Option<f64>>, Vec<Vec<f32>>) {
        use frugal_nn::llama::{Llama, LlamaConfig};
        let config = LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_attention_heads: 4,
            num_hidden_layers: 2,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 16,
        };
        let model = Llama::init(&config, 1, &Device::Cpu, candle_core::DType::F32).unwrap();
        let cfg = frugal::OptimizerConfig::parse_spec(spec).unwrap();
        let mut opt = Frugal::from_params(model.params(), cfg).unwrap();
        opt.set_engine(engine).unwrap();
        let settings = LoopSettings {
            steps: 3,
            stop_after: None,
            batch_size: 4 / accum,
            grad_accum: accum,
            seq_len: 8,
            clip,
            backward,
            log_every: 1,
            eval_every: 3,
            save_every: 3,
        };
        let schedule = Schedule::new(1e-2, 0, 3, "constant", 1.0).unwrap();
        let mut t = Trainer::new(
            model,
            opt,
            schedule,
            settings,
            TrainerState::default(),
            StopToken::new(),
        )
        .unwrap();
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let r = t.step(&mut Tokens).unwrap();
            losses.push(r.loss);
            norms.push(r.grad_norm);
        }
        let weights = t
            .model
            .params()
            .iter()
            .map(|p| p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        (losses, norms, weights)
    }

    #[test]
    fn layered_backward_and_per_layer_updates_train_like_the_whole_step() {
        let checkpointing = Backward {
            checkpointing: true,
            per_layer_updates: false,
        };
        let per_layer = Backward {
            checkpointing: false,
            per_layer_updates: true,
        };
        // T = 2: the subspaces change inside the run; a small clip bound clips every step.
        for spec in ["frugal-svd:update_gap=2", "frugal:update_gap=2", "adamw"] {
            for (accum, clip) in [(1, 0.0), (2, 0.0), (1, 0.05), (2, 0.05)] {
                let whole = llama_run(spec, accum, clip, Backward::default(), Engine::Fused);
                assert!(
                    whole.0[2] < whole.0[0],
                    "{spec}: the loss must fall: {:?}",
                    whole.0
                );
                if clip > 0.0 {
                    assert!(whole.1.iter().all(|n| n.unwrap() > clip), "{:?}", whole.1);
                }
                for backward in [checkpointing, per_layer] {
                    let run = llama_run(spec, accum, clip, backward, Engine::Fused);
                    assert_eq!(
                        run, whole,
                        "{spec}, accum {accum}, clip {clip}, {backward:?}"
                    );
                }
            }
        }
    }

    /// The trainer with the optimizer's tensor engine (its path on GPUs), here on the CPU:
    /// whole steps, per-layer updates and clipping give the fused engine's losses and weights
    /// to f32 rounding.
    #[test]
    fn the_tensor_engine_trains_like_the_fused_one() {
        let per_layer = Backward {
            checkpointing: false,
            per_layer_updates: true,
        };
        for spec in [
            "frugal-svd:update_gap=2,svd_solver=randomized",
            "frugal:update_gap=2",
            "adamw",
        ] {
            for (backward, clip) in [(Backward::default(), 0.0), (per_layer, 0.05)] {
                let fused = llama_run(spec, 2, clip, backward, Engine::Fused);
                let tensors = llama_run(spec, 2, clip, backward, Engine::Tensors);
                for (a, b) in fused.0.iter().zip(&tensors.0) {
                    assert!((a - b).abs() < 1e-5 * a.abs(), "{spec}: loss {a} vs {b}");
                }
                let d = fused
                    .2
                    .iter()
                    .flatten()
                    .zip(tensors.2.iter().flatten())
                    .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
                assert!(d < 1e-5, "{spec}, {backward:?}: weights differ by {d}");
            }
        }
    }
}
