//! Projection properties: idempotence, orthogonal residuals, the SVD subspace, rounding rules.

mod common;

use common::*;
use faer::MatRef;
use frugal::config::{CoordinateAxis, ProjSide};
use frugal::projection::{coordinate_count, matrix_ranks, Basis, RankRule, Sketch};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn project(b: &Basis, g: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (r, c) = b.low_shape();
    let mut low = vec![0.0; r * c];
    let mut full = vec![0.0; g.len()];
    let mut tmp = Vec::new();
    b.down(g, &mut low, &mut tmp);
    b.up(&low, &mut full, &mut tmp);
    (low, full)
}

#[test]
fn matrix_projections_are_idempotent_with_orthogonal_residual() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (m, n) in [(24, 10), (10, 24)] {
        let g = randn(m * n, 1.0, &mut rng);
        for side in [ProjSide::Std, ProjSide::ReverseStd, ProjSide::Full] {
            let (l, r) = matrix_ranks(side, m, n, RankRule::from_density(0.3));
            for basis in [
                Basis::svd(&g, m, n, l, r, "g").unwrap(),
                Basis::random(m, n, l, r, &mut rng),
            ] {
                let (_, p) = project(&basis, &g);
                let (_, pp) = project(&basis, &p);
                let diff = p
                    .iter()
                    .zip(&pp)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "P(P(G)) ≠ P(G) by {diff} ({m}x{n}, {side})");
                let resid: Vec<f32> = g.iter().zip(&p).map(|(a, b)| a - b).collect();
                let cos = dot(&resid, &p) / (dot(&g, &g));
                assert!(cos.abs() < 1e-5, "residual not orthogonal: {cos}");
                let (low_r, _) = project(&basis, &resid);
                assert!(low_r.iter().all(|x| x.abs() < 1e-4), "down(residual) ≠ 0");
            }
        }
    }
}

#[test]
fn svd_subspace_holds_the_top_singular_energy() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (m, n) = (30, 12);
    let g = randn(m * n, 1.0, &mut rng);
    let sv = MatRef::from_row_major_slice(&g, m, n)
        .singular_values()
        .unwrap();
    for r in [1, 3, 6] {
        let basis = Basis::svd(&g, m, n, None, Some(r), "g").unwrap();
        let (low, _) = project(&basis, &g);
        let energy = dot(&low, &low);
        let top: f64 = sv.iter().take(r).map(|s| (*s as f64).powi(2)).sum();
        assert!(
            (energy - top).abs() / top < 1e-4,
            "rank {r}: {energy} vs {top}"
        );
        // Any random subspace of the same rank captures no more.
        let random = Basis::random(m, n, None, Some(r), &mut rng);
        let (low_rand, _) = project(&random, &g);
        assert!(dot(&low_rand, &low_rand) <= energy * (1.0 + 1e-5));
    }
}

/// An m×n matrix with singular values decaying like 0.7^i (plus a little noise).
fn decaying(m: usize, n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut g = randn(m * n, 1e-3, rng);
    for i in 0..m.min(n) {
        let (x, y) = (randn(m, 1.0, rng), randn(n, 1.0, rng));
        let s = 0.7f32.powi(i as i32);
        for a in 0..m {
            for b in 0..n {
                g[a * n + b] += s * x[a] * y[b];
            }
        }
    }
    g
}

#[test]
fn randomized_svd_captures_the_top_subspace() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let (m, n, r) = (60, 40, 6);
    let g = decaying(m, n, &mut rng);
    let sketch = |oversample, power_iters| Sketch {
        oversample,
        power_iters,
    };
    for (l, rr) in [(None, Some(r)), (Some(r), None), (Some(r), Some(r))] {
        let exact = Basis::svd(&g, m, n, l, rr, "g").unwrap();
        let top = exact.captured_energy(&g);
        // Cold start: a Gaussian sketch with oversampling and one power iteration.
        let cold =
            Basis::randomized_svd(&g, (m, n), (l, rr), sketch(8, 1), None, &mut rng, "g").unwrap();
        let e = cold.captured_energy(&g);
        assert!(
            e >= 0.99 * top && e <= top * (1.0 + 1e-4),
            "{l:?} {rr:?}: {e} vs {top}"
        );
        // Orthonormal factors: projecting twice changes nothing.
        let (_, p) = project(&cold, &g);
        let (_, pp) = project(&cold, &p);
        let diff = p
            .iter()
            .zip(&pp)
            .fold(0f32, |d, (a, b)| d.max((a - b).abs()));
        assert!(diff < 1e-4, "{l:?} {rr:?}: P(P(G)) ≠ P(G) by {diff}");
        // Started from the exact basis, one pass without extras reproduces it.
        let warm = Basis::randomized_svd(
            &g,
            (m, n),
            (l, rr),
            sketch(0, 0),
            Some(&exact),
            &mut rng,
            "g",
        )
        .unwrap();
        let e = warm.captured_energy(&g);
        assert!(
            (e - top).abs() <= 1e-4 * top,
            "{l:?} {rr:?}: warm {e} vs {top}"
        );
        // Without oversampling, power iterations or a warm start it captures less.
        let bare =
            Basis::randomized_svd(&g, (m, n), (l, rr), sketch(0, 0), None, &mut rng, "g").unwrap();
        assert!(bare.captured_energy(&g) < 0.999 * top);
    }
}

/// The device solver (matrix products as tensor operations, here on the CPU) makes the same
/// random draws and the same sweeps as the host solver: the same bases up to f32 rounding.
#[test]
fn randomized_svd_on_a_device_matches_the_host_solver() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let (m, n, r) = (50, 36, 5);
    let g = decaying(m, n, &mut rng);
    let on_device = tensor(g.clone(), &[m, n]);
    let sketch = Sketch {
        oversample: 6,
        power_iters: 2,
    };
    for (l, rr) in [(None, Some(r)), (Some(r), None), (Some(r), Some(r))] {
        let exact = Basis::svd(&g, m, n, l, rr, "g").unwrap();
        for warm in [None, Some(&exact)] {
            let host = Basis::randomized_svd(
                &g,
                (m, n),
                (l, rr),
                sketch,
                warm,
                &mut ChaCha8Rng::seed_from_u64(9),
                "g",
            )
            .unwrap();
            let device = Basis::randomized_svd_on_device(
                &on_device,
                (l, rr),
                sketch,
                warm,
                &mut ChaCha8Rng::seed_from_u64(9),
                "g",
            )
            .unwrap();
            let factors = |b: &Basis| -> Vec<f32> {
                let left = b.left.iter().flat_map(|(a, _)| a.iter().copied());
                left.chain(b.right.iter().flat_map(|(b, _)| b.iter().copied()))
                    .collect()
            };
            let (a, b) = (factors(&host), factors(&device));
            assert_eq!(a.len(), b.len());
            let d = a
                .iter()
                .zip(&b)
                .fold(0f32, |d, (x, y)| d.max((x - y).abs()));
            assert!(
                d < 1e-4,
                "{l:?} {rr:?} warm {}: bases differ by {d}",
                warm.is_some()
            );
            let (e, top) = (device.captured_energy(&g), exact.captured_energy(&g));
            assert!(e >= 0.99 * top, "{l:?} {rr:?}: {e} vs {top}");
        }
    }
    // A zero gradient cannot be sketched: both fall back to the exact SVD.
    let zero = tensor(vec![0.0; m * n], &[m, n]);
    let b = Basis::randomized_svd_on_device(&zero, (None, Some(r)), sketch, None, &mut rng, "g")
        .unwrap();
    assert_eq!(b.right.as_ref().unwrap().1, r);
    let zeros = vec![0.0; m * n];
    let b = Basis::randomized_svd(&zeros, (m, n), (None, Some(r)), sketch, None, &mut rng, "g")
        .unwrap();
    assert_eq!(b.right.as_ref().unwrap().1, r);
}

#[test]
fn ranks_and_counts_follow_the_rounding_rules() {
    // SVD ranks: Python round (half to even) of dim·ρ on the reduced side.
    assert_eq!(
        matrix_ranks(ProjSide::Std, 512, 512, RankRule::from_density(0.25)),
        (None, Some(128))
    );
    assert_eq!(
        matrix_ranks(ProjSide::Std, 1376, 512, RankRule::from_density(0.25)),
        (None, Some(128))
    );
    assert_eq!(
        matrix_ranks(ProjSide::Std, 512, 1376, RankRule::from_density(0.25)),
        (Some(128), None)
    );
    assert_eq!(
        matrix_ranks(ProjSide::Std, 10, 6, RankRule::from_density(0.25)),
        (None, Some(2))
    ); // 1.5 → 2
    assert_eq!(
        matrix_ranks(ProjSide::Std, 10, 10, RankRule::from_density(0.25)),
        (None, Some(2))
    ); // 2.5 → 2
    assert_eq!(
        matrix_ranks(ProjSide::ReverseStd, 10, 6, RankRule::from_density(0.25)),
        (Some(2), None)
    ); // 2.5 → 2
    assert_eq!(
        matrix_ranks(ProjSide::Full, 14, 6, RankRule::from_density(0.25)),
        (Some(4), Some(2))
    ); // 3.5 → 4
       // Coordinates: int(N·ρ).
    assert_eq!(coordinate_count(CoordinateAxis::Columns, 10, 6, 0.25), 1);
    assert_eq!(coordinate_count(CoordinateAxis::Rows, 10, 6, 0.25), 2);
    assert_eq!(coordinate_count(CoordinateAxis::RandK, 10, 6, 0.25), 15);
    // Blocks: round half to even of #blocks·ρ, seen through the plan (two layers: 14 blocks).
    let model = frugal_nn::llama::LlamaConfig {
        vocab_size: 16,
        hidden_size: 4,
        intermediate_size: 8,
        num_attention_heads: 2,
        num_hidden_layers: 2,
        num_key_value_heads: None,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        max_position_embeddings: 8,
    };
    let specs = model.labelled_shapes();
    let plan = frugal::memory::plan(&config("frugal"), &specs).unwrap();
    let active = plan
        .iter()
        .filter(|(info, b)| info.role == frugal::Role::Projectable && b.moments > 0)
        .count();
    assert_eq!(active, 4, "14 blocks · 0.25 = 3.5 → 4");
}

#[test]
fn optimizer_subspaces_have_the_configured_sizes() {
    use frugal::projection::Subspace;
    let vars = named_vars(
        &[
            ("layers.0.mlp.up_proj.weight", &[20, 8]),
            ("layers.0.mlp.down_proj.weight", &[8, 20]),
        ],
        3,
    );
    for (spec, expect_up, expect_down) in [
        ("frugal:projection=columns,density=0.3", 20 * 2, 8 * 6),
        ("frugal:projection=rows,density=0.3", 6 * 8, 2 * 20),
        ("frugal:projection=randk,density=0.3", 48, 48),
        ("frugal:projection=randperm,density=0.3", 20 * 2, 2 * 20),
        ("frugal-svd:density=0.3", 20 * 2, 2 * 20),
    ] {
        let cfg = frugal::OptimizerConfig::parse_spec(spec).unwrap();
        let (opt, _) = run(&cfg, &clone_vars(&vars), 1, 4);
        for (name, expect) in [
            ("layers.0.mlp.up_proj.weight", expect_up),
            ("layers.0.mlp.down_proj.weight", expect_down),
        ] {
            let st = opt.param_state(name).unwrap();
            assert_eq!(st.m.len(), expect, "{spec}: {name}");
            assert!(matches!(
                st.subspace,
                Subspace::Coords(_) | Subspace::Basis(_)
            ));
        }
    }
}
