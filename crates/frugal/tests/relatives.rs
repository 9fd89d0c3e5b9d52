//! The relatives of the state-free idea against steps computed by hand in f64: Fira (GaLore plus
//! a norm-scaled residual), APOLLO (channel-wise scaled gradient from a Gaussian sketch) and
//! APOLLO-Mini (rank 1, one scale per tensor), each with the norm-growth limiter engaged.

mod common;

use common::*;
use frugal::projection::{Basis, Subspace};
use frugal::{Frugal, OptimizerConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// A dense f64 copy of a basis: down and up as plain loops.
struct Dense {
    m: usize,
    n: usize,
    /// A (m×r) on the left, or B (r×n) on the right.
    factor: Vec<f64>,
    r: usize,
    left: bool,
}

impl Dense {
    fn of(b: &Basis) -> Self {
        match (&b.left, &b.right) {
            (Some((a, r)), None) => Dense {
                m: b.m,
                n: b.n,
                factor: f64s(a),
                r: *r,
                left: true,
            },
            (None, Some((f, r))) => Dense {
                m: b.m,
                n: b.n,
                factor: f64s(f),
                r: *r,
                left: false,
            },
            _ => panic!("one-sided basis expected"),
        }
    }

    /// Shape of down(G).
    fn low(&self) -> (usize, usize) {
        if self.left {
            (self.r, self.n)
        } else {
            (self.m, self.r)
        }
    }

    fn down(&self, g: &[f64]) -> Vec<f64> {
        let (m, n, r, f) = (self.m, self.n, self.r, &self.factor);
        if self.left {
            // Aᵀ·G: (r×n)
            (0..r * n)
                .map(|x| (0..m).map(|i| f[i * r + x / n] * g[i * n + x % n]).sum())
                .collect()
        } else {
            // G·Bᵀ: (m×r)
            (0..m * r)
                .map(|x| {
                    (0..n)
                        .map(|j| g[(x / r) * n + j] * f[(x % r) * n + j])
                        .sum()
                })
                .collect()
        }
    }

    fn up(&self, low: &[f64]) -> Vec<f64> {
        let (m, n, r, f) = (self.m, self.n, self.r, &self.factor);
        (0..m * n)
            .map(|x| {
                let (i, j) = (x / n, x % n);
                if self.left {
                    (0..r).map(|k| f[i * r + k] * low[k * n + j]).sum()
                } else {
                    (0..r).map(|k| low[i * r + k] * f[k * n + j]).sum()
                }
            })
            .collect()
    }

    /// Channel of element x of an (rows×cols) matrix: the unprojected side's index, or 0.
    fn channel(&self, x: usize, cols: usize, tensor: bool) -> usize {
        match (tensor, self.left) {
            (true, _) => 0,
            (false, true) => x % cols,
            (false, false) => x / cols,
        }
    }

    fn channel_norms(&self, x: &[f64], cols: usize, tensor: bool) -> Vec<f64> {
        let count = if tensor {
            1
        } else if self.left {
            self.n
        } else {
            self.m
        };
        let mut sq = vec![0.0; count];
        for (i, v) in x.iter().enumerate() {
            sq[self.channel(i, cols, tensor)] += v * v;
        }
        sq.iter().map(|s| s.sqrt()).collect()
    }
}

/// The scaled step in f64, written from Fira's and APOLLO's definitions.
struct Reference {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
    previous: Option<f64>,
    /// Steps where the limiter cut the update.
    limited: usize,
}

impl Reference {
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        c: &OptimizerConfig,
        basis: &Dense,
        w: &mut [f64],
        g: &[f64],
        residual: bool,
        tensor: bool,
    ) {
        let (b1, b2, eps) = (c.beta1, c.beta2, c.eps);
        let low = basis.down(g);
        let (_, cols) = basis.low();
        if self.m.is_empty() {
            self.m = vec![0.0; low.len()];
            self.v = vec![0.0; low.len()];
        }
        self.t += 1;
        let mut d = vec![0.0; low.len()];
        for i in 0..low.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * low[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * low[i] * low[i];
            let mh = self.m[i] / (1.0 - b1.powi(self.t));
            let vh = self.v[i] / (1.0 - b2.powi(self.t));
            d[i] = mh / (vh.sqrt() + eps);
        }
        let dn = basis.channel_norms(&d, cols, tensor);
        let gn = basis.channel_norms(&low, cols, tensor);
        let ratio: Vec<f64> = dn.iter().zip(&gn).map(|(d, g)| d / (g + 1e-8)).collect();
        let projected = basis.up(&low);
        let target: Vec<f64> = if residual {
            g.iter().zip(&projected).map(|(g, p)| g - p).collect()
        } else {
            g.to_vec()
        };
        let mut scaled: Vec<f64> = target
            .iter()
            .enumerate()
            .map(|(x, v)| v * ratio[basis.channel(x, basis.n, tensor)])
            .collect();
        let norm = scaled.iter().map(|s| s * s).sum::<f64>().sqrt();
        let gamma = c.norm_growth_limit;
        let limiter = match self.previous {
            Some(prev) => (norm / (prev + 1e-8)).max(gamma) / gamma,
            None => 1.0,
        };
        if limiter > 1.0 {
            self.limited += 1;
        }
        self.previous = Some(norm / limiter);
        scaled.iter_mut().for_each(|s| *s /= limiter);
        let lr_full = c.lr * c.proj_lr_scale;
        let lr_free = lr_full * c.state_free_lr_scale;
        let up_d = basis.up(&d);
        let keep = 1.0 - c.lr * c.weight_decay;
        for x in 0..w.len() {
            let subspace = if residual { -lr_full * up_d[x] } else { 0.0 };
            w[x] = w[x] * keep + subspace - lr_free * scaled[x];
        }
    }
}

/// Runs `spec` for eight steps (refreshing every other step) on an m×n weight, against the f64
/// reference; returns the relative error and how often the limiter cut. Random gradients come
/// first, then a repeated one: Adam's direction lines up and the scaled norm grows.
fn against_reference(spec: &str, (m, n): (usize, usize)) -> (f64, usize) {
    let mut cfg = OptimizerConfig::parse_spec(spec).unwrap();
    cfg.apply([("update_gap", "2"), ("weight_decay", "0.1")])
        .unwrap();
    let residual = cfg.state_free == frugal::config::StateFreeRule::ScaledResidual;
    let tensor = cfg.scale_granularity == frugal::config::ScaleGranularity::Tensor;
    let name = "layers.0.mlp.up_proj.weight";
    let vars = named_vars(&[(name, &[m, n])], 21);
    let mut w = f64s(&values(&vars[0].1));
    let mut opt = Frugal::from_named(vars.clone(), cfg.clone()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let mut reference = Reference {
        m: Vec::new(),
        v: Vec::new(),
        t: 0,
        previous: None,
        limited: 0,
    };
    let repeated = randn(m * n, 1.0, &mut rng);
    for step in 0..8 {
        let g = if step < 3 {
            randn(m * n, 1.0, &mut rng)
        } else {
            repeated.clone()
        };
        opt.step_grads(&grads_from(&vars, std::slice::from_ref(&g)))
            .unwrap();
        let st = opt.param_state(name).unwrap();
        let Subspace::Basis(basis) = st.subspace else {
            panic!("{spec}: expected a matrix subspace")
        };
        reference.step(&cfg, &Dense::of(basis), &mut w, &f64s(&g), residual, tensor);
    }
    (max_rel_err(&values(&vars[0].1), &w), reference.limited)
}

/// `spec` matches the reference with columns projected (m ≥ n: one scale per row) and with rows
/// projected (one per column), and its limiter cuts at least once.
fn assert_matches_reference(spec: &str) {
    for shape in [(10, 6), (6, 10)] {
        let (err, limited) = against_reference(spec, shape);
        assert!(err <= 2e-5, "{spec} {shape:?}: relative error {err}");
        assert!(limited >= 1, "{spec} {shape:?}: the limiter never engaged");
    }
}

#[test]
fn fira_matches_hand_computation() {
    assert_matches_reference("fira:density=0.34");
}

#[test]
fn apollo_matches_hand_computation() {
    assert_matches_reference("apollo:density=0.34");
}

#[test]
fn apollo_mini_matches_hand_computation() {
    assert_eq!(OptimizerConfig::preset("apollo-mini").unwrap().rank, 1);
    assert_matches_reference("apollo-mini");
}

#[test]
fn the_limiter_keeps_one_number_per_tensor_unless_off() {
    // γ = 0: no record is kept, so the state is the moments alone; with γ, 4 bytes more.
    let spec = "apollo-mini:norm_growth_limit=0";
    let vars = named_vars(&[("layers.0.mlp.up_proj.weight", &[10, 6])], 3);
    let mut opt =
        Frugal::from_named(vars.clone(), OptimizerConfig::parse_spec(spec).unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (_, g) = random_grads(&vars, &mut rng);
    opt.step_grads(&g).unwrap();
    // Rank 1 on the right: m and v hold 10 values each.
    assert_eq!(opt.state_bytes().moments, 2 * 4 * 10);
    let with = OptimizerConfig::parse_spec("apollo-mini").unwrap();
    let vars = clone_vars(&vars);
    let mut opt = Frugal::from_named(vars.clone(), with).unwrap();
    opt.step_grads(&grads_from(&vars, &[randn(60, 1.0, &mut rng)]))
        .unwrap();
    assert_eq!(opt.state_bytes().moments, 2 * 4 * 10 + 4);
}

#[test]
fn scaled_rules_reject_settings_they_cannot_honour() {
    let cases = [
        ("fira:projection=columns", "projection svd or random"),
        (
            "apollo:random_basis=gaussian,state_free=signsgd",
            "Gaussian sketch",
        ),
        ("fira:proj_side=full", "no channels"),
        ("fira:norm_growth_limit=0.5", "norm_growth_limit"),
        ("frugal:rank=4", "fixed rank"),
    ];
    for (spec, expect) in cases {
        let err = OptimizerConfig::parse_spec(spec)
            .and_then(|c| c.validate())
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{spec}: {err}");
    }
    // A tensor-wide scale works with both sides projected.
    OptimizerConfig::parse_spec("fira:proj_side=full,scale_granularity=tensor")
        .unwrap()
        .validate()
        .unwrap();
}
