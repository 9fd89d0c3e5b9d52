//! Shards of one optimizer (ZeRO-1 style): each keeps the state of, and updates, only the
//! parameters it owns; with the updated values exchanged after every step they update exactly
//! like the whole optimizer, hold its state between them, and gathered they save its state.

mod common;

use common::*;
use frugal::Frugal;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn shards_update_like_the_whole_optimizer_and_hold_its_state_between_them() {
    let dir = std::env::temp_dir().join(format!("frugal-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Every projection family, SVD and random refreshes, blocks, 8-bit moments, moment transfer
    // and the scaled state-free rules; T = 2 crosses refreshes.
    for spec in [
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
    ] {
        let cfg = config(spec);
        let whole_vars = named_vars(LLAMA_LIKE, 7);
        let mut whole = Frugal::from_named(whole_vars.clone(), cfg.clone()).unwrap();
        // Rank r owns every parameter i with i % 2 == r.
        let n = LLAMA_LIKE.len();
        let owner: Vec<usize> = (0..n).map(|i| i % 2).collect();
        let vars = [clone_vars(&whole_vars), clone_vars(&whole_vars)];
        let mut shards: Vec<Frugal> = (0..2)
            .map(|r| {
                let mut opt = Frugal::from_named(vars[r].clone(), cfg.clone()).unwrap();
                let owned: Vec<bool> = owner.iter().map(|&o| o == r).collect();
                opt.shard(&owned).unwrap();
                assert_eq!(opt.owned(), owned);
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
            // Each shard updated only its own parameters; the other's are still the old values.
            for i in 0..n {
                let (own, other) = (&vars[owner[i]][i].1, &vars[1 - owner[i]][i].1);
                other.set(own.as_tensor()).unwrap();
            }
            for vars in &vars {
                let got: Vec<Vec<f32>> = vars.iter().map(|(_, v)| values(v)).collect();
                let want: Vec<Vec<f32>> = whole_vars.iter().map(|(_, v)| values(v)).collect();
                assert_eq!(got, want, "{spec}, step {step}");
            }
            let held: usize = shards.iter().map(|s| s.state_bytes().total()).sum();
            assert_eq!(held, whole.state_bytes().total(), "{spec}, step {step}");
        }
        // A shard cannot save alone; gathered into one, the shards save the whole state.
        let path = dir.join("shard.safetensors");
        let err = shards[0].save_state(&path).unwrap_err().to_string();
        assert!(err.contains("absorb"), "{err}");
        let part = shards[1].owned_state().unwrap();
        shards[0].absorb_state(&part).unwrap();
        shards[0].save_state(&path).unwrap();
        let whole_path = dir.join("whole.safetensors");
        whole.save_state(&whole_path).unwrap();
        assert!(
            std::fs::read(&path).unwrap() == std::fs::read(&whole_path).unwrap(),
            "{spec}: the gathered state differs from the whole optimizer's"
        );
        // Loaded by a shard, a whole state keeps only that shard's part.
        let mut again = Frugal::from_named(clone_vars(&vars[1]), cfg.clone()).unwrap();
        again.shard(&shards[1].owned()).unwrap();
        again.load_state(&whole_path).unwrap();
        assert_eq!(again.state_bytes(), shards[1].state_bytes(), "{spec}");
        assert_eq!(again.owned_state().unwrap(), part, "{spec}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shard_owners_split_the_state_evenly_within_one_tensor() {
    let shapes = frugal_nn::llama::LlamaConfig::builtin("60m")
        .unwrap()
        .labelled_shapes();
    for spec in [
        "adamw",
        "frugal-svd",
        "galore",
        "frugal:density=0",
        "frugal",
    ] {
        let cfg = config(spec);
        let plan = frugal::memory::plan(&cfg, &shapes).unwrap();
        let total: usize = plan.iter().map(|(_, b)| b.total()).sum();
        let largest = plan.iter().map(|(_, b)| b.total()).max().unwrap();
        for world in [2, 3, 4] {
            let owners = frugal::memory::shard_owners(&cfg, &shapes, world).unwrap();
            assert!(owners.iter().all(|&r| r < world));
            let mut held = vec![0usize; world];
            let mut elements = vec![0usize; world];
            for ((info, bytes), &r) in plan.iter().zip(&owners) {
                held[r] += bytes.total();
                elements[r] += info.numel();
            }
            assert_eq!(held.iter().sum::<usize>(), total);
            // Blocks rotate: their first period's state is not what the split evens out.
            if !spec.starts_with("frugal") || spec.contains("svd") || spec.contains("density=0") {
                for h in &held {
                    assert!(*h <= total / world + largest, "{spec}, {world}: {held:?}");
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
