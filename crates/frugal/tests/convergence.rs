//! Every preset trains a small MLP regression through candle's autograd and `Optimizer` trait.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_no_bias, Optimizer, VarBuilder, VarMap};
use common::*;
use frugal::Frugal;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

struct Mlp {
    up: candle_nn::Linear,
    down: candle_nn::Linear,
    norm: Tensor,
    head: candle_nn::Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Mlp {
        Mlp {
            up: linear_no_bias(16, 48, vb.pp("model.layers.0.mlp.up_proj")).unwrap(),
            down: linear_no_bias(48, 32, vb.pp("model.layers.0.mlp.down_proj")).unwrap(),
            norm: vb
                .get_with_hints(32, "model.norm.weight", candle_nn::Init::Const(1.0))
                .unwrap(),
            head: linear_no_bias(32, 4, vb.pp("lm_head")).unwrap(),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.up.forward(x).unwrap().tanh().unwrap();
        let h = self.down.forward(&h).unwrap().tanh().unwrap();
        self.head
            .forward(&h.broadcast_mul(&self.norm).unwrap())
            .unwrap()
    }
}

fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// Trains for `steps` full-batch steps with a cosine schedule; returns (initial loss, final loss).
fn train(spec: &str, steps: usize) -> (f32, f32) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x = tensor(randn(256 * 16, 1.0, &mut rng), &[256, 16]);
    let teacher = tensor(randn(16 * 4, 0.5, &mut rng), &[16, 4]);
    let y = x.matmul(&teacher).unwrap().sin().unwrap();
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu));
    // The VarMap's initialisation uses candle's global RNG: overwrite it with seeded values.
    let mut vars: Vec<_> = varmap.data().lock().unwrap().clone().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        if !name.contains("norm") {
            let fan_in = var.dims()[1] as f32;
            var.set(&tensor(
                randn(var.elem_count(), fan_in.powf(-0.5), &mut rng),
                var.dims(),
            ))
            .unwrap();
        }
    }
    let mut opt = Frugal::from_varmap(&varmap, config(spec)).unwrap();
    let first = mse(&model.forward(&x), &y).to_scalar::<f32>().unwrap();
    let base = opt.learning_rate();
    for step in 0..steps {
        // Cosine decay to 10 %, as in the paper's recipe.
        let progress = step as f64 / steps as f64;
        opt.set_learning_rate(
            base * (0.1 + 0.45 * (1.0 + (std::f64::consts::PI * progress).cos())),
        );
        let loss = mse(&model.forward(&x), &y);
        opt.backward_step(&loss).unwrap();
    }
    (
        first,
        mse(&model.forward(&x), &y).to_scalar::<f32>().unwrap(),
    )
}

#[test]
fn every_preset_reduces_the_loss_and_frugal_tracks_adamw() {
    let steps = 150;
    let (start, adamw) = train("adamw:lr=0.01", steps);
    let mut finals = vec![("adamw", adamw)];
    for spec in [
        "frugal:lr=0.01,update_gap=20,density=0.34",
        "frugal-svd:lr=0.01,update_gap=20",
        "galore:lr=0.04,update_gap=20",
        "galore:lr=0.04,update_gap=20,moment_transfer=align",
        "galore:lr=0.04,update_gap=20,moment_transfer=project",
        "badam:lr=0.01,update_gap=20,block_unit=tensor,density=0.5",
        "signsgd:lr=0.002",
        "sgd:lr=0.5",
        "frugal:lr=0.01,state_full=sgdm,update_gap=20",
        "frugal:lr=0.003,state_full=lion,projection=columns,update_gap=20",
        "fira:lr=0.01,update_gap=20",
        "apollo:lr=0.01,update_gap=20",
        "apollo-mini:lr=0.01,update_gap=20",
        "frugal-svd:lr=0.01,update_gap=20,svd_solver=randomized",
    ] {
        let (s, end) = train(spec, steps);
        eprintln!("{spec}: {s} → {end}");
        assert_eq!(s, start, "same initial model");
        assert!(end < 0.5 * start, "{spec}: loss {start} → {end}");
        finals.push((spec, end));
    }
    // On this small full-batch problem AdamW reaches ~1e-3; FRUGAL's sign steps on the residual
    // leave it within 10× (blockwise) and 2× (SVD) of that, while holding a fraction of the state.
    let (blocks, svd) = (finals[1].1, finals[2].1);
    assert!(
        blocks <= 10.0 * adamw,
        "frugal {blocks} vs adamw {adamw}: {finals:?}"
    );
    assert!(
        svd <= 2.0 * adamw,
        "frugal-svd {svd} vs adamw {adamw}: {finals:?}"
    );
}

#[test]
fn eight_bit_moments_track_fp32() {
    let steps = 150;
    for (spec, slack) in [
        ("adamw:lr=0.01", 1.5),
        ("frugal:lr=0.01,update_gap=20,density=0.34", 1.5),
        ("frugal-svd:lr=0.01,update_gap=20", 1.5),
    ] {
        let (start, fp32) = train(spec, steps);
        let (_, q8) = train(&format!("{spec},moment_storage=8bit"), steps);
        eprintln!("{spec}: f32 {fp32}, 8-bit {q8}");
        assert!(q8 < 0.05 * start, "{spec}: 8-bit loss {start} → {q8}");
        assert!(
            q8 <= slack * fp32 && fp32 <= slack * q8,
            "{spec}: 8-bit {q8} vs f32 {fp32}"
        );
    }
}
