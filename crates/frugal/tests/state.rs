//! Optimizer state: resets, frozen blocks, exact byte accounting, save/load, and bad input.

mod common;

use common::*;
use frugal::projection::Subspace;
use frugal::{Error, Frugal, StateBytes};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn reset_restarts_statistics_and_galore_keeps_them() {
    let name = "model.layers.0.mlp.up_proj.weight";
    for (spec, reset) in [
        ("frugal-svd:update_gap=3", true),
        ("galore:update_gap=3", false),
    ] {
        let vars = named_vars(&[(name, &[12, 6])], 1);
        let cfg = frugal::OptimizerConfig::parse_spec(spec).unwrap();
        let mut opt = Frugal::from_named(vars.clone(), cfg).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut before = Vec::new();
        for step in 0..4 {
            let (flat, g) = random_grads(&vars, &mut rng);
            opt.step_grads(&g).unwrap();
            let st = opt.param_state(name).unwrap();
            if step == 2 {
                assert_eq!(st.t, 3);
                before = st.m.to_vec();
            }
            if step == 3 {
                // Step 3 chose a new subspace: m = keep·m_before + (1 − β1)·down(G).
                let Subspace::Basis(b) = st.subspace else {
                    panic!("expected a basis")
                };
                let (r, c) = b.low_shape();
                let mut low = vec![0.0; r * c];
                b.down(&flat[0], &mut low, &mut Vec::new());
                let keep = if reset { 0.0 } else { 0.9 };
                assert_eq!(st.t, if reset { 1 } else { 4 });
                for ((m, l), old) in st.m.iter().zip(&low).zip(&before) {
                    let want = keep * old + 0.1 * l;
                    assert!((m - want).abs() < 1e-5, "{spec}: {m} vs {want}");
                }
            }
        }
    }
}

#[test]
fn blockwise_reset_clears_state_when_the_active_set_changes() {
    let vars = named_vars(LLAMA_LIKE, 3);
    let cfg = config("frugal:density=0.4,update_gap=2,block_order=ascending");
    let mut opt = Frugal::from_named(vars.clone(), cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut active_sets = Vec::new();
    for _ in 0..4 {
        let (_, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        let mut active: Vec<String> = opt
            .params()
            .filter(|p| p.role == frugal::Role::Projectable)
            .filter(|p| *opt.param_state(&p.name).unwrap().subspace == Subspace::All)
            .map(|p| p.name.clone())
            .collect();
        active.sort();
        let t: Vec<u64> = active
            .iter()
            .map(|n| opt.param_state(n).unwrap().t)
            .collect();
        active_sets.push((active, t));
    }
    // 5 blocks · 0.4 = 2 active; ascending: blocks {0,1} for two steps, then {2,3}.
    assert_eq!(active_sets[0].0, active_sets[1].0);
    assert_ne!(active_sets[1].0, active_sets[2].0);
    assert_eq!(active_sets[0].0.len(), 2);
    assert_eq!(active_sets[1].1, [2, 2]);
    assert_eq!(
        active_sets[2].1,
        [1, 1],
        "statistics restart with the new set"
    );
    // Inactive blocks hold no state at all.
    for p in opt.params().filter(|p| p.role == frugal::Role::Projectable) {
        let st = opt.param_state(&p.name).unwrap();
        if *st.subspace == Subspace::Nothing {
            assert!(st.m.is_empty() && st.v.is_empty());
        }
    }
}

#[test]
fn badam_freezes_inactive_layers() {
    let vars = named_vars(LLAMA_LIKE, 5);
    let start: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    // Two layers, ρ = 0.5 → one active layer; descending starts with the last layer.
    let (_, end) = run(&config("badam:density=0.5,lr=0.01"), &vars, 3, 6);
    for (((name, _), a), b) in vars.iter().zip(&start).zip(&end) {
        let projectable = ["q_proj", "up_proj", "down_proj", "v_proj", "gate_proj"]
            .iter()
            .any(|p| name.contains(p));
        let frozen = projectable && name.contains("layers.0.");
        assert_eq!(a == b, frozen, "{name}: frozen={frozen}");
    }
}

/// The paper's 60M LLaMA parameter set: vocab 32000, hidden 512, intermediate 1376, 8 layers.
fn llama_60m() -> Vec<frugal::ParamShape> {
    frugal_nn::llama::LlamaConfig::builtin("60m")
        .unwrap()
        .labelled_shapes()
}

#[test]
fn state_bytes_match_closed_forms_at_60m() {
    let (v, h, i) = (32000usize, 512usize, 1376usize);
    let non_projectable = 2 * v * h + 17 * h;
    let layer = 4 * h * h + 3 * i * h;
    let total = non_projectable + 8 * layer;
    // SVD at ρ = 0.25 (rank 128 on the smaller side): per layer, q/k/v/o keep 512×128 moments and
    // a 128×512 basis; gate/up 1376×128 and 128×512; down (512×1376, left) 128×1376 and 512×128.
    let r = 128;
    let svd_moments = 8 * (4 * h * r + 2 * i * r + r * i);
    let svd_basis = 4 * (4 * r * h + 2 * r * h + h * r);
    let expect: &[(&str, StateBytes)] = &[
        (
            "adamw",
            StateBytes {
                moments: 8 * total,
                ..Default::default()
            },
        ),
        // 56 blocks · 0.25 = 14 active, descending: layers 6 and 7.
        (
            "frugal",
            StateBytes {
                moments: 8 * (non_projectable + 2 * layer),
                ..Default::default()
            },
        ),
        // 8-bit moments: a byte per value and an f32 scale per 256 (every tensor here is a
        // whole number of blocks): 65/64 bytes per value and moment, 3.94× less than f32.
        (
            "frugal:moment_storage=8bit",
            StateBytes {
                moments: 2 * (non_projectable + 2 * layer) * 65 / 64,
                ..Default::default()
            },
        ),
        (
            "badam",
            StateBytes {
                moments: 8 * (non_projectable + 2 * layer),
                ..Default::default()
            },
        ),
        (
            "frugal-svd",
            StateBytes {
                moments: 8 * non_projectable + 8 * svd_moments,
                projections: 8 * svd_basis,
                indices: 0,
            },
        ),
        (
            "galore",
            StateBytes {
                moments: 8 * non_projectable + 8 * svd_moments,
                projections: 8 * svd_basis,
                indices: 0,
            },
        ),
        // Columns: int(n·ρ) = 128 of 512 (q,k,v,o,gate,up) and 344 of 1376 (down).
        (
            "frugal:projection=columns",
            StateBytes {
                moments: 8 * non_projectable + 8 * 8 * (4 * h * 128 + 2 * i * 128 + h * 344),
                projections: 0,
                indices: 8 * 4 * (6 * 128 + 344),
            },
        ),
        ("signsgd", StateBytes::default()),
        ("sgd", StateBytes::default()),
        // Fira and APOLLO: GaLore's shapes plus the limiter's one number per projected tensor.
        (
            "fira",
            StateBytes {
                moments: 8 * non_projectable + 8 * svd_moments + 4 * 56,
                projections: 8 * svd_basis,
                indices: 0,
            },
        ),
        (
            "apollo",
            StateBytes {
                moments: 8 * non_projectable + 8 * svd_moments + 4 * 56,
                projections: 8 * svd_basis,
                indices: 0,
            },
        ),
        // Rank 1: moments of 512 (q,k,v,o), 1376 (gate, up, down) values; bases of 512.
        (
            "apollo-mini",
            StateBytes {
                moments: 8 * non_projectable + 8 * 8 * (4 * h + 3 * i) + 4 * 56,
                projections: 8 * 4 * 7 * h,
                indices: 0,
            },
        ),
    ];
    let shapes = llama_60m();
    assert_eq!(
        shapes
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum::<usize>(),
        total
    );
    for (spec, want) in expect {
        let cfg = config(spec);
        let planned = frugal::memory::plan(&cfg, &shapes).unwrap();
        let mut sum = StateBytes::default();
        for (_, b) in &planned {
            sum += *b;
        }
        assert_eq!(sum, *want, "plan for {spec}");
    }
    // The optimizer's own count after a real step agrees (zero gradients keep this fast).
    let vars: Vec<(String, candle_core::Var)> = shapes
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                candle_core::Var::zeros(
                    p.shape.as_slice(),
                    candle_core::DType::F32,
                    &candle_core::Device::Cpu,
                )
                .unwrap(),
            )
        })
        .collect();
    let mut store = candle_core::backprop::GradStore::default();
    for (_, v) in &vars {
        store.insert(v.as_tensor(), v.as_tensor().ones_like().unwrap());
    }
    for (spec, want) in expect.iter().filter(|(s, _)| {
        [
            "adamw",
            "frugal",
            "frugal:projection=columns",
            "apollo-mini",
        ]
        .contains(s)
    }) {
        let mut opt = Frugal::from_named(vars.clone(), config(spec)).unwrap();
        opt.step_grads(&store).unwrap();
        assert_eq!(opt.state_bytes(), *want, "held by {spec}");
    }
}

#[test]
fn resumed_run_is_bit_identical() {
    let dir = std::env::temp_dir().join(format!("frugal-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for spec in [
        "frugal:block_order=random,update_gap=2",
        "frugal-svd:update_gap=2",
        "frugal:projection=randk,update_gap=2",
        "galore:update_gap=2",
        "galore:update_gap=2,moment_transfer=project",
        "frugal:state_full=lion,projection=columns,update_gap=2",
        "frugal-svd:svd_solver=randomized,update_gap=2",
        "fira:update_gap=2",
        "apollo:update_gap=2",
        // √128 as a state-free scale: a float that needs exact JSON parsing to resume.
        "apollo-mini:update_gap=2",
        "frugal:block_order=random,update_gap=2,moment_storage=8bit",
        "galore:update_gap=2,moment_transfer=project,moment_storage=8bit",
        "frugal:projection=columns,update_gap=2,moment_storage=8bit",
        "frugal:update_gap=2,density=0.8,density_schedule=linear,density_steps=6,density_min=0.2",
        "frugal-svd:update_gap=2,density_schedule=cosine,density_steps=6,density_min=0.1",
    ] {
        let vars = named_vars(LLAMA_LIKE, 7);
        let cfg = config(spec);
        let (_, straight) = run(&cfg, &clone_vars(&vars), 7, 8);

        let first = clone_vars(&vars);
        let mut opt = Frugal::from_named(first.clone(), cfg.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for _ in 0..3 {
            let (_, g) = random_grads(&first, &mut rng);
            opt.step_grads(&g).unwrap();
        }
        let path = dir.join("opt.safetensors");
        opt.save_state(&path).unwrap();
        let resumed = clone_vars(&first);
        drop(opt);
        let mut opt = Frugal::from_named(resumed.clone(), cfg.clone()).unwrap();
        opt.load_state(&path).unwrap();
        assert_eq!(opt.steps_done(), 3);
        for _ in 3..7 {
            let (_, g) = random_grads(&resumed, &mut rng);
            opt.step_grads(&g).unwrap();
        }
        let got: Vec<Vec<f32>> = resumed.iter().map(|(_, v)| values(v)).collect();
        assert_eq!(got, straight, "{spec}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("frugal-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = named_vars(LLAMA_LIKE, 9);

    let mut cfg = config("frugal");
    cfg.density = -0.1;
    assert!(matches!(
        Frugal::from_named(vars.clone(), cfg),
        Err(Error::InvalidSetting { .. })
    ));

    // A NaN gradient names the parameter and leaves every parameter untouched.
    let before: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
    let mut opt = Frugal::from_named(vars.clone(), config("frugal")).unwrap();
    let mut flat: Vec<Vec<f32>> = vars
        .iter()
        .map(|(_, v)| vec![0.5; v.elem_count()])
        .collect();
    flat[5][3] = f32::NAN;
    match opt.step_grads(&grads_from(&vars, &flat)) {
        Err(Error::NonFiniteGradient { name }) => assert_eq!(name, vars[5].0),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    assert_eq!(
        before,
        vars.iter().map(|(_, v)| values(v)).collect::<Vec<_>>()
    );

    // State from another model: renamed parameter, changed shape, corrupt file, other settings.
    flat[5][3] = 0.1;
    opt.step_grads(&grads_from(&vars, &flat)).unwrap();
    let path = dir.join("s.safetensors");
    opt.save_state(&path).unwrap();
    let mut renamed = clone_vars(&vars);
    renamed[0].0 = "model.embed.weight".into();
    let mut other = Frugal::from_named(renamed, config("frugal")).unwrap();
    assert!(matches!(
        other.load_state(&path),
        Err(Error::StateMismatch(_))
    ));
    let mut reshaped = named_vars(LLAMA_LIKE, 9);
    reshaped[1].1 =
        candle_core::Var::zeros((12, 13), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    let mut other = Frugal::from_named(reshaped, config("frugal")).unwrap();
    assert!(matches!(
        other.load_state(&path),
        Err(Error::ShapeChanged { .. })
    ));
    let mut other = Frugal::from_named(clone_vars(&vars), config("frugal:density=0.5")).unwrap();
    assert!(matches!(
        other.load_state(&path),
        Err(Error::StateMismatch(_))
    ));
    std::fs::write(&path, b"not a state").unwrap();
    let mut other = Frugal::from_named(clone_vars(&vars), config("frugal")).unwrap();
    assert!(matches!(
        other.load_state(&path),
        Err(Error::StateFile { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

type TensorEdit = Box<dyn Fn(&str, &mut Vec<usize>, &mut Vec<u8>)>;
type MetaEdit = Box<dyn Fn(&mut serde_json::Value)>;

/// Rewrites a saved state: `edit` may change any tensor (name, dtype, shape, bytes) and the
/// JSON metadata.
fn rewrite(
    path: &std::path::Path,
    edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<u8>),
    edit_meta: impl Fn(&mut serde_json::Value),
) {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&meta["frugal"]).unwrap();
    edit_meta(&mut json);
    meta.insert("frugal".into(), json.to_string());
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
            edit(&name, &mut shape, &mut data);
            (name, view.dtype(), shape, data)
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, dt, s, d)| (n.clone(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

#[test]
fn crafted_or_damaged_state_files_are_errors_not_panics() {
    let dir = std::env::temp_dir().join(format!("frugal-crafted-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = named_vars(LLAMA_LIKE, 12);
    let saved = |spec: &str| {
        let path = dir.join(format!("{}.safetensors", spec.replace([':', ','], "-")));
        let (opt, _) = run(&config(spec), &clone_vars(&vars), 2, 13);
        opt.save_state(&path).unwrap();
        path
    };
    let idx = |name: &str| name.ends_with("up_proj.weight::idx");
    let u32_at =
        |d: &mut Vec<u8>, i: usize, v: u32| d[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    let cases: Vec<(&str, TensorEdit, MetaEdit, &str)> = vec![
        (
            "frugal:projection=columns,density=0.5",
            Box::new(move |n, _, d| {
                if idx(n) {
                    {
                        let last = d.len() / 4 - 1;
                        u32_at(d, last, 10_000)
                    }
                }
            }),
            Box::new(|_| {}),
            "index",
        ),
        (
            "frugal:projection=columns,density=0.5",
            Box::new(move |n, _, d| {
                if idx(n) {
                    u32_at(d, 0, 11);
                    u32_at(d, 1, 3)
                }
            }),
            Box::new(|_| {}),
            "sorted",
        ),
        (
            "frugal-svd",
            Box::new(|n, s, d| {
                if n.ends_with("up_proj.weight::right") {
                    d.truncate(d.len() - 8);
                    s[0] -= 2;
                }
            }),
            Box::new(|_| {}),
            "factor",
        ),
        (
            "frugal:block_order=ascending",
            Box::new(|_, _, _| {}),
            Box::new(|m| m["schedule"]["front"] = serde_json::json!(999)),
            "block",
        ),
        (
            "frugal:projection=columns,density=0.5",
            Box::new(|_, _, _| {}),
            Box::new(|m| m["params"][1]["subspace"]["m"] = serde_json::json!(3)),
            "matrix",
        ),
    ];
    for (spec, edit, edit_meta, expect) in cases {
        let path = saved(spec);
        rewrite(&path, edit, edit_meta);
        let mut other = Frugal::from_named(clone_vars(&vars), config(spec)).unwrap();
        let err = other.load_state(&path).unwrap_err().to_string();
        assert!(
            err.contains(expect),
            "{spec}: expected `{expect}` in: {err}"
        );
    }
    // A damaged file whose tensor table is unreadable is an error, not a missing tensor.
    let path = saved("frugal");
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes.truncate(len - 16);
    std::fs::write(&path, &bytes).unwrap();
    let mut other = Frugal::from_named(clone_vars(&vars), config("frugal")).unwrap();
    assert!(matches!(
        other.load_state(&path),
        Err(Error::StateFile { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_decaying_density_shrinks_the_active_set_and_the_ranks() {
    let vars = named_vars(LLAMA_LIKE, 5);
    // Five projectable tensors (blocks); ρ 0.8 → 0.2 linearly over 6 steps, T = 2: round(5ρ) =
    // 4, 3, 2, 1 active blocks at the changes of steps 0, 2, 4, 6.
    let cfg = config(
        "frugal:update_gap=2,density=0.8,density_schedule=linear,density_steps=6,density_min=0.2",
    );
    let mut opt = Frugal::from_named(vars.clone(), cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (mut active, mut moments) = (Vec::new(), Vec::new());
    for step in 0..8 {
        let (_, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        if step % 2 == 0 {
            active.push(opt.block_schedule().unwrap().active_count);
            moments.push(opt.state_bytes().moments);
        }
    }
    assert_eq!(active, [4, 3, 2, 1]);
    assert!(moments.windows(2).all(|w| w[1] < w[0]), "{moments:?}");

    // SVD: the 12×12 q_proj keeps round(12ρ) vectors, ρ = 0.5 → 0.25 on a half cosine over 4
    // steps: 6, then round(4.5) = 4 (half to even), then 3.
    let name = "model.layers.0.self_attn.q_proj.weight";
    let cfg = config(
        "frugal-svd:update_gap=2,density=0.5,density_schedule=cosine,density_steps=4,density_min=0.25",
    );
    let mut opt = Frugal::from_named(vars.clone(), cfg).unwrap();
    let mut ranks = Vec::new();
    for step in 0..6 {
        let (_, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
        if step % 2 == 0 {
            ranks.push(opt.param_state(name).unwrap().m.len() / 12);
        }
    }
    assert_eq!(ranks, [6, 4, 3]);
}

#[test]
fn the_update_gap_grows_on_a_plateau_and_resumes_exactly() {
    let vars = named_vars(LLAMA_LIKE, 9);
    let cfg = config("frugal:update_gap=2,gap_growth=2,gap_max=8,block_order=ascending");
    // A flat loss: steps 0-1 set the reference, then T doubles at each change up to 8.
    let changes =
        |opt: &mut Frugal, from: u64, to: u64, rng: &mut ChaCha8Rng, seen: &mut Vec<u64>| {
            for step in from..to {
                let before = opt.update_gap().next;
                let (_, g) = random_grads(&vars, rng);
                opt.step_grads(&g).unwrap();
                opt.observe_loss(1.0);
                if opt.update_gap().next != before || step == 0 {
                    seen.push(step);
                }
            }
        };
    let mut straight = Frugal::from_named(clone_vars(&vars), cfg.clone()).unwrap();
    let mut seen = Vec::new();
    changes(
        &mut straight,
        0,
        26,
        &mut ChaCha8Rng::seed_from_u64(1),
        &mut seen,
    );
    assert_eq!(seen, [0, 2, 4, 8, 16, 24]);
    assert_eq!(straight.update_gap().gap, 8);

    // Saved at step 6 (inside a period of T = 4) and resumed: the same changes follow.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut first = Frugal::from_named(clone_vars(&vars), cfg.clone()).unwrap();
    let mut seen = Vec::new();
    changes(&mut first, 0, 6, &mut rng, &mut seen);
    let path = std::env::temp_dir().join(format!("frugal-gap-{}.safetensors", std::process::id()));
    first.save_state(&path).unwrap();
    let mut resumed = Frugal::from_named(clone_vars(&vars), cfg).unwrap();
    resumed.load_state(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(resumed.update_gap(), first.update_gap());
    changes(&mut resumed, 6, 26, &mut rng, &mut seen);
    assert_eq!(seen, [0, 2, 4, 8, 16, 24]);
    assert_eq!(resumed.update_gap(), straight.update_gap());
}
