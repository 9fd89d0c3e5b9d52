//! End-to-end tests of the `frugal` binary: training, resuming, evaluation and bad input.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;

/// Resumes the paused run `paused` with per-layer updates and checks that it ends as the run
/// `straight` did, bit for bit.
fn resumes_onto(dir: &Path, paused: &Path, straight: &Path) {
    run_ok(
        frugal(dir)
            .args(["train", "--per-layer-updates", "--resume"])
            .arg(paused),
    );
    assert_eq!(losses(paused), losses(straight));
    assert_eq!(summary(paused)["val_loss"], summary(straight)["val_loss"]);
}

/// The final validation perplexity of a run's summary, checked to be below half the first.
fn halved_perplexity(summary: &Value) -> f64 {
    let (start, end) = (
        summary["initial_val_ppl"].as_f64().unwrap(),
        summary["val_ppl"].as_f64().unwrap(),
    );
    assert!(end < 0.5 * start, "perplexity {start} → {end}");
    end
}

/// The validation perplexity `frugal eval` gives the latest checkpoint of `run` (512 tokens).
fn evaluated_perplexity(dir: &Path, run: &Path) -> f64 {
    let out = run_ok(
        frugal(dir)
            .args(["eval", "--eval-tokens", "512", "--checkpoint"])
            .arg(run),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("perplexity ")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn training_writes_the_run_directory_and_lowers_perplexity() {
    let dir = scratch("basic");
    let run = dir.join("run");
    run_ok(&mut train(
        &dir,
        &run,
        &["--steps", "16", "--lr", "0.003", "--eval-every", "8"],
    ));
    for f in [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "loss.png",
        "tokenizer.json",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let ck = run.join("checkpoints/step-16");
    for f in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "trainer.json",
        "tokenizer.json",
    ] {
        assert!(ck.join(f).exists(), "missing checkpoint file {f}");
    }
    let m = metrics(&run);
    let steps: Vec<&Value> = m.iter().filter(|v| v.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 16);
    for key in ["step", "loss", "lr", "tokens", "tok_per_s", "elapsed_s"] {
        assert!(steps[0].get(key).is_some(), "metrics lack {key}");
    }
    assert_eq!(
        m.iter().filter(|v| v.get("val_ppl").is_some()).count(),
        3,
        "evaluations at 0, 8, 16"
    );
    let s = summary(&run);
    let end = halved_perplexity(&s);
    assert!(s["optimizer_state_bytes"]["moments"].as_u64().unwrap() > 0);
    let hf: Value = json(&ck.join("config.json"));
    assert_eq!(hf["model_type"], "llama");

    // `frugal eval` on the same split (and the run's sequence length) reproduces the final
    // validation perplexity.
    let ppl = evaluated_perplexity(&dir, &run);
    assert!(
        (ppl - end).abs() / end < 1e-3,
        "eval {ppl} vs training {end}"
    );

    // `--split all` evaluates the validation split, then the training split, as one mean.
    let eval = |split: &str, tokens: usize| -> (usize, f64) {
        let out = run_ok(
            frugal(&dir)
                .args([
                    "eval",
                    "--split",
                    split,
                    "--eval-tokens",
                    &tokens.to_string(),
                ])
                .arg("--checkpoint")
                .arg(&run),
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |name: &str| {
            text.split(name)
                .nth(1)
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        (
            field("tokens ").parse().unwrap(),
            field("loss ").parse().unwrap(),
        )
    };
    let (val_tokens, val_loss) = eval("val", 0);
    let (train_tokens, train_loss) = eval("train", 1024);
    assert_eq!(train_tokens, 1024);
    let (all_tokens, all_loss) = eval("all", val_tokens + 1024);
    assert_eq!(all_tokens, val_tokens + 1024);
    let mean = (val_loss * val_tokens as f64 + train_loss * 1024.0) / all_tokens as f64;
    assert!((all_loss - mean).abs() < 2e-4, "all {all_loss} vs {mean}");

    // `frugal generate` continues a prompt from the run's latest checkpoint (or the checkpoint
    // folder itself), the same text for the same seed.
    let command = |checkpoint: &Path, flags: &[&str]| {
        let mut command = frugal(&dir);
        command
            .args([
                "generate",
                "--prompt",
                "The whale",
                "--max-new-tokens",
                "12",
            ])
            .args(flags)
            .arg("--checkpoint")
            .arg(checkpoint);
        command
    };
    let generate = |checkpoint: &Path, flags: &[&str]| {
        let out = run_ok(&mut command(checkpoint, flags));
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (greedy, said) = generate(&run, &["--temperature", "0"]);
    assert!(greedy.starts_with("The whale"), "{greedy}");
    assert!(greedy.len() > "The whale\n".len(), "{greedy}");
    assert!(said.contains("tokens/s); stopped: "), "{said}");
    assert_eq!(generate(&ck, &["--temperature", "0"]).0, greedy);
    // Samples are generated together: greedy, each is the text of one sample alone.
    let (twice, said) = generate(&run, &["--temperature", "0", "--samples", "2"]);
    assert_eq!(twice, format!("{greedy}\n---\n{greedy}"));
    assert!(said.contains("2 samples together: "), "{said}");
    // A sample's text does not depend on the samples drawn with it.
    let one_at_a_time = generate(
        &run,
        &["--seed", "5", "--samples", "3", "--batch-size", "1"],
    );
    assert!(
        one_at_a_time.1.contains("3 samples 1 at a time: "),
        "{}",
        one_at_a_time.1
    );
    assert_eq!(
        generate(&run, &["--seed", "5", "--samples", "3"]).0,
        one_at_a_time.0
    );
    let sampled = generate(&run, &["--seed", "5", "--samples", "2"]).0;
    assert_eq!(sampled.matches("\n---\n").count(), 1, "{sampled}");
    assert_eq!(
        generate(&run, &["--seed", "5", "--samples", "2"]).0,
        sampled
    );
    assert_ne!(
        generate(&run, &["--seed", "6", "--samples", "2"]).0,
        sampled
    );
    // Several prompts (flags, then a file) decoded together: each continuation is that of
    // its prompt alone, in order.
    let alone = |prompt: &str| {
        let out = run_ok(
            frugal(&dir)
                .args(["generate", "--prompt", prompt, "--max-new-tokens", "12"])
                .args(["--temperature", "0", "--checkpoint"])
                .arg(&run),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "It was\n\nCall me Ishmael.\n").unwrap();
    let file = prompts.to_str().unwrap();
    let (three, said) = generate(&run, &["--temperature", "0", "--prompts", file]);
    let each = [greedy.clone(), alone("It was"), alone("Call me Ishmael.")];
    assert_eq!(three, each.join("\n---\n"));
    assert!(
        said.contains("3 continuations of 3 prompts, together: "),
        "{said}"
    );
    // `--prompts -` reads them from standard input.
    let out = run_with_input(
        &mut command(&run, &["--temperature", "0", "--prompts", "-"]),
        b"It was\n\nCall me Ishmael.\n",
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), three);
    // --interactive continues each line as it comes, as a prompt of its own.
    let lines = format!("It was\n\n{}\nCall me Ishmael.\n", "whale ".repeat(300));
    let out = run_with_input(
        frugal(&dir)
            .args(["generate", "--interactive", "--max-new-tokens", "12"])
            .args(["--temperature", "0", "--checkpoint"])
            .arg(&run),
        lines.as_bytes(),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    let printed = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        printed,
        format!("{}{}", alone("It was"), alone("Call me Ishmael."))
    );
    // A line too long for the model is reported, and the session goes on.
    assert!(said.contains("max_position_embeddings"), "{said}");
    // --output: the same continuations as JSON lines, each prompt's samples in order.
    let (text, _) = generate(&run, &["--seed", "5", "--samples", "2", "--prompts", file]);
    let jsonl = dir.join("continuations.jsonl");
    let (printed, said) = generate(
        &run,
        &[
            "--seed",
            "5",
            "--samples",
            "2",
            "--prompts",
            file,
            "--output",
            jsonl.to_str().unwrap(),
        ],
    );
    assert!(
        printed.is_empty() && said.contains("written to"),
        "{printed}{said}"
    );
    assert!(!dir.join("continuations.jsonl.partial").exists());
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let parts: Vec<&str> = text.trim_end_matches('\n').split("\n\n---\n").collect();
    assert_eq!(records.len(), 6);
    assert_eq!(parts.len(), 6);
    for (r, (record, part)) in records.iter().zip(parts).enumerate() {
        let joined = format!(
            "{}{}",
            record["prompt"].as_str().unwrap(),
            record["continuation"].as_str().unwrap()
        );
        assert_eq!(joined, part, "record {r}");
        assert_eq!(record["prompt_index"], r / 2);
        assert_eq!(record["sample"], r % 2);
        assert_eq!(record["stop"], "max_tokens");
        assert_eq!(record["tokens"], 12);
    }
    // --stop cuts the text before the stop text, and says so.
    let continued: Vec<char> = greedy["The whale".len()..greedy.len() - 1]
        .chars()
        .collect();
    let stop: String = continued[continued.len() / 2..continued.len() / 2 + 3]
        .iter()
        .collect();
    let (cut, said) = generate(&run, &["--temperature", "0", "--stop", &stop]);
    let at = "The whale".len() + greedy["The whale".len()..].find(&stop).unwrap();
    assert_eq!(cut, format!("{}\n", &greedy[..at]));
    assert!(said.contains("stopped: a --stop text appeared"), "{said}");
    run_fails(
        frugal(&dir)
            .args([
                "generate",
                "--output",
                "/nonexistent/o.jsonl",
                "--checkpoint",
            ])
            .arg(&run),
        "--output /nonexistent/o.jsonl",
    );
    run_fails(
        frugal(&dir)
            .args([
                "generate",
                "--prompts",
                "/nonexistent/p.txt",
                "--checkpoint",
            ])
            .arg(&run),
        "--prompts /nonexistent/p.txt",
    );
    for (flags, named) in [
        (vec!["--top-p", "0"], "--top-p"),
        (vec!["--samples", "0"], "--samples"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--temperature=-1"], "--temperature"),
        (vec!["--stop", ""], "--stop"),
    ] {
        run_fails(
            frugal(&dir)
                .arg("generate")
                .args(&flags)
                .arg("--checkpoint")
                .arg(&run),
            named,
        );
    }
    // A prompt longer than the model's positions is refused before anything is printed.
    let out = run_fails(
        frugal(&dir)
            .args([
                "generate",
                "--prompt",
                &"whale ".repeat(300),
                "--checkpoint",
            ])
            .arg(&run),
        "max_position_embeddings",
    );
    assert!(out.stdout.is_empty());
    run_fails(
        frugal(&dir)
            .args(["generate", "--checkpoint"])
            .arg(dir.join("nowhere")),
        "nowhere",
    );
}

#[test]
fn resume_after_sigkill_is_bit_identical() {
    let dir = scratch("resume");
    let flags = [
        "--steps",
        "12",
        "--save-every",
        "3",
        "--eval-every",
        "6",
        "--optimizer",
        "frugal",
        "--update-gap",
        "4",
        "--block-order",
        "random",
    ];
    let straight = dir.join("straight");
    run_ok(&mut train(&dir, &straight, &flags));

    let killed = dir.join("killed");
    let mut child = train(&dir, &killed, &flags)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("checkpoints/step-3/trainer.json").exists() {
        assert!(Instant::now() < deadline, "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    run_ok(frugal(&dir).args(["train", "--resume"]).arg(&killed));
    assert_eq!(losses(&killed), losses(&straight));
    assert_eq!(summary(&killed)["val_loss"], summary(&straight)["val_loss"]);

    // A run paused between checkpoints (--stop-after) evaluates and saves there, then resumes
    // onto the same losses: the schedule is that of the full run.
    let paused = dir.join("paused");
    run_ok(&mut train(
        &dir,
        &paused,
        &[&flags[..], &["--stop-after", "5"]].concat(),
    ));
    let s = summary(&paused);
    assert_eq!(
        (s["steps"].as_u64(), s["interrupted"].as_bool()),
        (Some(5), Some(true))
    );
    assert!(metrics(&paused)
        .iter()
        .any(|v| v["step"] == 5 && v.get("val_loss").is_some()));
    assert!(paused.join("checkpoints/step-5").exists());
    // A resumed run keeps the run's settings: another value is refused, but the memory modes,
    // which leave every value as it was, may change.
    let out = frugal(&dir)
        .args(["train", "--update-gap", "5", "--resume"])
        .arg(&paused)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--update-gap 5 differs from the run"), "{err}");
    resumes_onto(&dir, &paused, &straight);

    // A resume that contradicts the run's settings is refused.
    let out = frugal(&dir)
        .args(["train", "--density", "0.5", "--resume"])
        .arg(&killed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--density"));
}

#[test]
fn lora_trains_adapters_resumes_exactly_and_reads_merged() {
    let dir = scratch("lora");
    let flags = [
        "--steps",
        "8",
        "--save-every",
        "4",
        "--eval-every",
        "4",
        "--lr",
        "0.01",
        "--optimizer",
        "lora:rank=4,alpha=8,targets=qv",
    ];
    let straight = dir.join("straight");
    let out = run_ok(&mut train(&dir, &straight, &flags));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("lora: adapters of rank 4, alpha 8 on q_proj and v_proj"),
        "{log}"
    );
    let s = summary(&straight);
    let end = halved_perplexity(&s);
    // The checkpoint is a Hugging Face LLaMA (the frozen linears as they started) with a PEFT
    // adapter beside it; the optimizer holds state for the adapters and the other weights only.
    let ck = straight.join("checkpoints/step-8");
    let peft = json(&ck.join("adapter_config.json"));
    assert_eq!(
        (peft["r"].as_u64(), peft["lora_alpha"].as_f64()),
        (Some(4), Some(8.0))
    );
    assert_eq!(
        peft["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let config: Value = json(&straight.join("config.json"));
    assert_eq!(config["optimizer"]["preset"], "adamw");
    assert_eq!(config["lora"]["train_others"], true);
    let report = run_ok(frugal(&dir).args([
        "memory",
        "--model",
        "tiny",
        "--optimizer",
        "lora:rank=4,alpha=8,targets=qv",
        "--json",
    ]));
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(
        report["total"]["state"]["moments"].as_u64(),
        s["optimizer_state_bytes"]["moments"].as_u64(),
        "the plan is the state held"
    );
    assert!(report["frozen"]["parameters"].as_u64().unwrap() > 0);

    // Paused and resumed with per-layer updates: the same losses, bit for bit.
    let paused = dir.join("paused");
    run_ok(&mut train(
        &dir,
        &paused,
        &[&flags[..], &["--stop-after", "4"]].concat(),
    ));
    resumes_onto(&dir, &paused, &straight);

    // `eval` and `generate` read the checkpoint with the adapters merged into the weights.
    let ppl = evaluated_perplexity(&dir, &straight);
    assert!(
        (ppl - end).abs() / end < 1e-3,
        "eval {ppl} vs training {end}"
    );
    run_ok(
        frugal(&dir)
            .args([
                "generate",
                "--prompt",
                "The whale",
                "--max-new-tokens",
                "4",
                "--checkpoint",
            ])
            .arg(&ck),
    );
    // Continued from the checkpoint as a pretrained model: merged, then trained as a whole, or
    // with new adapters and, from a pretrained model, the other weights frozen.
    let from = ck.to_str().unwrap();
    for (out, optimizer) in [("continued", "adamw"), ("tuned", "lora:rank=2")] {
        let flags = [
            "--steps",
            "1",
            "--optimizer",
            optimizer,
            "--init-from",
            from,
        ];
        run_ok(&mut train(&dir, &dir.join(out), &flags));
    }
    let tuned = dir.join("tuned");
    let config: Value = json(&tuned.join("config.json"));
    assert_eq!(config["lora"]["train_others"], false);
    assert_eq!(config["lora"]["targets"], "all");

    // Bad settings name themselves.
    for (spec, named) in [
        ("lora:others=some", "others `some` is not train or frozen"),
        ("lora:dropout=0.1", "use dropout=0"),
        ("lora:rank=0", "rank must be at least 1"),
        ("lora:targets=mlp", "targets `mlp` is not qv or all"),
        ("lora:rnak=4", "rnak"),
    ] {
        run_fails(
            &mut train(&dir, &dir.join("bad"), &["--optimizer", spec]),
            named,
        );
    }
}

#[test]
fn sgd_preset_equals_frugal_with_sgd_on_both_sides() {
    let dir = scratch("sgd");
    let (a, b) = (dir.join("a"), dir.join("b"));
    run_ok(&mut train(
        &dir,
        &a,
        &["--steps", "6", "--lr", "0.05", "--optimizer", "sgd"],
    ));
    run_ok(&mut train(
        &dir,
        &b,
        &[
            "--steps",
            "6",
            "--lr",
            "0.05",
            "--optimizer",
            "frugal",
            "--state-full",
            "sgd",
            "--state-free",
            "sgd",
        ],
    ));
    assert_eq!(losses(&a), losses(&b));
    assert_eq!(losses(&a).len(), 6);
}

#[test]
fn config_file_values_apply_and_flags_win() {
    let dir = scratch("toml");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "steps = 3\nbatch-size = 3\noptimizer = \"adamw\"\n").unwrap();
    let run = dir.join("run");
    run_ok(&mut train(
        &dir,
        &run,
        &["--config", cfg.to_str().unwrap(), "--steps", "2"],
    ));
    let config: Value = json(&run.join("config.json"));
    assert_eq!(config["args"]["steps"], 2);
    // FAST's --batch-size 2 is on the command line and wins over the file's 3.
    assert_eq!(config["args"]["batch_size"], 2);
    assert_eq!(config["optimizer"]["preset"], "adamw");
    std::fs::write(&cfg, "stepz = 3\n").unwrap();
    let out = train(&dir, &dir.join("bad"), &["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting `stepz`"));
}

#[test]
fn bad_input_exits_with_one_clear_message() {
    let dir = scratch("bad");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let short = dir.join("short.txt");
    std::fs::write(&short, "a few words.\n\nand a second paragraph.\n").unwrap();
    let latin1 = dir.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait\n\nsecond\n").unwrap();
    let bad_tok = dir.join("tokenizer.json");
    std::fs::write(&bad_tok, "{ not json").unwrap();
    let corrupt = dir.join("corrupt");
    run_ok(&mut train(&dir, &corrupt, &["--steps", "2"]));
    std::fs::write(
        corrupt.join("checkpoints/step-2/optimizer.safetensors"),
        b"garbage",
    )
    .unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--data".into(), s(&dir.join("missing.txt"))],
            "does not exist",
        ),
        (vec!["--data".into(), s(&empty)], "no text"),
        (vec!["--data".into(), s(&short)], "fewer than one sequence"),
        (vec!["--data".into(), s(&latin1)], "not valid UTF-8"),
        (
            vec!["--tokenizer".into(), s(&bad_tok)],
            "not a valid tokenizer.json",
        ),
        (vec!["--density".into(), "1.5".into()], "density"),
        (
            vec!["--seq-len".into(), "4096".into()],
            "max_position_embeddings",
        ),
        (vec!["--model".into(), "13m".into()], "built-in"),
        (
            vec!["--init-from".into(), s(&dir.join("nowhere"))],
            "not a Hugging Face LLaMA folder",
        ),
        (vec!["--instructions".into()], "an instruction record needs"),
        (
            vec!["--optimizer".into(), "adam".into()],
            "unknown optimizer preset",
        ),
        (
            vec!["--projection".into(), "pca".into()],
            "unknown projection",
        ),
        (vec!["--resume".into(), s(&corrupt)], "optimizer state"),
        (vec!["--lr".into(), "nan".into()], "finite number"),
        (vec!["--clip=-1".into()], "finite number"),
        (
            vec!["--opt".into(), "colour=blue".into()],
            "unknown optimizer setting `colour`",
        ),
        (
            vec!["--opt".into(), "proj_side=left".into()],
            "does not apply to projection `blocks`",
        ),
    ];
    for (i, (args, expect)) in cases.iter().enumerate() {
        let mut cmd = if args[0] == "--resume" {
            let mut c = frugal(&dir);
            c.arg("train");
            c
        } else {
            train(&dir, &dir.join(format!("case{i}")), &["--steps", "2"])
        };
        let out = cmd.args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expect),
            "{args:?}: expected `{expect}` in: {err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{args:?} panicked: {err}"
        );
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
    // Nothing of the corrupt run was overwritten.
    assert_eq!(
        std::fs::read(corrupt.join("checkpoints/step-2/optimizer.safetensors")).unwrap(),
        b"garbage"
    );
}

#[test]
fn torchrun_variables_run_one_rank_alone_and_refuse_cpu_ranks_without_mpi() {
    let dir = scratch("torchrun");
    let (alone, one_rank) = (dir.join("alone"), dir.join("one-rank"));
    run_ok(&mut train(&dir, &alone, &["--steps", "3"]));
    run_ok(
        train(&dir, &one_rank, &["--steps", "3"])
            .env("WORLD_SIZE", "1")
            .env("RANK", "0")
            .env("LOCAL_RANK", "0"),
    );
    assert_eq!(losses(&alone), losses(&one_rank));
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "1"),
            ],
            "mpirun -np 2",
        ),
        (&[("WORLD_SIZE", "2"), ("RANK", "1")], "MASTER_ADDR"),
        (&[("WORLD_SIZE", "2"), ("RANK", "2")], "WORLD_SIZE is 2"),
    ];
    for (vars, says) in cases {
        let mut cmd = train(&dir, &dir.join("refused"), &["--steps", "1"]);
        let out = run_fails(cmd.envs(vars.iter().copied()), says);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert!(!dir.join("refused").exists());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let dir = scratch("sigint");
    let run = dir.join("run");
    let child = train(&dir, &run, &["--steps", "100000", "--eval-every", "100000"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !run.join("metrics.jsonl").exists() || losses(&run).len() < 2 {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    let ck = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
    assert_eq!(ck, 1);
    assert_eq!(summary(&run)["interrupted"], true);
}

#[test]
fn memory_report_equals_what_training_holds() {
    let dir = scratch("memory");
    for opt in ["adamw", "frugal", "frugal-svd", "frugal:projection=columns"] {
        let out =
            run_ok(frugal(&dir).args(["memory", "--model", "tiny", "--json", "--optimizer", opt]));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        let run = dir.join(opt.replace([':', '='], "-"));
        run_ok(&mut train(
            &dir,
            &run,
            &["--steps", "1", "--vocab-size", "4096", "--optimizer", opt],
        ));
        let s = summary(&run);
        assert_eq!(
            report["total"]["state"], s["optimizer_state_bytes"],
            "{opt}"
        );
        assert_eq!(report["total"]["parameters"], s["parameters"], "{opt}");
    }
    let out = run_ok(frugal(&dir).args(["memory", "--model", "130m", "--optimizer", "frugal"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("optimizer state 537.1 MiB"), "{text}");
}

#[test]
fn memory_plans_ranks_within_an_even_share_with_the_embeddings_split() {
    let dir = scratch("memory-ranks");
    let out = run_ok(frugal(&dir).args([
        "memory",
        "--model",
        "60m",
        "--json",
        "--world-size",
        "8",
        "--optimizer",
        "adamw",
    ]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["split_tensors"],
        serde_json::json!(["model.embed_tokens.weight", "lm_head.weight"])
    );
    let shares: Vec<u64> = report["state_per_rank"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["moments"].as_u64().unwrap())
        .collect();
    let total = report["total"]["state"]["moments"].as_u64().unwrap();
    assert_eq!(shares.iter().sum::<u64>(), total);
    // Within one 64Ki-value piece of AdamW moments (512 KiB) of an even share.
    for s in &shares {
        assert!(s.abs_diff(total / 8) <= 8 << 16, "{shares:?} of {total}");
    }
}

#[test]
fn compare_reports_every_method_and_resumes() {
    let dir = scratch("compare");
    let out_dir = dir.join("cmp");
    let args = |extra: &[&str]| {
        let mut c = frugal(&dir);
        c.args([
            "compare",
            "--steps",
            "3",
            "--seeds",
            "0",
            "--eval-every",
            "3",
        ])
        .args(FAST);
        c.args(["--methods", "adamw frugal:density=0 adamw:lr=1e9"])
            .args(extra);
        c
    };
    run_ok(args(&["--out", out_dir.to_str().unwrap()]).stderr(std::process::Stdio::null()));
    let report: Value = json(&out_dir.join("compare.json"));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows[0]["val_ppl_mean"].as_f64().is_some()
            && rows[1]["state_mib"].as_f64().unwrap() < rows[0]["state_mib"].as_f64().unwrap()
    );
    assert!(
        rows[2]["failed"][0].as_str().unwrap().contains("loss"),
        "{}",
        rows[2]
    );
    let md = std::fs::read_to_string(out_dir.join("compare.md")).unwrap();
    assert!(md.contains("| adamw |") && md.contains("failed"));
    assert!(out_dir.join("compare.png").exists());
    let again = run_ok(&mut args(&["--resume", out_dir.to_str().unwrap()]));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already reached"));
}

#[test]
fn compare_tunes_by_successive_halving_and_reports_the_test_split() {
    let dir = scratch("tune");
    let out_dir = dir.join("cmp");
    let compare = |extra: &[&str]| {
        let mut c = frugal(&dir);
        c.args([
            "compare",
            "--steps",
            "4",
            "--seeds",
            "0",
            "--methods",
            "adamw",
        ])
        .args(FAST)
        .args(["--tune", "lr=1e9,1e-3,3e-3", "--halving-rate", "2"])
        .args(extra);
        c
    };
    let refused = compare(&[]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--test-fraction"));

    let flags = ["--test-fraction", "0.1", "--out", out_dir.to_str().unwrap()];
    run_ok(compare(&flags).stderr(std::process::Stdio::null()));
    let report: Value = json(&out_dir.join("compare.json"));
    // Three candidates: rounds of 1, 2 and 4 steps with 3, 2 and 1 of them; the diverging rate
    // fails in the first round and drops out.
    let tuning = &report["tuning"][0];
    let rounds: Vec<(u64, u64)> = tuning["rungs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["steps"].as_u64().unwrap(),
                r["candidates"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(rounds, [(1, 3), (2, 2), (4, 1)]);
    let candidates = tuning["candidates"].as_array().unwrap();
    assert!(candidates[0]["failed"].as_str().unwrap().contains("loss"));
    assert_eq!(candidates[0]["val"].as_array().unwrap().len(), 1);
    let chosen = &candidates[tuning["chosen"].as_u64().unwrap() as usize];
    assert_eq!(chosen["val"].as_array().unwrap().len(), 3);
    // The winner is the better of the two survivors at step 2, and its run went on to step 4.
    let at2 = |c: &Value| c["val"][1].as_f64().unwrap();
    assert!(at2(chosen) <= at2(&candidates[1]).min(at2(&candidates[2])));
    let run = Path::new(chosen["dir"].as_str().unwrap());
    let s = summary(run);
    assert_eq!(
        (s["steps"].as_u64(), s["interrupted"].as_bool()),
        (Some(4), Some(false))
    );
    let row = &report["rows"][0];
    assert_eq!(row["tuned"], chosen["values"]);
    assert_eq!(row["test_ppl_mean"], s["test_ppl"]);
    assert!(row["test_ppl_mean"].as_f64().unwrap() > 1.0);
    let md = std::fs::read_to_string(out_dir.join("compare.md")).unwrap();
    assert!(
        md.contains("test perplexity") && md.contains("## Tuning"),
        "{md}"
    );
    // Continuing the finished comparison trains nothing.
    let again = run_ok(&mut compare(&[
        "--test-fraction",
        "0.1",
        "--resume",
        out_dir.to_str().unwrap(),
    ]));
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(!log.contains("done:"), "{log}");
    // ... and reads every round's scores at that round's step, so the tuning is unchanged.
    let report_again: Value = json(&out_dir.join("compare.json"));
    assert_eq!(report_again["tuning"], report["tuning"]);
}

#[test]
fn low_memory_training_matches_the_normal_run_and_the_report_plans_every_mode() {
    let dir = scratch("low-memory");
    let normal = dir.join("normal");
    let layered = dir.join("layered");
    let low = dir.join("low");
    run_ok(&mut train(&dir, &normal, &["--steps", "4"]));
    // Checkpointing and per-layer updates change nothing, bit for bit.
    run_ok(&mut train(
        &dir,
        &layered,
        &[
            "--steps",
            "4",
            "--per-layer-updates",
            "--activation-checkpointing",
        ],
    ));
    assert_eq!(losses(&normal), losses(&layered));
    assert_eq!(summary(&normal)["val_loss"], summary(&layered)["val_loss"]);
    // The chunked loss changes f32 rounding only.
    let started = run_ok(&mut train(&dir, &low, &["--steps", "4", "--memory", "low"]));
    let (a, b) = (summary(&normal), summary(&low));
    let (a, b) = (
        a["val_loss"].as_f64().unwrap(),
        b["val_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-3 * a, "{a} vs {b}");
    assert!(summary(&low)["peak_rss_bytes"].as_u64().unwrap() > 0);
    let out = run_ok(frugal(&dir).args([
        "memory",
        "--model",
        "tiny",
        "--batch-size",
        "8",
        "--seq-len",
        "128",
        "--memory",
        "low",
        "--json",
    ]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    let peak = |i: usize| steps[i]["peak_bytes"].as_u64().unwrap();
    assert_eq!(steps[4]["mode"], "low");
    assert_eq!(steps[4]["selected"], true);
    // At 8 × 128 tokens the logits outweigh the head's gradient, so every technique saves.
    assert!((1..5).all(|i| peak(i) < peak(0)), "{steps:?}");
    // AdamW in the normal mode holds more than FRUGAL in the same mode.
    assert!(report["adamw_normal_peak_bytes"].as_u64().unwrap() > peak(0));
    // Each run's summary (and its first lines) give the peak `frugal memory` plans for its own
    // model (the vocabulary of --vocab-size), batch shape and memory mode.
    let config = low.join("checkpoints/step-4/config.json");
    let plans = |dtype: &str| -> Value {
        let out = run_ok(
            frugal(&dir)
                .arg("memory")
                .arg("--model")
                .arg(&config)
                .args([
                    "--batch-size",
                    "2",
                    "--seq-len",
                    "32",
                    "--dtype",
                    dtype,
                    "--json",
                ]),
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (planned, planned_bf16) = (plans("f32"), plans("bf16"));
    let peak_in = |report: &Value, mode: &str| {
        let steps = report["steps"].as_array().unwrap();
        steps.iter().find(|s| s["mode"] == mode).unwrap()["peak_bytes"].clone()
    };
    let peak_of = |mode: &str| peak_in(&planned, mode);
    assert_eq!(summary(&normal)["planned_peak_bytes"], peak_of("normal"));
    assert_eq!(summary(&low)["planned_peak_bytes"], peak_of("low"));
    assert_ne!(peak_of("low"), peak_of("normal"));
    // A bf16 run plans the tensor operations it runs, which keep more than the fused kernels.
    let bf16 = dir.join("bf16");
    let args = ["--steps", "2", "--memory", "low", "--dtype", "bf16"];
    let bf16_started = run_ok(&mut train(&dir, &bf16, &args));
    let said = String::from_utf8_lossy(&bf16_started.stderr);
    assert!(said.contains("in bf16 through tensor operations"), "{said}");
    assert_eq!(
        summary(&bf16)["planned_peak_bytes"],
        peak_in(&planned_bf16, "low")
    );
    let bytes = |v: Value| v.as_u64().unwrap();
    assert!(bytes(peak_in(&planned_bf16, "normal")) > bytes(peak_of("normal")));
    let mib = peak_of("low").as_f64().unwrap() / (1024.0 * 1024.0);
    let said = String::from_utf8_lossy(&started.stderr);
    assert!(
        said.contains(&format!("memory: planned peak about {mib:.0} MiB")),
        "{said}"
    );
    let err = frugal(&dir)
        .args(["train", "--loss-chunks", "0", "--steps", "1"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("--loss-chunks must be at least 1"));
}

#[test]
fn finetune_names_what_is_missing_and_memory_plans_each_method() {
    let dir = scratch("finetune");
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../frugal-nn/tests/fixtures/tiny-bert");
    let out = frugal(&dir)
        .arg("finetune")
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data is required"));
    let out = frugal(&dir)
        .arg("finetune")
        .arg("--model")
        .arg(dir.join("nowhere"))
        .args(["--data", "x.csv"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("config.json") && err.contains("fetch-finetune.sh"),
        "{err}"
    );
    // `frugal classify` names what it cannot use.
    for (args, named) in [
        (vec!["--text", "hi"], "names no classes (id2label)"),
        (vec![], "nothing to classify"),
    ] {
        run_fails(
            frugal(&dir)
                .arg("classify")
                .arg("--model")
                .arg(&model)
                .args(&args),
            named,
        );
    }
    run_fails(
        frugal(&dir)
            .args(["classify", "--text", "hi", "--model"])
            .arg(dir.join("nowhere")),
        "neither a model folder",
    );
    // A comparison runs the methods of --methods, never one --method.
    run_fails(
        frugal(&dir).args([
            "compare", "finetune", "--method", "adamw", "--data", "x.csv",
        ]),
        "--methods",
    );
    run_fails(
        frugal(&dir)
            .args(["compare", "finetune", "--methods", "adamw lora"])
            .arg("--model")
            .arg(&model),
        "--data is required",
    );
    let out = run_ok(
        frugal(&dir)
            .arg("memory")
            .arg("--model")
            .arg(&model)
            .args(["--json", "--labels", "3"]),
    );
    let plans: Value = serde_json::from_slice(&out.stdout).unwrap();
    let plans = plans.as_array().unwrap();
    let by = |m: &str| plans.iter().find(|p| p["method"] == m).unwrap();
    // The tiny model: 5696 encoder weights and a head of 3 × 16 + 3.
    assert_eq!(by("adamw")["trainable"], 5696 + 51);
    assert_eq!(by("adamw")["state_bytes"], 8 * (5696 + 51));
    // LoRA rank 8 on query and value of 2 layers: A 8×16 and B 16×8.
    assert_eq!(by("lora")["adapters"], 2 * 2 * 2 * 128);
    assert!(by("frugal-ft:rank=0")["state_bytes"].as_u64() < by("adamw")["state_bytes"].as_u64());
    // With a batch shape: each method's peak by memory mode, the flags' mode marked.
    let out = run_ok(frugal(&dir).arg("memory").arg("--model").arg(&model).args([
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--methods",
        "adamw lora",
        "--activation-checkpointing",
    ]));
    let table = String::from_utf8_lossy(&out.stdout);
    let peaks: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("peak"))
        .collect();
    assert!(
        peaks[0].contains("checkpointing") && peaks[0].contains("low"),
        "{table}"
    );
    for (row, method) in peaks[1..3].iter().zip(["adamw", "lora"]) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!((cells[0], cells.len()), (method, 5), "{table}");
        assert_eq!(row.matches('*').count(), 1, "{table}");
        let mib: Vec<f64> = cells[1..]
            .iter()
            .map(|c| c.trim_end_matches('*').parse().unwrap())
            .collect();
        assert!(cells[2].ends_with('*') && mib[1] < mib[0], "{table}");
    }
    for (flags, wanted) in [
        (
            &["--seq-len", "16"][..],
            "--seq-len plans a step only with --batch-size",
        ),
        (
            &["--batch-size", "2", "--seq-len", "999"],
            "exceeds the model's",
        ),
        (
            &["--batch-size", "2", "--loss-chunks", "4"],
            "a classifier's loss is never split",
        ),
    ] {
        run_fails(
            frugal(&dir)
                .arg("memory")
                .arg("--model")
                .arg(&model)
                .args(flags),
            wanted,
        );
    }
}

#[test]
fn bf16_mixed_precision_tracks_f32_and_gpus_need_the_cuda_build() {
    let dir = scratch("bf16");
    let flags = ["--steps", "12", "--lr", "0.003", "--eval-every", "6"];
    let (full, mixed) = (dir.join("f32"), dir.join("bf16"));
    run_ok(&mut train(&dir, &full, &flags));
    let out = run_ok(&mut train(
        &dir,
        &mixed,
        &[&flags[..], &["--dtype", "bf16"]].concat(),
    ));
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("on cpu (matrix products: ")
            && log.contains("; row kernels: ")
            && log.contains(") in bf16 (f32 master weights)"),
        "{log}"
    );
    assert_eq!(json(&mixed.join("config.json"))["args"]["dtype"], "bf16");
    let (a, b) = (summary(&full), summary(&mixed));
    let (start, end) = (
        b["initial_val_ppl"].as_f64().unwrap(),
        b["val_ppl"].as_f64().unwrap(),
    );
    assert!(end < 0.6 * start, "bf16 perplexity {start} → {end}");
    let (la, lb) = (
        a["val_loss"].as_f64().unwrap(),
        b["val_loss"].as_f64().unwrap(),
    );
    assert!(
        (la - lb).abs() < 0.03 * la,
        "val loss f32 {la} vs bf16 {lb}"
    );
    // The checkpoint holds f32 master weights: it resumes, and evaluates, like any other.
    let ck = mixed.join("checkpoints/step-12/model.safetensors");
    let weights = candle_core::safetensors::load(&ck, &candle_core::Device::Cpu).unwrap();
    assert!(weights
        .values()
        .all(|t| t.dtype() == candle_core::DType::F32));

    let mut refused = vec![("tpu", "use cpu, cuda or cuda:N")];
    if !cfg!(feature = "cuda") {
        refused.extend([
            ("cuda", "scripts/build-cuda.sh"),
            ("cuda:1", "scripts/build-cuda.sh"),
        ]);
    }
    for (device, says) in refused {
        run_fails(
            &mut train(
                &dir,
                &dir.join("gpu"),
                &["--steps", "1", "--device", device],
            ),
            says,
        );
    }
}
