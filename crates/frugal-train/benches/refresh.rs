//! Subspace-refresh benchmark on real gradients of the 60M LLaMA: the optimizer's refresh with
//! the exact SVD of every projectable weight against the randomized solver, warm-started from the
//! basis of an earlier gradient (as at a refresh T steps later) or cold.
//!
//! The gradients come from the embedded corpus (batch 4 × 256) after a few AdamW steps. Each
//! optimizer (`frugal-svd`, update gap 2) takes the earlier gradient (first refresh), then the
//! later one twice: a steady step and a refresh step. The refresh costs the difference. It
//! prints that cost for the 56 matrices, the speed-up over the exact SVD in the same run, and the
//! captured gradient energy ‖down(G)‖² as a share of the exact top-r energy (over the whole set,
//! and the lowest single matrix). A last line times the exact SVDs one tensor at a time.
//!
//! Run: `cargo bench -p frugal-train --bench refresh` (about a minute of set-up: data and
//! gradients; `-- --quick` times each solver once). `FRUGAL_BENCH_MODEL` picks another built-in
//! model (`130m`, `350m`); `FRUGAL_BENCH_DEVICE=cuda` (a build with `--features cuda`) runs the
//! model and the optimizer on GPU 0, where the randomized solver's products run on the device
//! and the exact SVD on the host.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device};
use frugal::config::ProjSide;
use frugal::projection::{matrix_ranks, Basis, RankRule, Subspace};
use frugal::{Frugal, OptimizerConfig, Role};
use frugal_nn::llama::{Llama, LlamaConfig};
use frugal_train::data::{
    default_cache_dir, Batches, Dataset, Format, Holdout, Source, TokenizerChoice,
};
use frugal_train::settings::EMBEDDED_NAME;
use std::time::Instant;

/// AdamW steps before the first gradient is kept, and between the two kept gradients.
const WARMUP: usize = 3;
const GAP: usize = 3;

/// The gradients of every parameter of `model` on one batch, after which AdamW steps.
fn gradients(model: &Llama, opt: &mut Frugal, data: &mut Batches, step: u64) -> Result<GradStore> {
    let (x, y) = data.shuffled(step * 4, 4)?;
    let grads = model.loss(&x, &y)?.backward()?;
    opt.step_grads(&grads)?;
    Ok(grads)
}

fn time_ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1e3)
}

/// Milliseconds of one optimizer step, until the device has finished it.
fn timed_step(opt: &mut Frugal, grads: &GradStore, device: &Device) -> Result<f64> {
    let (done, ms) = time_ms(|| -> Result<()> {
        opt.step_grads(grads)?;
        Ok(device.synchronize()?)
    });
    done.map(|()| ms)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// A projectable weight's gradient (m×n) now, and its exact top-r energy.
struct Matrix {
    name: String,
    m: usize,
    n: usize,
    g: Vec<f32>,
    top: f64,
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 1 } else { 3 };
    let device = match std::env::var("FRUGAL_BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0)?,
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => anyhow::bail!("FRUGAL_BENCH_DEVICE={other}: expected cpu or cuda"),
    };
    let model_name = std::env::var("FRUGAL_BENCH_MODEL").unwrap_or_else(|_| "60m".into());
    let source = Source::resolve(EMBEDDED_NAME)?;
    let data = Dataset::prepare(
        &source,
        TokenizerChoice::Train(4096),
        Holdout::validation(0.05),
        Format::Packed,
        &default_cache_dir(),
    )?;
    let mut batches = Batches::new(&data.train, 256, 0, "training", &device)?;
    let config = LlamaConfig::builtin(&model_name)
        .ok_or_else(|| anyhow::anyhow!("FRUGAL_BENCH_MODEL={model_name}: not a built-in model"))?;
    let model = Llama::init(&config, 0, &device, DType::F32)?;
    let mut adamw = Frugal::from_params(model.params(), OptimizerConfig::parse_spec("adamw")?)?;
    let mut earlier = None;
    let mut now = None;
    for step in 0..(WARMUP + GAP + 1) as u64 {
        let g = gradients(&model, &mut adamw, &mut batches, step)?;
        if step == WARMUP as u64 {
            earlier = Some(g);
        } else if step == (WARMUP + GAP) as u64 {
            now = Some(g);
        }
    }
    let (earlier, now) = (earlier.expect("kept"), now.expect("kept"));
    let ranks = RankRule::from_density(0.25);
    let mut matrices = Vec::new();
    for p in model.params() {
        if p.label.role != Role::Projectable {
            continue;
        }
        let (m, n) = (p.var.dims()[0], p.var.dims()[1]);
        let g = now.get(&p.var).expect("every weight has a gradient");
        let g = g.flatten_all()?.to_vec1::<f32>()?;
        let (l, r) = matrix_ranks(ProjSide::Std, m, n, ranks);
        matrices.push(Matrix {
            top: Basis::svd(&g, m, n, l, r, &p.name)?.captured_energy(&g),
            name: p.name.clone(),
            m,
            n,
            g,
        });
    }
    let numel: usize = matrices.iter().map(|x| x.m * x.n).sum();
    let top_sum: f64 = matrices.iter().map(|x| x.top).sum();
    println!(
        "{model_name} LLaMA on {:?}, {} projectable matrices ({numel} values), rank = round(0.25·min side), gradients after {WARMUP} and {} AdamW steps, {} threads",
        device.location(),
        matrices.len(),
        WARMUP + GAP,
        rayon::current_num_threads()
    );
    println!(
        "\n{:<44} {:>10} {:>9} {:>10} {:>10}",
        "refresh of all matrices", "ms", "speed-up", "energy", "lowest"
    );
    let sequential_ms = median(
        (0..reps)
            .map(|_| {
                time_ms(|| {
                    for x in &matrices {
                        let (l, r) = matrix_ranks(ProjSide::Std, x.m, x.n, ranks);
                        std::hint::black_box(Basis::svd(&x.g, x.m, x.n, l, r, &x.name).ok());
                    }
                })
                .1
            })
            .collect(),
    );
    let mut exact_ms = f64::NAN;
    for (label, settings) in [
        ("exact SVD (faer)", "svd_solver=exact"),
        (
            "randomized p=8 q=1 (the default), warm",
            "svd_solver=randomized",
        ),
        (
            "randomized p=8 q=0, warm",
            "svd_solver=randomized,power_iters=0",
        ),
        (
            "randomized p=16 q=2, warm",
            "svd_solver=randomized,power_iters=2,oversample=16",
        ),
    ] {
        let spec = format!("frugal-svd:update_gap=2,{settings}");
        let mut opt = Frugal::from_params(model.params(), OptimizerConfig::parse_spec(&spec)?)?;
        opt.step_grads(&earlier)?;
        let mut steady = Vec::new();
        let mut refresh = Vec::new();
        let mut shares = Vec::new();
        for rep in 0..reps {
            steady.push(timed_step(&mut opt, &now, &device)?);
            refresh.push(timed_step(&mut opt, &now, &device)?);
            if rep == 0 {
                // Energy of the first refresh, the one started from the earlier gradient's basis.
                for x in &matrices {
                    let st = opt.param_state(&x.name).expect("known parameter");
                    let Subspace::Basis(b) = st.subspace else {
                        anyhow::bail!("{} has no matrix subspace", x.name);
                    };
                    shares.push(b.captured_energy(&x.g) / x.top);
                }
            }
        }
        let ms = median(refresh) - median(steady);
        if exact_ms.is_nan() {
            exact_ms = ms;
        }
        let captured: f64 = shares.iter().zip(&matrices).map(|(s, x)| s * x.top).sum();
        let lowest = shares.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "{label:<44} {ms:>10.1} {:>8.1}x {:>9.2}% {:>9.2}%",
            exact_ms / ms,
            100.0 * captured / top_sum,
            100.0 * lowest
        );
    }
    println!(
        "\nexact SVDs one tensor at a time (as before tensors were refreshed in parallel): {sequential_ms:.1} ms"
    );
    Ok(())
}
