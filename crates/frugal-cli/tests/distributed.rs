//! Data-parallel training under `mpirun` (the `mpi` feature; `scripts/setup-mpi.sh` installs
//! MPI): two ranks against one process (pre-training and fine-tuning), checkpoints across world
//! sizes, a killed rank, and ranks that disagree.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Flags of every run here: those of the other tests but the batch size (each test sets it),
/// 30 steps, every loss logged.
fn dp(extra: &[&'static str]) -> Vec<&'static str> {
    let fast = FAST
        .iter()
        .position(|f| *f == "--batch-size")
        .map_or(FAST.to_vec(), |i| [&FAST[..i], &FAST[i + 2..]].concat());
    let steps = ["--steps", "30", "--log-every", "1", "--eval-every", "30"];
    [&fast[..], &steps, extra].concat()
}

/// `mpirun -np <ranks> frugal <args>`, allowed to run as root.
fn mpirun(ranks: usize, cache: &Path) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string(), "--oversubscribe"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("FRUGAL_CACHE", cache)
        .arg(env!("CARGO_BIN_EXE_frugal"));
    c
}

/// `mpirun -np 2 frugal train <flags> --out <out>`.
fn mpi_train(cache: &Path, flags: &[&str], out: &Path) -> Command {
    let mut c = mpirun(2, cache);
    c.arg("train").args(flags).arg("--out").arg(out);
    c
}

/// The logged training losses, as numbers.
fn loss_values(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter_map(|v| v.get("loss").and_then(|l| l.as_f64()))
        .collect()
}

/// Asserts that two runs' losses agree within `tol` at every step.
fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "{what}, step {}: {x} vs {y}",
            step + 1
        );
    }
}

#[test]
fn two_ranks_of_batch_4_train_like_one_process_of_batch_8() {
    let dir = scratch("dp-equal");
    // AdamW clips every step: the global norm adds the two ranks' squared norms of the means
    // each owns.
    for (optimizer, tol, clip) in [
        ("adamw", 1e-5, "0.05"),
        ("frugal", 2e-3, "0"),
        ("frugal-svd", 2e-3, "0"),
        ("galore", 1e-2, "0"),
    ] {
        // T = 10: blocks and SVD subspaces change twice within the run.
        let flags = dp(&[
            "--optimizer",
            optimizer,
            "--update-gap",
            "10",
            "--clip",
            clip,
        ]);
        // One thread, as each of the two ranks on two cores has: the SVD's sums depend on the
        // number of threads.
        let run = |name: &str, extra: &[&str]| {
            let out = dir.join(format!("{optimizer}-{name}"));
            let extra = [extra, &["--threads", "1"]].concat();
            run_ok(&mut train(&dir, &out, &[&flags[..], &extra].concat()));
            out
        };
        let whole = run("batch-8", &["--batch-size", "8"]);
        let halves = run("two-halves", &["--batch-size", "4", "--grad-accum", "2"]);
        let ranks = dir.join(format!("{optimizer}-two-ranks"));
        let out = run_ok(&mut mpi_train(
            &dir,
            &[&flags[..], &["--batch-size", "4"]].concat(),
            &ranks,
        ));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("a global batch of 8 sequences"), "{log}");
        // Rank 0 alone logs: one summary line.
        assert_eq!(log.matches("done: 30 steps").count(), 1, "{log}");
        // Two micro-batches of 4 in one process add the same two halves of each gradient in the
        // same order as the two ranks: the same losses, bit for bit.
        assert_eq!(losses(&ranks), losses(&halves), "{optimizer}");
        assert_eq!(summary(&ranks)["val_loss"], summary(&halves)["val_loss"]);
        let norms = grad_norms(&ranks);
        assert_eq!(norms, grad_norms(&halves), "{optimizer}");
        assert_eq!(norms.len(), if clip == "0" { 0 } else { 30 }, "{norms:?}");
        assert!(
            norms.iter().all(|n| n.parse::<f64>().unwrap() > 0.05),
            "{norms:?}"
        );
        // The model is the one-process run's; the ranks' parts of the state join into its state.
        let (a, b) = (
            ranks.join("checkpoints/step-30"),
            halves.join("checkpoints/step-30"),
        );
        let read = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
        assert!(read(&a) == read(&b), "{optimizer}");
        assert_parts_join_into(&a, &b);
        check_sharded_state(&dir, optimizer, &ranks, &halves);
        // One batch of 8 sums in another order. signSGD (FRUGAL's state-free rule) turns the
        // last-bit differences of near-zero gradient entries into whole steps of ±lr, so FRUGAL's
        // losses drift (6e-4 with blocks, 1.2e-3 with SVD subspaces by step 30); GaLore's rate
        // of 1e-2 and its SVD subspaces, which turn with small changes of the gradient, let it
        // drift 4e-3. AdamW (clipped) stays within 5e-7.
        let (a, b) = (loss_values(&whole), loss_values(&ranks));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        eprintln!("{optimizer}: largest loss difference to one batch of 8: {worst:e}");
        assert_eq!(a.len(), 30);
        assert_close(&a, &b, tol, optimizer);
        assert!(a[29] < a[0] - 1.0, "{optimizer}: the loss must fall: {a:?}");
        assert_eq!(summary(&ranks)["tokens"], summary(&whole)["tokens"]);
    }
}

/// Asserts that the two ranks' parts of the optimizer state in checkpoint `ranks` join into the
/// state of the one-process checkpoint `whole`: the same position, and each parameter's pieces,
/// in element order, the same values and fields, bit for bit.
fn assert_parts_join_into(ranks: &Path, whole: &Path) {
    use safetensors::SafeTensors;
    use serde_json::Value;
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).unwrap_or_else(|e| panic!("{e}: {}", path.display()))
    };
    assert!(!ranks.join("optimizer.safetensors").exists());
    let whole_bytes = read(whole.join("optimizer.safetensors"));
    let parts: Vec<Vec<u8>> = (1..=2)
        .map(|k| read(ranks.join(format!("optimizer-{k:05}-of-00002.safetensors"))))
        .collect();
    let meta = |bytes: &[u8]| -> Value {
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        serde_json::from_str(&header.metadata().as_ref().unwrap()["frugal"]).unwrap()
    };
    let want = meta(&whole_bytes);
    let metas: Vec<Value> = parts.iter().map(|p| meta(p)).collect();
    for m in &metas {
        for key in ["format", "config", "step", "rng", "schedule", "gap"] {
            assert_eq!(m[key], want[key], "{key}");
        }
        assert!(
            !m["params"].as_array().unwrap().is_empty(),
            "each rank holds a part"
        );
    }
    let tensors: Vec<SafeTensors> = parts
        .iter()
        .map(|p| SafeTensors::deserialize(p).unwrap())
        .collect();
    let whole_tensors = SafeTensors::deserialize(&whole_bytes).unwrap();
    for t in &tensors {
        for key in t.names() {
            assert!(
                whole_tensors.tensor(key).is_ok(),
                "{key} is not in the whole state"
            );
        }
    }
    for p in want["params"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let mut held: Vec<(u64, usize, Value)> = Vec::new();
        for (rank, m) in metas.iter().enumerate() {
            for q in m["params"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|q| q["name"] == name)
            {
                let mut q = q.clone();
                let start = q["piece"][0].as_u64().unwrap_or(0);
                q.as_object_mut().unwrap().remove("piece");
                held.push((start, rank, q));
            }
        }
        held.sort_by_key(|h| h.0);
        assert!(!held.is_empty(), "{name} is in no part");
        for (_, _, q) in &held {
            assert_eq!(q, p, "{name}");
        }
        for (key, view) in whole_tensors.tensors() {
            if key.strip_prefix(name).is_some_and(|k| k.starts_with("::")) {
                let joined: Vec<u8> = held
                    .iter()
                    .flat_map(|(_, rank, _)| tensors[*rank].tensor(&key).unwrap().data().to_vec())
                    .collect();
                assert!(joined == view.data(), "{key}");
            }
        }
    }
}

/// Each rank of `ranks` held half the state of the one-process run `whole`, within one tensor,
/// as `frugal memory --world-size 2` plans it (blocks rotate: their plan is the first period's).
fn check_sharded_state(cache: &Path, optimizer: &str, ranks: &Path, whole: &Path) {
    let per_rank: Vec<u64> = summary(ranks)["optimizer_state_bytes_per_rank"]
        .as_array()
        .expect("per-rank state in the summary")
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    let total = summary(whole)["optimizer_state_total_bytes"]
        .as_u64()
        .unwrap();
    assert_eq!(per_rank.len(), 2);
    assert_eq!(per_rank.iter().sum::<u64>(), total, "{optimizer}");
    let rss = summary(ranks)["peak_rss_bytes_per_rank"].clone();
    assert!(
        rss.as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|b| b.as_u64() > Some(0))),
        "{rss}"
    );
    // The largest tensor of `tiny` is the 4096 × 256 embedding: 8 MiB of AdamW moments.
    let largest = 2 * 4 * 4096 * 256;
    for held in &per_rank {
        assert!(
            *held <= total / 2 + largest,
            "{optimizer}: {per_rank:?} of {total}"
        );
    }
    let out = run_ok(frugal(cache).args([
        "memory",
        "--model",
        "tiny",
        "--json",
        "--world-size",
        "2",
        "--optimizer",
        optimizer,
    ]));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let planned: Vec<u64> = plan["state_per_rank"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            ["moments", "projections", "indices"]
                .iter()
                .map(|k| s[k].as_u64().unwrap())
                .sum()
        })
        .collect();
    assert_eq!(planned.len(), 2);
    if optimizer != "frugal" {
        assert_eq!(planned, per_rank, "{optimizer}");
    }
}

#[test]
fn checkpoints_of_two_ranks_resume_on_two_ranks_or_one() {
    let dir = scratch("dp-resume");
    let flags = dp(&[
        "--batch-size",
        "4",
        "--save-every",
        "10",
        "--update-gap",
        "10",
    ]);
    let straight = dir.join("straight");
    run_ok(&mut mpi_train(&dir, &flags, &straight));
    let paused = dir.join("paused");
    run_ok(&mut mpi_train(
        &dir,
        &[&flags[..], &["--stop-after", "15"]].concat(),
        &paused,
    ));
    let single = dir.join("single");
    copy_dir(&paused, &single);
    // On the same two ranks the run continues bit for bit.
    run_ok(mpirun(2, &dir).args(["train", "--resume"]).arg(&paused));
    assert_eq!(losses(&paused), losses(&straight));
    assert_eq!(summary(&paused)["val_loss"], summary(&straight)["val_loss"]);
    // One process takes the global batch of 8 as two micro-batches of 4.
    let out = run_ok(frugal(&dir).args(["train", "--resume"]).arg(&single));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("keeps its global batch of 8"), "{log}");
    let (a, b) = (loss_values(&single), loss_values(&straight));
    assert_eq!(a[..15], b[..15]);
    // Two micro-batches on one process sum their gradients in another order than two ranks
    // do: the losses (near 5.5, where an f32 step is 4.8e-7) then differ by a few dozen steps
    // of the last bit at most (2.4e-5 seen), without drifting apart.
    assert_close(&a, &b, 1e-4, "resumed on one process");
}

/// Copies a run directory (files and folders).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The process id of rank `rank` among the children of `launcher`.
fn rank_pid(launcher: u32, rank: usize) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .unwrap_or_default();
    children.split_whitespace().find_map(|pid| {
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
        env.split(|&b| b == 0)
            .any(|v| v == wanted.as_bytes())
            .then(|| pid.parse().ok())
            .flatten()
    })
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    let dir = scratch("dp-kill");
    let flags = dp(&["--batch-size", "4", "--save-every", "5"]);
    let straight = dir.join("straight");
    run_ok(&mut mpi_train(&dir, &flags, &straight));
    let killed = dir.join("killed");
    let job = mpirun(2, &dir)
        .args(["--collective-timeout", "20", "train"])
        .args(&flags)
        .arg("--out")
        .arg(&killed)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("checkpoints/step-10/trainer.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(job.id(), 1).expect("rank 1 runs under mpirun");
    let sent = Instant::now();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let out = job.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        sent.elapsed() < Duration::from_secs(30),
        "{:?}",
        sent.elapsed()
    );
    assert!(
        log.contains("signal 9") || log.contains("a rank died"),
        "{log}"
    );
    // Every checkpoint left behind is complete, and the run resumes onto the unbroken losses.
    run_ok(mpirun(2, &dir).args(["train", "--resume"]).arg(&killed));
    assert_eq!(losses(&killed), losses(&straight));
}

#[test]
fn ranks_started_with_different_settings_stop_at_start_up() {
    let dir = scratch("dp-mismatch");
    let run = dir.join("run");
    let rank = |optimizer: &str| -> Vec<String> {
        let mut args = vec!["-np", "1", env!("CARGO_BIN_EXE_frugal"), "train"];
        args.extend(dp(&[]));
        args.extend(["--optimizer", optimizer, "--out"]);
        let mut args: Vec<String> = args.into_iter().map(String::from).collect();
        args.push(run.display().to_string());
        args
    };
    let out = Command::new("mpirun")
        .arg("--oversubscribe")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("FRUGAL_CACHE", &*dir)
        .args(rank("adamw"))
        .arg(":")
        .args(rank("galore"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("different settings") && log.contains("\"adamw\" vs \"galore\""),
        "{log}"
    );
    assert_eq!(
        log.matches("error:").count(),
        1,
        "rank 0 alone reports: {log}"
    );
    assert!(!run.join("config.json").exists());
}

#[test]
fn per_layer_updates_of_sharded_ranks_match_their_whole_steps() {
    // Each layer's gradients are averaged as the layered backward pass hands them over, and the
    // clipping norm is that of the averaged gradient: the same bits as the whole step.
    let dir = scratch("dp-layers");
    let flags = dp(&[
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--clip",
        "0.5",
        "--steps",
        "8",
    ]);
    let whole = dir.join("whole");
    run_ok(&mut mpi_train(&dir, &flags, &whole));
    let layered = dir.join("layered");
    run_ok(&mut mpi_train(
        &dir,
        &[&flags[..], &["--per-layer-updates"]].concat(),
        &layered,
    ));
    assert_eq!(losses(&layered), losses(&whole));
    assert_eq!(grad_norms(&layered), grad_norms(&whole));
    assert!(grad_norms(&whole).len() == 8, "{:?}", grad_norms(&whole));
}

/// The global gradient norms a run logged (with clipping), as written.
fn grad_norms(run: &Path) -> Vec<String> {
    metrics(run)
        .iter()
        .filter_map(|v| v.get("grad_norm").map(|n| n.to_string()))
        .collect()
}

#[test]
fn a_comparison_runs_across_ranks_and_tunes_like_one_process() {
    // Successive halving with a diverging candidate: rank 0 decides what each round runs, the
    // divergence fails every rank alike, and rank 0 alone writes the report.
    let dir = scratch("dp-compare");
    let compare = |ranks: usize, out: &Path| {
        let mut c = match ranks {
            1 => frugal(&dir),
            n => mpirun(n, &dir),
        };
        c.args([
            "compare",
            "--steps",
            "4",
            "--seeds",
            "0",
            "--methods",
            "adamw",
        ])
        .args(dp(&[
            "--steps",
            "4",
            "--eval-every",
            "1",
            "--test-fraction",
            "0.1",
        ]))
        .args([
            "--tune",
            "lr=1e9,1e-3,3e-3",
            "--halving-rate",
            "2",
            "--threads",
            "1",
        ])
        .arg("--out")
        .arg(out);
        c
    };
    let one = dir.join("one");
    run_ok(compare(1, &one).args(["--batch-size", "4", "--grad-accum", "2"]));
    let two = dir.join("two");
    let out = run_ok(compare(2, &two).args(["--batch-size", "4"]));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("comparison written to").count(), 1, "{log}");
    let (a, b) = (
        json(&one.join("compare.json")),
        json(&two.join("compare.json")),
    );
    assert_eq!(a["tuning"][0]["chosen"], b["tuning"][0]["chosen"]);
    assert!(b["tuning"][0]["candidates"][0]["failed"].is_string());
    assert_eq!(a["rows"][0]["test_ppl_mean"], b["rows"][0]["test_ppl_mean"]);
    // Continuing the finished comparison on two ranks trains nothing.
    let again = run_ok(
        compare(2, &two)
            .args(["--batch-size", "4", "--resume"])
            .arg(&two),
    );
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        log.contains("already reached") && !log.contains("done:"),
        "{log}"
    );
}

/// all-MiniLM-L6-v2 as `scripts/fetch-finetune.sh` installs it.
fn minilm() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/finetune/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run scripts/fetch-finetune.sh",
        dir.display()
    );
    dir
}

/// 60 short reviews, positive exactly when they name a good thing.
fn reviews(dir: &Path) -> std::path::PathBuf {
    let (good, bad) = (["great", "lovely", "superb"], ["awful", "dull", "broken"]);
    let things = ["film", "meal", "phone", "hotel", "book"];
    let mut csv = String::from("label,text\n");
    for i in 0..60 {
        let (label, word) = match i % 2 {
            0 => ("pos", good[i % 3]),
            _ => ("neg", bad[i % 3]),
        };
        csv += &format!("{label},the {} was {word} today\n", things[i % 5]);
    }
    let path = dir.join("reviews.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

#[test]
fn two_ranks_fine_tune_like_one_process_and_resume_on_one() {
    let dir = scratch("dp-finetune");
    let (model, data) = (minilm(), reviews(&dir));
    let flags = |out: &Path| -> Vec<String> {
        let mut f: Vec<String> = [
            "finetune",
            "--steps",
            "6",
            "--max-len",
            "16",
            "--log-every",
            "1",
            "--eval-every",
            "3",
            "--val-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
            "--lr",
            "1e-4",
        ]
        .map(String::from)
        .to_vec();
        f.extend(["--model".into(), model.display().to_string()]);
        f.extend(["--data".into(), data.display().to_string()]);
        f.extend(["--out".into(), out.display().to_string()]);
        f
    };
    // One process with two micro-batches of 4 (one thread, as each rank has) against two ranks
    // of batch 4: dropout masks follow the examples' positions, the FRUGAL recipe's coordinates
    // the shared seed, and clipping (1.0 by default) adds the owners' norms.
    let one = dir.join("one");
    run_ok(frugal(&dir).args(flags(&one)).args([
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--threads",
        "1",
    ]));
    let ranks = dir.join("ranks");
    let out = run_ok(
        mpirun(2, &dir)
            .args(flags(&ranks))
            .args(["--batch-size", "4"]),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("a global batch of 8 examples"), "{log}");
    assert_eq!(log.matches("done: 6 steps").count(), 1, "{log}");
    assert_eq!(losses(&ranks), losses(&one));
    assert_eq!(losses(&one).len(), 6);
    let (a, b) = (summary(&ranks), summary(&one));
    for key in ["val_loss", "val", "test", "examples"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(a["world_size"], 2);
    assert_eq!(
        a["optimizer_state_bytes_per_rank"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (a, b) = (
        ranks.join("checkpoints/step-6"),
        one.join("checkpoints/step-6"),
    );
    let read = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(read(&a) == read(&b));
    assert_parts_join_into(&a, &b);
    // Paused on two ranks, resumed as one process with the same global batch.
    let paused = dir.join("paused");
    run_ok(
        mpirun(2, &dir)
            .args(flags(&paused))
            .args(["--batch-size", "4", "--stop-after", "3"]),
    );
    let out = run_ok(
        frugal(&dir)
            .args(["finetune", "--threads", "1", "--resume"])
            .arg(&paused),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("keeps its global batch of 8 examples"),
        "{log}"
    );
    assert_eq!(losses(&paused), losses(&one));
    assert_eq!(summary(&paused)["val"], summary(&one)["val"]);
}
