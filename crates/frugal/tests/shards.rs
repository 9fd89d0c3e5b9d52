//! Shards of one optimizer (ZeRO-1 style): each keeps the state of, and updates, only the
//! parameters it owns; with the updated values exchanged after every step they update exactly
//! like the whole optimizer and hold its state between them; their saved parts load into any
//! other sharding of it.

mod common;

use common::*;
use frugal::{Engine, Frugal};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::ops::Range;
use std::path::{Path, PathBuf};

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

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
        // A shard cannot save the whole state; the shards' parts, loaded together in any
        // order, make the whole optimizer, which saves the whole optimizer's very file.
        let err = shards[0]
            .save_state(&dir.join("shard.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("save_state_part"), "{err}");
        let parts: Vec<PathBuf> = (0..2)
            .map(|r| dir.join(format!("part-{r}.safetensors")))
            .collect();
        for (shard, path) in shards.iter().zip(&parts) {
            shard.save_state_part(path).unwrap();
        }
        // The file, streamed from the state, holds the bytes of the state in memory.
        assert!(read(&parts[1]) == shards[1].owned_state().unwrap());
        let whole_path = dir.join("whole.safetensors");
        whole.save_state(&whole_path).unwrap();
        let mut joined = build(clone_vars(&whole_vars));
        joined.load_state_parts(&[&parts[1], &parts[0]]).unwrap();
        let joined_path = dir.join("joined.safetensors");
        joined.save_state(&joined_path).unwrap();
        assert!(
            read(&joined_path) == read(&whole_path),
            "{label}: the joined parts differ from the whole optimizer's state"
        );
        // Loaded by a shard, the whole state and the parts alike leave it that shard's state.
        for files in [vec![whole_path.clone()], parts.clone()] {
            let mut again = build(clone_vars(&vars[1]));
            again.shard(&share(1)).unwrap();
            again.load_state_parts(&files).unwrap();
            assert_eq!(again.state_bytes(), shards[1].state_bytes(), "{label}");
            assert!(
                again.owned_state().unwrap() == shards[1].owned_state().unwrap(),
                "{label}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// AdamW over one state-full tensor of 1024 values and one matrix.
const SPLIT: &[(&str, &[usize])] = &[
    ("model.embed_tokens.weight", &[64, 16]),
    ("model.layers.0.mlp.up_proj.weight", &[8, 16]),
];

/// An AdamW optimizer over [`SPLIT`] owning `owned`, after `steps` seeded steps.
fn stepped(owned: &[Option<Range<usize>>], steps: usize) -> Frugal {
    let vars = named_vars(SPLIT, 3);
    let mut opt = Frugal::from_named(vars.clone(), config("adamw")).unwrap();
    opt.shard(owned).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for _ in 0..steps {
        let (_, g) = random_grads(&vars, &mut rng);
        opt.step_grads(&g).unwrap();
    }
    opt
}

#[test]
fn parts_saved_by_two_shards_load_into_three_shards_cut_elsewhere() {
    let dir = std::env::temp_dir().join(format!("frugal-reshard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let two = [[Some(0..512), Some(0..128)], [Some(512..1024), None]];
    let three = [
        [Some(0..256), None],
        [Some(256..768), Some(0..128)],
        [Some(768..1024), None],
    ];
    let parts: Vec<PathBuf> = two
        .iter()
        .enumerate()
        .map(|(r, owned)| {
            let path = dir.join(format!("part-{r}.safetensors"));
            stepped(owned, 3).save_state_part(&path).unwrap();
            path
        })
        .collect();
    let whole = stepped(&[Some(0..1024), Some(0..128)], 3);
    for owned in &three {
        // Rank 1 of three joins the ends of both saved pieces; ranks 0 and 2 cut one.
        let mut loaded = Frugal::from_named(named_vars(SPLIT, 3), config("adamw")).unwrap();
        loaded.shard(owned).unwrap();
        loaded.load_state_parts(&parts).unwrap();
        let mut cut = stepped(&[Some(0..1024), Some(0..128)], 3);
        cut.shard(owned).unwrap();
        assert!(loaded.owned_state().unwrap() == cut.owned_state().unwrap());
        assert_eq!(loaded.steps_done(), 3);
    }
    // Every part is needed once, and all of one state.
    let fresh = || Frugal::from_named(named_vars(SPLIT, 3), config("adamw")).unwrap();
    let err = fresh()
        .load_state_parts(&parts[..1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("part is missing"), "{err}");
    let doubled = [&parts[0], &parts[1], &parts[1]];
    let err = fresh().load_state_parts(&doubled).unwrap_err().to_string();
    assert!(err.contains("twice"), "{err}");
    let later = dir.join("later.safetensors");
    stepped(&two[1], 4).save_state_part(&later).unwrap();
    let err = fresh()
        .load_state_parts(&[&parts[0], &later])
        .unwrap_err()
        .to_string();
    assert!(err.contains("different states"), "{err}");
    let mut loaded = fresh();
    loaded.load_state_parts(&parts).unwrap();
    assert!(loaded.owned_state().unwrap() == whole.owned_state().unwrap());
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
