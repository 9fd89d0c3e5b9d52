//! Parameters from the caller: labels, default labels, the weight-decay mask, and what the
//! optimizer refuses at construction.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use frugal::{Error, Frugal, Label, OptimizerConfig, Param, Role};

fn var(values: &[f32]) -> Var {
    Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn weight_decay_applies_by_mask_and_label() {
    // Zero gradients: AdamW moves nothing, so only decay changes the weights, by 1 − lr·wd.
    for (mask, expect_b) in [("all", 0.99f32), ("labels", 1.0)] {
        let a = var(&[1.0, 2.0]);
        let b = var(&[1.0, 2.0]);
        let params = vec![
            Param::new("a", a.clone(), Label::state_full(None)),
            Param::new(
                "b",
                b.clone(),
                Label::state_full(None).with_weight_decay(false),
            ),
        ];
        let cfg = OptimizerConfig::parse_spec(&format!(
            "adamw:lr=0.1,weight_decay=0.1,decay_mask={mask}"
        ))
        .unwrap();
        let mut opt = Frugal::from_params(params, cfg).unwrap();
        let mut g = candle_core::backprop::GradStore::default();
        for v in [&a, &b] {
            g.insert(v.as_tensor(), v.as_tensor().zeros_like().unwrap());
        }
        opt.step_grads(&g).unwrap();
        assert_eq!(values(&a), [0.99, 1.98], "{mask}");
        assert_eq!(values(&b), [expect_b, 2.0 * expect_b], "{mask}");
    }
}

#[test]
fn default_labels_route_an_mlp_and_keep_the_given_order() {
    let vars = named_vars(
        &[
            ("mlp.fc2.weight", &[3, 5]),
            ("mlp.fc1.weight", &[5, 4]),
            ("mlp.fc1.bias", &[5]),
        ],
        1,
    );
    let opt = Frugal::from_named(vars, OptimizerConfig::preset("frugal").unwrap()).unwrap();
    let seen: Vec<(String, Role)> = opt.params().map(|p| (p.name.clone(), p.role)).collect();
    assert_eq!(
        seen,
        [
            ("mlp.fc2.weight".to_string(), Role::Projectable),
            ("mlp.fc1.weight".to_string(), Role::Projectable),
            ("mlp.fc1.bias".to_string(), Role::StateFull),
        ]
    );
    // Two projectable tensors are two blocks; ρ = 0.25 of 2 rounds (half to even) to 0 active.
    let schedule = opt.block_schedule().unwrap();
    assert_eq!((schedule.blocks, schedule.active_count), (2, 0));
}

#[test]
fn unsupported_parameters_are_refused_when_the_optimizer_is_built() {
    let bf16 = Var::from_tensor(
        &Tensor::new(&[1.0f32, 2.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap(),
    )
    .unwrap();
    let err = Frugal::from_named(
        vec![("w".into(), bf16)],
        OptimizerConfig::preset("adamw").unwrap(),
    )
    .err()
    .unwrap();
    assert!(matches!(err, Error::UnsupportedTensor { .. }), "{err}");
    assert!(err.to_string().contains("f32"), "{err}");
    let twice = vec![("w".into(), var(&[1.0])), ("w".into(), var(&[2.0]))];
    let err = Frugal::from_named(twice, OptimizerConfig::preset("adamw").unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("given twice"), "{err}");
}

#[test]
fn state_free_modules_take_signsgd_steps_without_state() {
    // Coordinates on q (2 of 4 columns), ρ = 0 on o: o's update is −lr·s_free·sign(g) exactly.
    let vars = named_vars(
        &[
            ("layers.0.q.weight", &[3, 4]),
            ("layers.0.o.weight", &[3, 4]),
            ("norm.weight", &[4]),
        ],
        3,
    );
    let spec = "frugal:projection=coordinates,density=0.5,lr=0.01,state_free_lr_scale=0.1,\
                projectable_modules=q\\.weight,state_free_modules=o\\.weight";
    let mut opt =
        Frugal::from_named(vars.clone(), OptimizerConfig::parse_spec(spec).unwrap()).unwrap();
    let roles: Vec<Role> = opt.params().map(|p| p.role).collect();
    assert_eq!(roles, [Role::Projectable, Role::StateFree, Role::StateFull]);
    let before = values(&vars[1].1);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(4);
    let (flat, grads) = random_grads(&vars, &mut rng);
    opt.step_grads(&grads).unwrap();
    let after = values(&vars[1].1);
    for ((b, a), g) in before.iter().zip(&after).zip(&flat[1]) {
        let want = b - 0.01 * 0.1 * g.signum();
        assert!((a - want).abs() < 1e-7, "{a} vs {want}");
    }
    // State: 2 columns × 3 rows × 2 moments for q, 4 × 2 for the norm, nothing for o.
    let bytes = opt.state_bytes();
    assert_eq!(bytes.moments, 4 * (2 * 3 * 2 + 4 * 2));
    // The memory plan agrees with the optimizer.
    let infos: Vec<_> = opt.params().cloned().collect();
    let shapes: Vec<frugal::labels::ParamShape> = vars
        .iter()
        .map(|(name, v)| frugal::labels::ParamShape {
            name: name.clone(),
            shape: v.dims().to_vec(),
            label: Label::default_for(name, v.dims()),
        })
        .collect();
    let plan = frugal::memory::plan(&OptimizerConfig::parse_spec(spec).unwrap(), &shapes).unwrap();
    assert_eq!(
        plan.iter().map(|(_, b)| b.total()).sum::<usize>(),
        bytes.total()
    );
    assert_eq!(frugal::labels::RoleCounts::of(&infos).state_free, 12);
}
