//! Shards of one optimizer (ZeRO-1 style): each keeps the state of, and updates, only the
//! parameters it owns; with the updated values exchanged after every step they update exactly
//! like the whole optimizer, hold its state between them, and gathered they save its state.

mod common;

use common::*;
use frugal::{Engine, Frugal};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;

/// Rank r's share of [`LLAMA_LIKE`] between two ranks: parameter i whole where i % 2 == r,
/// except the embeddings and the head (state-full, 384 values), split at 256.
fn share(rank: usize) -> Vec<Option<Range<usize>>> {
    LLAMA_LIKE
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            if name.contains("embed") || name.contains("lm_head") {
                Some(if rank == 0 { 0..256 } else { 256..n })
            } else {
                (i % 2 == rank).then_some(0..n)
            }
        })
        .collect()
}

#[test]
fn shards_update_like_the_whole_optimizer_and_hold_its_state_between_them() {
    let dir = std::env::temp_dir().join(format!("frugal-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Every projection family, SVD and random refreshes, blocks, 8-bit moments, moment transfer
    // and the scaled state-free rules; T = 2 crosses refreshes. Both engines.
    let specs = [
        "adamw",
        "frugal:update_gap=2",
        "frugal:update_gap=2,projection=blocks,block_order=random,density=0.4",
        "frugal:update_gap=2,projection=columns",
        "frugal:update_gap=2,projection=randk",
        "frugal:update_gap=2,projection=random",
        "frugal-svd:update_gap=2",
        "frugal-svd:update_gap=2,svd_solver=randomized",
        "galore:update_gap=2,moment_transfer=project",
        "badam:density=0.4,update_gap=2",
        "frugal:update_gap=2,moment_storage=8bit",
        "fira:update_gap=2",
        "apollo-mini:update_gap=2",
    ];
    let engines = [Engine::Fused, Engine::Tensors];
    for (spec, engine) in specs.iter().flat_map(|s| engines.map(|e| (*s, e))) {
        let label = format!("{spec} ({engine:?})");
        let cfg = config(spec);
        let whole_vars = named_vars(LLAMA_LIKE, 7);
        let build = |vars: Vec<(String, candle_core::Var)>| {
            let mut opt = Frugal::from_named(vars, cfg.clone()).unwrap();
            opt.set_engine(engine).unwrap();
            opt
        };
        let mut whole = build(whole_vars.clone());
        let vars = [clone_vars(&whole_vars), clone_vars(&whole_vars)];
        let mut shards: Vec<Frugal> = (0..2)
            .map(|r| {
                let mut opt = build(vars[r].clone());
                opt.shard(&share(r)).unwrap();
                assert_eq!(opt.owned(), share(r));
                opt
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for step in 0..5 {
            let (flat, g) = random_grads(&whole_vars, &mut rng);
            whole.step_grads(&g).unwrap();
            for (shard, vars) in shards.iter_mut().zip(&vars) {
                shard.step_grads(&grads_from(vars, &flat)).unwrap();
            }
            // Each shard updated only its own elements: every value comes from its owner.
            for i in 0..LLAMA_LIKE.len() {
                let mut merged = values(&vars[0][i].1);
                if let Some(r) = share(1)[i].clone() {
                    merged[r.clone()].copy_from_slice(&values(&vars[1][i].1)[r]);
                }
                for vars in &vars {
                    let t = candle_core::Tensor::from_slice(
                        &merged,
                        vars[i].1.shape(),
                        vars[i].1.device(),
                    );
                    vars[i].1.set(&t.unwrap()).unwrap();
                }
            }
            for vars in &vars {
                let got: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
                let want: Vec<Vec<f32>> = whole_vars.iter().map(|(_, v)| values(v)).collect();
                assert_eq!(got, want, "{label}, step {step}");
            }
            let held: usize = shards.iter().map(|s| s.state_bytes().total()).sum();
            assert_eq!(held, whole.state_bytes().total(), "{label}, step {step}");
        }
        // A shard cannot save alone; gathered into one, the shards save the whole state.
        let path = dir.join("shard.safetensors");
        let err = shards[0].save_state(&path).unwrap_err().to_string();
        assert!(err.contains("absorb"), "{err}");
        let part = shards[1].owned_state().unwrap();
        let held = shards[0].state_bytes();
        shards[0].absorb_state(&part).unwrap();
        shards[0].save_state(&path).unwrap();
        let whole_path = dir.join("whole.safetensors");
        whole.save_state(&whole_path).unwrap();
        // The file, streamed from the state, holds the bytes of the state in memory.
        assert!(std::fs::read(&whole_path).unwrap() == whole.owned_state().unwrap());
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&whole_path).unwrap(),
            "{label}: the gathered state differs from the whole optimizer's"
        );
        // Back to its share, the gathering shard holds what it held before.
        shards[0].shard(&share(0)).unwrap();
        assert_eq!(shards[0].state_bytes(), held, "{label}");
        // Loaded by a shard, a whole state keeps only that shard's part.
        let mut again = build(clone_vars(&vars[1]));
        again.shard(&share(1)).unwrap();
        again.load_state(&whole_path).unwrap();
        assert_eq!(again.state_bytes(), shards[1].state_bytes(), "{label}");
        assert_eq!(again.owned_state().unwrap(), part, "{label}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_shard_keeps_pieces_of_state_full_tensors_cut_at_blocks_and_only_gives_up_state() {
    let mut opt = Frugal::from_named(named_vars(LLAMA_LIKE, 7), config("adamw")).unwrap();
    let mut owned = share(0);
    owned[0] = Some(0..100);
    let err = opt.shard(&owned).unwrap_err().to_string();
    assert!(err.contains("multiples of 256"), "{err}");
    let mut owned = share(0);
    owned[1] = Some(0..64);
    let err = opt.shard(&owned).unwrap_err().to_string();
    assert!(
        err.contains("only state-full parameters are split"),
        "{err}"
    );
    opt.shard(&share(0)).unwrap();
    let err = opt.shard(&share(1)).unwrap_err().to_string();
    assert!(err.contains("can only give up state"), "{err}");
}

#[test]
fn shard_plans_split_the_state_evenly_within_one_unsplit_tensor() {
    let shapes = frugal_nn::llama::LlamaConfig::builtin("60m")
        .unwrap()
        .labelled_shapes();
    for spec in [
        "adamw",
        "frugal-svd",
        "galore",
        "frugal:density=0",
        "frugal",
        "frugal:moment_storage=8bit",
    ] {
        let cfg = config(spec);
        let plan = frugal::memory::plan(&cfg, &shapes).unwrap();
        let total: usize = plan.iter().map(|(_, b)| b.total()).sum();
        for world in [2, 3, 4, 8] {
            let shards = frugal::sharding::plan_shards(&cfg, &shapes, world).unwrap();
            let held: Vec<usize> = frugal::sharding::state_per_rank(&cfg, &shapes, world)
                .unwrap()
                .iter()
                .map(|b| b.total())
                .collect();
            assert_eq!(held.iter().sum::<usize>(), total, "{spec}, {world}");
            let mut elements = vec![0usize; world];
            let mut largest_whole = 0;
            for (i, (info, bytes)) in plan.iter().enumerate() {
                let pieces = shards.pieces(i);
                // The pieces cover the tensor in order; only state-full tensors are split.
                assert_eq!(pieces.first().unwrap().range.start, 0);
                assert_eq!(pieces.last().unwrap().range.end, info.numel());
                assert!(pieces
                    .windows(2)
                    .all(|w| w[0].range.end == w[1].range.start));
                if pieces.len() > 1 {
                    assert_eq!(info.role, frugal::Role::StateFull, "{}", info.name);
                    assert!(pieces
                        .iter()
                        .all(|p| p.range.start % frugal::sharding::PIECE == 0));
                } else {
                    largest_whole = largest_whole.max(bytes.total());
                }
                for p in pieces {
                    elements[p.rank] += p.range.len();
                }
            }
            // Blocks rotate: their first period's state is not what the split evens out.
            if !spec.starts_with("frugal") || spec.contains("svd") || spec.contains("density=0") {
                // Pieces are whole units of PIECE values: one unit's state (f32 AdamW) at most.
                let unit = 8 * frugal::sharding::PIECE;
                for h in &held {
                    assert!(
                        *h <= total / world + largest_whole.max(unit),
                        "{spec}, {world}: {held:?}"
                    );
                }
            }
            // Every rank gets a share of the work.
            assert!(
                elements.iter().all(|&e| e > 0),
                "{spec}, {world}: {elements:?}"
            );
        }
    }
}
