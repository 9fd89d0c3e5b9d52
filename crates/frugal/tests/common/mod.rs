//! Helpers shared by the integration tests: deterministic tensors, gradients and references.
#![allow(dead_code)]

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use frugal::{Frugal, OptimizerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

pub fn randn(n: usize, scale: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| scale * rng.sample::<f32, _>(StandardNormal))
        .collect()
}

pub fn tensor(data: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Named variables with N(0, 0.5²) entries.
pub fn named_vars(specs: &[(&str, &[usize])], seed: u64) -> Vec<(String, Var)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let t = tensor(randn(n, 0.5, &mut rng), shape);
            (name.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Copies of the variables (fresh storage), for running two optimizers from the same start.
pub fn clone_vars(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Random gradients for every variable, as flat vectors and as a `GradStore`.
pub fn random_grads(vars: &[(String, Var)], rng: &mut ChaCha8Rng) -> (Vec<Vec<f32>>, GradStore) {
    let mut store = GradStore::default();
    let flat = vars
        .iter()
        .map(|(_, v)| {
            let g = randn(v.elem_count(), 1.0, rng);
            store.insert(v.as_tensor(), tensor(g.clone(), v.dims()));
            g
        })
        .collect();
    (flat, store)
}

/// A store holding the given gradients for the given variables.
pub fn grads_from(vars: &[(String, Var)], flat: &[Vec<f32>]) -> GradStore {
    let mut store = GradStore::default();
    for ((_, v), g) in vars.iter().zip(flat) {
        store.insert(v.as_tensor(), tensor(g.clone(), v.dims()));
    }
    store
}

pub fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

pub fn max_rel_err(a: &[f32], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
        / scale
}

/// Roles of LLaMA-like names by the optimizer's regex route: embeddings, norms and the head
/// state-full, attention and MLP linears projectable.
pub const LLAMA_STATE_FULL: &str = "(embed|norm|lm_head)";
pub const LLAMA_PROJECTABLE: &str = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)";

/// The configuration of `spec`, routing LLaMA-like names by pattern unless the spec sets
/// patterns itself.
pub fn config(spec: &str) -> OptimizerConfig {
    let mut c = OptimizerConfig::parse_spec(spec).unwrap();
    if c.projectable_modules.is_empty() && c.state_full_modules.is_empty() {
        c.state_full_modules = LLAMA_STATE_FULL.into();
        c.projectable_modules = LLAMA_PROJECTABLE.into();
    }
    c
}

/// A small LLaMA-like parameter set covering every class.
pub const LLAMA_LIKE: &[(&str, &[usize])] = &[
    ("model.embed_tokens.weight", &[32, 12]),
    ("model.layers.0.self_attn.q_proj.weight", &[12, 12]),
    ("model.layers.0.mlp.up_proj.weight", &[20, 12]),
    ("model.layers.0.mlp.down_proj.weight", &[12, 20]),
    ("model.layers.0.input_layernorm.weight", &[12]),
    ("model.layers.1.self_attn.v_proj.weight", &[12, 12]),
    ("model.layers.1.mlp.gate_proj.weight", &[20, 12]),
    ("model.norm.weight", &[12]),
    ("lm_head.weight", &[32, 12]),
];

/// Runs `steps` steps of random gradients (seeded) and returns the final parameter values.
pub fn run(
    spec: &OptimizerConfig,
    vars: &[(String, Var)],
    steps: usize,
    seed: u64,
) -> (Frugal, Vec<Vec<f32>>) {
    let mut opt = Frugal::from_named(vars.to_vec(), spec.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..steps {
        let (_, g) = random_grads(vars, &mut rng);
        opt.step_grads(&g).unwrap();
    }
    (opt, vars.iter().map(|(_, v)| values(v)).collect())
}

/// Largest absolute difference between two runs' parameters.
pub fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Every preset, and every projection, rule and state option at least once: the
/// configurations the two engines (and devices) are checked on.
pub fn engine_specs() -> Vec<String> {
    let mut specs: Vec<String> = frugal::config::PRESETS
        .iter()
        .map(|p| p.to_string())
        .collect();
    specs.extend(
        [
            "frugal:projection=coordinates,coordinates=columns",
            "frugal:projection=coordinates,coordinates=rows,state_free=sgd",
            "frugal:projection=coordinates,coordinates=randk,weight_decay=0.1",
            "frugal:projection=randperm,proj_side=left",
            "frugal:projection=random,proj_side=full",
            "frugal:projection=random,proj_side=right,state_free=sgd",
            "frugal-svd:proj_side=left,state_full=lion",
            "frugal-svd:svd_solver=randomized,state_full=sgdm,nesterov=true",
            "frugal-svd:state_full=sgd",
            "galore:moment_transfer=project",
            "galore:moment_transfer=align,weight_decay=0.1",
            "frugal:moment_storage=8bit",
            "frugal-svd:moment_storage=8bit",
            "badam:block_unit=layer",
            // (Two-sided SVD bases are left out: the projected gradient is diagonal, and Adam's
            // first step turns the rounding noise off the diagonal into ±lr, so any two
            // summation orders disagree there.)
            "fira:proj_side=right,scale_granularity=tensor",
            "apollo:proj_side=left",
        ]
        .map(String::from),
    );
    specs
}

/// The configuration of `spec` with an update gap of 3 (subspaces change often) and a
/// learning rate of 1e-2.
pub fn engine_config(spec: &str) -> OptimizerConfig {
    let sep = if spec.contains(':') { "," } else { ":" };
    let mut c = config(&format!("{spec}{sep}update_gap=3"));
    c.lr = 1e-2;
    c
}

/// Runs `steps` steps of seeded random gradients on [`LLAMA_LIKE`] parameters placed on
/// `device`, with `engine`; returns the optimizer and the parameters' final values.
pub fn run_on(
    c: &OptimizerConfig,
    steps: usize,
    device: &Device,
    engine: frugal::Engine,
) -> (Frugal, Vec<Vec<f32>>) {
    let vars: Vec<(String, Var)> = named_vars(LLAMA_LIKE, 11)
        .into_iter()
        .map(|(n, v)| {
            let t = v.as_tensor().to_device(device).unwrap();
            (n, Var::from_tensor(&t).unwrap())
        })
        .collect();
    let mut opt = Frugal::from_named(vars.clone(), c.clone()).unwrap();
    opt.set_engine(engine).unwrap();
    assert_eq!(opt.engine(), engine);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..steps {
        let mut store = GradStore::default();
        for (_, v) in &vars {
            let g = tensor(randn(v.elem_count(), 1.0, &mut rng), v.dims());
            store.insert(v.as_tensor(), g.to_device(device).unwrap());
        }
        opt.step_grads(&store).unwrap();
    }
    (opt, vars.iter().map(|(_, v)| values(v)).collect())
}
