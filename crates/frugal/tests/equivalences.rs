//! The optimizer against independent references: AdamW in f64, plain SGD, signSGD, and the
//! FRUGAL step computed by hand for coordinate and SVD subspaces.

mod common;

use common::*;
use frugal::projection::{Axis, Subspace};
use frugal::Frugal;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Plain-loop f64 AdamW with decoupled weight decay.
struct RefAdam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdam {
    fn new(n: usize) -> Self {
        RefAdam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
    /// Returns the update for gradient `g` (not including weight decay).
    fn update(&mut self, g: &[f64], lr: f64) -> Vec<f64> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.t += 1;
        (0..g.len())
            .map(|i| {
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = self.m[i] / (1.0 - b1.powi(self.t));
                let vh = self.v[i] / (1.0 - b2.powi(self.t));
                -lr * mh / (vh.sqrt() + eps)
            })
            .collect()
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

#[test]
fn adamw_preset_matches_f64_adamw() {
    let vars = named_vars(LLAMA_LIKE, 1);
    let mut cfg = config("adamw");
    cfg.weight_decay = 0.1;
    cfg.lr = 3e-3;
    let mut reference: Vec<(Vec<f64>, RefAdam)> = vars
        .iter()
        .map(|(_, v)| (f64s(&values(v)), RefAdam::new(v.elem_count())))
        .collect();
    let mut opt = Frugal::from_named(vars.clone(), cfg.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for _ in 0..12 {
        let (flat, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        for ((w, adam), g) in reference.iter_mut().zip(&flat) {
            let u = adam.update(&f64s(g), cfg.lr);
            for (w, u) in w.iter_mut().zip(u) {
                *w = *w * (1.0 - cfg.lr * cfg.weight_decay) + u;
            }
        }
    }
    for ((name, v), (w, _)) in vars.iter().zip(&reference) {
        let err = max_rel_err(&values(v), w);
        assert!(err <= 1e-5, "{name}: relative error {err}");
    }
    assert_eq!(opt.state_full_now().len(), LLAMA_LIKE.len());
}

/// With SGD inside and SGD outside at equal rates, the split must sum back to the gradient.
#[test]
fn split_identity_for_every_projection() {
    for proj in [
        "projection=svd",
        "projection=svd,proj_side=full",
        "projection=svd,proj_side=reverse-std",
        "projection=svd,svd_solver=randomized",
        "projection=svd,svd_solver=randomized,proj_side=full,power_iters=0",
        "projection=svd,svd_solver=randomized,proj_side=left,oversample=0",
        "projection=random",
        "projection=randperm",
        "projection=columns",
        "projection=rows",
        "projection=randk",
        "projection=blocks",
        "projection=blocks,block_order=random",
    ] {
        let spec = format!(
            "frugal:{proj},state_full=sgd,state_free=sgd,density=0.25,update_gap=2,lr=0.05"
        );
        let cfg = config(&spec);
        let vars = named_vars(LLAMA_LIKE, 3);
        let start: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
        let mut opt = Frugal::from_named(vars.clone(), cfg.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut expect: Vec<Vec<f64>> = start.iter().map(|w| f64s(w)).collect();
        for _ in 0..5 {
            let (flat, g) = random_grads(&vars, &mut rng);
            opt.step_grads(&g).unwrap();
            for (w, g) in expect.iter_mut().zip(&flat) {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= cfg.lr * *g as f64;
                }
            }
        }
        for ((name, v), w) in vars.iter().zip(&expect) {
            let err = max_rel_err(&values(v), w);
            assert!(err <= 2e-6, "{spec}: {name} differs from SGD by {err}");
        }
    }
}

#[test]
fn density_one_equals_adamw() {
    let vars = named_vars(LLAMA_LIKE, 5);
    let (_, adam) = run(
        &config("adamw:lr=0.01,weight_decay=0.05"),
        &clone_vars(&vars),
        7,
        6,
    );
    for spec in [
        "frugal:density=1,update_gap=3,lr=0.01,weight_decay=0.05",
        "frugal:projection=columns,density=1,update_gap=3,lr=0.01,weight_decay=0.05",
        "frugal:projection=rows,density=1,update_gap=3,lr=0.01,weight_decay=0.05",
    ] {
        let (_, got) = run(&config(spec), &clone_vars(&vars), 7, 6);
        assert_eq!(got, adam, "{spec} should equal AdamW bit for bit");
    }
}

#[test]
fn density_zero_is_signsgd_on_projectable_and_adamw_elsewhere() {
    let vars = named_vars(LLAMA_LIKE, 7);
    let (_, adam) = run(&config("adamw:lr=0.01"), &clone_vars(&vars), 4, 8);
    let mut sign: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..4 {
        let (flat, _) = random_grads(&vars, &mut rng);
        for (w, g) in sign.iter_mut().zip(&flat) {
            for (w, g) in w.iter_mut().zip(g) {
                *w -= 0.01 * g.signum();
            }
        }
    }
    for spec in [
        "frugal:density=0,lr=0.01",
        "frugal:projection=columns,density=0,lr=0.01",
        "frugal-svd:density=0,lr=0.01",
    ] {
        let (opt, got) = run(&config(spec), &clone_vars(&vars), 4, 8);
        for (i, info) in opt.params().enumerate() {
            let (name, _) = &vars[i];
            let idx = vars.iter().position(|(n, _)| n == &info.name).unwrap();
            let want = if info.role == frugal::Role::Projectable {
                &sign[idx]
            } else {
                &adam[idx]
            };
            assert_eq!(&got[idx], want, "{spec}: {} ({name})", info.name);
        }
        assert_eq!(opt.state_bytes().projections + opt.state_bytes().indices, 0);
    }
}

/// One FRUGAL step with AdamW in a column subspace and signSGD on the rest, by hand in f64.
#[test]
fn columns_step_matches_hand_computation() {
    let vars = named_vars(&[("layers.0.mlp.up_proj.weight", &[6, 8])], 9);
    let cfg = frugal::OptimizerConfig::parse_spec(
        "frugal:projection=columns,density=0.5,lr=0.02,weight_decay=0.1,update_gap=100",
    )
    .unwrap();
    let w0 = f64s(&values(&vars[0].1));
    let mut opt = Frugal::from_named(vars.clone(), cfg.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let mut w = w0.clone();
    let mut adam = RefAdam::new(6 * 4);
    for _ in 0..3 {
        let (flat, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        let st = opt.param_state("layers.0.mlp.up_proj.weight").unwrap();
        let Subspace::Coords(sel) = st.subspace else {
            panic!("expected columns")
        };
        assert_eq!((sel.axis, sel.idx.len()), (Axis::Columns, 4));
        let cols: Vec<usize> = sel.idx.iter().map(|&c| c as usize).collect();
        let g = f64s(&flat[0]);
        let low: Vec<f64> = (0..6)
            .flat_map(|i| cols.iter().map(move |&j| (i, j)))
            .map(|(i, j)| g[i * 8 + j])
            .collect();
        let u = adam.update(&low, cfg.lr);
        for x in w.iter_mut() {
            *x *= 1.0 - cfg.lr * cfg.weight_decay;
        }
        for i in 0..6 {
            for j in 0..8 {
                match cols.iter().position(|&c| c == j) {
                    Some(k) => w[i * 8 + j] += u[i * 4 + k],
                    None => w[i * 8 + j] -= cfg.lr * g[i * 8 + j].signum(),
                }
            }
        }
    }
    let err = max_rel_err(&values(&vars[0].1), &w);
    assert!(err <= 1e-5, "relative error {err}");
}

/// One FRUGAL step with AdamW in the SVD subspace and signSGD on the residual, by hand in f64.
#[test]
fn svd_step_matches_hand_computation() {
    let (m, n, r) = (10usize, 6usize, 2usize);
    let vars = named_vars(&[("layers.0.mlp.up_proj.weight", &[m, n])], 11);
    let cfg =
        frugal::OptimizerConfig::parse_spec("frugal-svd:density=0.3333,lr=0.01,update_gap=100")
            .unwrap();
    let mut w = f64s(&values(&vars[0].1));
    let mut opt = Frugal::from_named(vars.clone(), cfg.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut adam = RefAdam::new(m * r);
    for _ in 0..3 {
        let (flat, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        let st = opt.param_state("layers.0.mlp.up_proj.weight").unwrap();
        let Subspace::Basis(basis) = st.subspace else {
            panic!("expected a basis")
        };
        let (b, rank) = basis.right.as_ref().expect("m ≥ n projects on the right");
        assert_eq!(*rank, r);
        let b = f64s(b);
        let g = f64s(&flat[0]);
        // low = G·Bᵀ (m×r), P = low·B, U = up(adam(low)).
        let low: Vec<f64> = (0..m * r)
            .map(|x| {
                (0..n)
                    .map(|k| g[(x / r) * n + k] * b[(x % r) * n + k])
                    .sum()
            })
            .collect();
        let u = adam.update(&low, cfg.lr);
        for i in 0..m {
            for j in 0..n {
                let p: f64 = (0..r).map(|k| low[i * r + k] * b[k * n + j]).sum();
                let up: f64 = (0..r).map(|k| u[i * r + k] * b[k * n + j]).sum();
                let res = g[i * n + j] - p;
                w[i * n + j] += up - cfg.lr * if res.abs() < 1e-9 { 0.0 } else { res.signum() };
            }
        }
    }
    let err = max_rel_err(&values(&vars[0].1), &w);
    assert!(err <= 1e-5, "relative error {err}");
}
