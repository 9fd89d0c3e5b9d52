//! The tensor-operation engine (the optimizer's path on GPUs) against the fused CPU engine, run
//! here on CPU tensors: every preset, projection and rule gives the same parameters within f32
//! tolerance, across subspace changes, and its state saves and loads in the same format.

mod common;

use candle_core::Device;
use common::{
    clone_vars, config, engine_specs, max_diff, random_grads, run_on, values, LLAMA_LIKE,
};
use frugal::{Engine, Frugal};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn every_preset_and_projection_matches_the_fused_engine() {
    for spec in engine_specs() {
        let c = common::engine_config(&spec);
        let (fused, a) = run_on(&c, 8, &Device::Cpu, Engine::Fused);
        let (tensors, b) = run_on(&c, 8, &Device::Cpu, Engine::Tensors);
        let d = max_diff(&a, &b);
        // A step moves a weight by about lr; agreement to 1e-4 of it is f32 rounding.
        assert!(d < 2e-6, "{spec}: parameters differ by {d}");
        assert_eq!(fused.state_bytes(), tensors.state_bytes(), "{spec}");
        for p in fused.params() {
            let (s, t) = (
                fused.param_state(&p.name).unwrap(),
                tensors.param_state(&p.name).unwrap(),
            );
            assert_eq!(s.subspace, t.subspace, "{spec}: {}", p.name);
            assert_eq!((s.m.len(), s.v.len(), s.t), (t.m.len(), t.v.len(), t.t));
            let dm =
                s.m.iter()
                    .zip(t.m.iter())
                    .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(dm < 1e-4, "{spec}: {} first moments differ by {dm}", p.name);
        }
    }
}

#[test]
fn state_saved_by_one_engine_resumes_in_the_other() {
    let dir = std::env::temp_dir().join(format!("frugal-engines-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for spec in ["frugal", "frugal-svd", "fira", "frugal:moment_storage=8bit"] {
        let mut c = config(&format!(
            "{spec}{}update_gap=3",
            if spec.contains(':') { "," } else { ":" }
        ));
        c.lr = 1e-2;
        // Reference: 7 uninterrupted fused steps.
        let vars = common::named_vars(LLAMA_LIKE, 3);
        let reference = {
            let vars = clone_vars(&vars);
            let mut opt = Frugal::from_named(vars.clone(), c.clone()).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            for _ in 0..7 {
                opt.step_grads(&random_grads(&vars, &mut rng).1).unwrap();
            }
            vars.iter().map(|(_, v)| values(v)).collect::<Vec<_>>()
        };
        for (first, second) in [
            (Engine::Tensors, Engine::Fused),
            (Engine::Fused, Engine::Tensors),
        ] {
            let vars = clone_vars(&vars);
            let mut rng = ChaCha8Rng::seed_from_u64(9);
            let mut opt = Frugal::from_named(vars.clone(), c.clone()).unwrap();
            opt.set_engine(first).unwrap();
            for _ in 0..4 {
                opt.step_grads(&random_grads(&vars, &mut rng).1).unwrap();
            }
            let path = dir.join("state.safetensors");
            opt.save_state(&path).unwrap();
            let mut resumed = Frugal::from_named(vars.clone(), c.clone()).unwrap();
            resumed.set_engine(second).unwrap();
            resumed.load_state(&path).unwrap();
            for _ in 4..7 {
                resumed
                    .step_grads(&random_grads(&vars, &mut rng).1)
                    .unwrap();
            }
            let got: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
            let d = max_diff(&reference, &got);
            assert!(
                d < 2e-6,
                "{spec}, {first:?} then {second:?}: differs by {d}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_tensor_engine_refuses_non_finite_gradients() {
    let c = config("frugal");
    let vars = common::named_vars(LLAMA_LIKE, 1);
    let mut opt = Frugal::from_named(vars.clone(), c).unwrap();
    opt.set_engine(Engine::Tensors).unwrap();
    let before: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (mut flat, _) = random_grads(&vars, &mut rng);
    flat[3][1] = f32::INFINITY;
    flat[6][0] = f32::NAN;
    let err = opt
        .step_grads(&common::grads_from(&vars, &flat))
        .unwrap_err()
        .to_string();
    // The first parameter with a non-finite value is named.
    assert!(
        err.contains("non-finite") && err.contains(&vars[3].0),
        "{err}"
    );
    let after: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    assert_eq!(before, after);
}
