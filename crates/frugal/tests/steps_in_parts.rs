//! A step taken in parts (per-layer updates during the backward pass) updates exactly like a
//! whole step: same subspaces, block schedules, random choices and step counts, bit for bit.

mod common;

use candle_core::backprop::GradStore;
use common::*;
use frugal::{Error, Frugal};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The store of the gradients of the variables `which`, taken from `all`.
fn part(vars: &[(String, candle_core::Var)], all: &GradStore, which: &[usize]) -> GradStore {
    let mut store = GradStore::default();
    for &i in which {
        let v = vars[i].1.as_tensor();
        store.insert(v, all.get(v).unwrap().clone());
    }
    store
}

#[test]
fn parts_in_any_order_update_like_a_whole_step() {
    // Every projection family, both refresh kinds (SVD from gradients, random without), blocks,
    // 8-bit moments, moment transfer and a scaled state-free rule; T = 2 crosses refreshes.
    for spec in [
        "adamw",
        "frugal:update_gap=2",
        "frugal:update_gap=2,projection=columns",
        "frugal:update_gap=2,projection=randk",
        "frugal:update_gap=2,projection=randperm",
        "frugal:update_gap=2,projection=random",
        "apollo-mini:update_gap=2",
        "frugal-svd:update_gap=2",
        "frugal-svd:update_gap=2,svd_solver=randomized",
        "galore:update_gap=2,moment_transfer=project",
        "badam:density=0.4,update_gap=2",
        "frugal:update_gap=2,projection=blocks,block_order=random,density=0.4",
        "frugal:update_gap=2,moment_storage=8bit",
        "fira:update_gap=2",
        "apollo:update_gap=2",
    ] {
        let cfg = config(spec);
        let whole_vars = named_vars(LLAMA_LIKE, 7);
        let part_vars = clone_vars(&whole_vars);
        let mut whole = Frugal::from_named(whole_vars.clone(), cfg.clone()).unwrap();
        let mut parts = Frugal::from_named(part_vars.clone(), cfg).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let n = LLAMA_LIKE.len();
        for step in 0..5 {
            let (flat, g) = random_grads(&whole_vars, &mut rng);
            whole.step_grads(&g).unwrap();
            // Top layer first, as a backward pass hands them over, in uneven groups.
            let g = grads_from(&part_vars, &flat);
            let order: Vec<usize> = (0..n).rev().collect();
            parts.begin_step().unwrap();
            for group in order.chunks(if step % 2 == 0 { 2 } else { 3 }) {
                parts.step_part(&part(&part_vars, &g, group)).unwrap();
            }
            parts.finish_step().unwrap();
            for ((name, a), (_, b)) in whole_vars.iter().zip(&part_vars) {
                assert_eq!(values(a), values(b), "{spec}: {name} after step {step}");
            }
        }
        assert_eq!(whole.steps_done(), parts.steps_done());
        assert_eq!(whole.state_bytes(), parts.state_bytes(), "{spec}");
    }
}

#[test]
fn a_step_in_parts_refuses_misuse() {
    let vars = named_vars(LLAMA_LIKE, 9);
    let mut opt = Frugal::from_named(vars.clone(), config("frugal-svd")).unwrap();
    let (_, g) = random_grads(&vars, &mut ChaCha8Rng::seed_from_u64(1));
    let is_parts = |e: Error| match e {
        Error::StepInParts(why) => why,
        e => panic!("unexpected error {e}"),
    };
    assert!(is_parts(opt.step_part(&g).unwrap_err()).contains("begin_step"));
    assert!(is_parts(opt.finish_step().unwrap_err()).contains("begin_step"));
    opt.begin_step().unwrap();
    assert!(is_parts(opt.begin_step().unwrap_err()).contains("already open"));
    opt.step_part(&part(&vars, &g, &[0, 1])).unwrap();
    assert!(is_parts(opt.step_part(&part(&vars, &g, &[1])).unwrap_err()).contains("already"));
    let why = is_parts(opt.finish_step().unwrap_err());
    assert!(
        why.contains(&vars[2].0) && why.contains("no gradient"),
        "{why}"
    );
    let path = std::env::temp_dir().join(format!("frugal-parts-{}.st", std::process::id()));
    assert!(is_parts(opt.save_state(&path).unwrap_err()).contains("finish_step"));
    assert!(
        opt.step_grads(&g).is_err(),
        "a whole step inside an open one"
    );
    opt.step_part(&part(&vars, &g, &(2..LLAMA_LIKE.len()).collect::<Vec<_>>()))
        .unwrap();
    opt.finish_step().unwrap();
    assert_eq!(opt.steps_done(), 1);
    opt.save_state(&path).unwrap();
    std::fs::remove_file(&path).ok();
    // A non-finite gradient in a part updates none of that part's parameters.
    let mut bad = part(&vars, &g, &[0]);
    let v0 = vars[0].1.as_tensor();
    let nan = (bad.get(v0).unwrap() * f64::NAN).unwrap();
    bad.insert(v0, nan);
    let before = values(&vars[0].1);
    opt.begin_step().unwrap();
    assert!(matches!(
        opt.step_part(&bad).unwrap_err(),
        Error::NonFiniteGradient { .. }
    ));
    assert_eq!(values(&vars[0].1), before);
}
