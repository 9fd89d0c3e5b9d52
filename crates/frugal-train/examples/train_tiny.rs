//! Trains the `tiny` LLaMA on the embedded corpus through the library API: data, model, labelled
//! parameters, FRUGAL, and the Trainer with hooks of our own.
//!
//! `cargo run --release -p frugal-train --example train_tiny`

use anyhow::Result;
use candle_core::{DType, Device};
use frugal::{Frugal, OptimizerConfig};
use frugal_nn::llama::{Llama, LlamaConfig};
use frugal_train::data::{
    default_cache_dir, Batches, Dataset, Format, Holdout, Source, TokenizerChoice,
};
use frugal_train::eval::mean_loss;
use frugal_train::metrics::TrainRecord;
use frugal_train::schedule::Schedule;
use frugal_train::trainer::{Hooks, LoopSettings, StopToken, Trainer, TrainerState};

/// Prints logged steps and validation perplexity; keeps no checkpoints.
struct Print<'a> {
    val: Batches<'a>,
}

impl Hooks<Llama> for Print<'_> {
    fn log(&mut self, r: &TrainRecord) -> Result<()> {
        println!(
            "step {:3}  loss {:.4}  lr {:.2e}  {:.0} tok/s",
            r.step, r.loss, r.lr, r.tok_per_s
        );
        Ok(())
    }

    fn evaluate(&mut self, model: &Llama, state: &TrainerState) -> Result<()> {
        let loss = mean_loss(model, &self.val, 8, 64, 8192, &Default::default())?;
        println!(
            "step {:3}  validation perplexity {:.1}",
            state.step,
            loss.exp()
        );
        Ok(())
    }

    fn checkpoint(&mut self, _: &Trainer<Llama>, _: bool) -> Result<()> {
        Ok(())
    }
}

fn main() -> Result<()> {
    // One worker pool for candle, the fused operations and the optimizer (all cores).
    frugal_train::threads::limit_elementwise_spinning();
    frugal_train::threads::in_pool(Default::default(), 1, train_tiny)
}

fn train_tiny() -> Result<()> {
    let device = Device::Cpu;
    let source = Source::resolve(frugal_train::settings::EMBEDDED_NAME)?;
    let data = Dataset::prepare(
        &source,
        TokenizerChoice::Train(4096),
        Holdout::validation(0.05),
        Format::Packed,
        &default_cache_dir(),
    )?;
    let mut train = Batches::new(&data.train, 64, 0, "training", &device)?;
    let val = Batches::new(&data.val, 64, 0, "validation", &device)?;

    let config = LlamaConfig::builtin("tiny").expect("built-in model");
    let model = Llama::init(&config, 0, &device, DType::F32)?;
    // FRUGAL: a quarter of the linears' blocks keep Adam state, the rest take signSGD steps.
    let optimizer = Frugal::from_params(
        model.params(),
        OptimizerConfig::parse_spec("frugal:update_gap=50")?,
    )?;
    println!("{} parameters", config.num_params());

    let steps = 150;
    let settings = LoopSettings {
        steps,
        stop_after: None,
        batch_size: 8,
        grad_accum: 1,
        seq_len: 64,
        clip: 1.0,
        backward: Default::default(),
        log_every: 25,
        eval_every: 75,
        save_every: steps,
    };
    let schedule = Schedule::new(2e-3, 15, steps, "cosine", 0.1)?;
    let mut trainer = Trainer::new(
        model,
        optimizer,
        schedule,
        settings,
        TrainerState::default(),
        StopToken::new(),
    )?;
    trainer.train(&mut train, &mut Print { val })?;
    let state = trainer.optimizer.state_bytes().total() as f64 / (1 << 20) as f64;
    println!(
        "optimizer state {state:.2} MiB (AdamW would hold {:.2} MiB)",
        8.0 * config.num_params() as f64 / (1 << 20) as f64
    );
    Ok(())
}
