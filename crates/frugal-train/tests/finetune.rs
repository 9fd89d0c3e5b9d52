//! Fine-tuning end to end on a tiny BERT (the `transformers` fixture of frugal-nn) with a word-level
//! tokenizer and a synthetic task: the loss falls, the model learns the task, a resumed run
//! continues bit for bit, and FRUGAL's recipe holds less state than AdamW.

use candle_core::Device;
use frugal_nn::encoder::Encoder;
use frugal_nn::Attention;
use frugal_train::data_parallel::DataParallel;
use frugal_train::finetune::classify::FineTuned;
use frugal_train::finetune::memory::{plan, StepShape};
use frugal_train::finetune::run::{resolve, run, FinetuneSettings, FinetuneSummary};
use frugal_train::finetune::task::{read_examples, Columns, Example, Task, TaskChoice};
use frugal_train::settings::{BackwardSettings, MemoryMode};
use frugal_train::StopToken;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frugal-ft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny BERT (the fixture's configuration, initialised as `transformers` does) with a
/// word-level tokenizer: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, w4…w49.
fn model_folder(dir: &Path) -> PathBuf {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../frugal-nn/tests/fixtures/tiny-bert");
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(fixture.join("config.json"), model.join("config.json")).unwrap();
    let config = frugal_nn::hf::read_config(&model).unwrap();
    let encoder = Encoder::init(&config, 5, &Device::Cpu).unwrap();
    let tensors: HashMap<String, candle_core::Tensor> =
        encoder.named_tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, model.join("model.safetensors")).unwrap();
    let mut vocab: HashMap<String, u32> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    vocab.extend((4..50).map(|i| (format!("w{i}"), i)));
    let words = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tok = Tokenizer::new(words);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .unwrap()
        .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
        .unwrap()
        .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
        .build()
        .unwrap();
    tok.with_post_processor(Some(template));
    tok.save(model.join("tokenizer.json"), false).unwrap();
    model
}

/// 400 texts of 4–12 words; `pos` exactly when one of w10…w13 occurs.
fn task_file(dir: &Path) -> PathBuf {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut csv = String::from("label,text\n");
    for i in 0..400 {
        let pos = i % 2 == 0;
        let n = rng.random_range(4..12);
        let mut words: Vec<String> = (0..n)
            .map(|_| format!("w{}", rng.random_range(14..50)))
            .collect();
        if pos {
            let at = rng.random_range(0..n);
            words[at] = format!("w{}", rng.random_range(10..14));
        }
        csv += &format!("{},{}\n", if pos { "pos" } else { "neg" }, words.join(" "));
    }
    let path = dir.join("task.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

fn settings(dir: &Path, out: &str, method: &str, steps: usize) -> FinetuneSettings {
    FinetuneSettings {
        model: model_folder(dir),
        data: Some(task_file(dir)),
        method: method.into(),
        steps,
        batch_size: 16,
        lr: Some(1e-2),
        log_every: 1,
        eval_every: Some(steps),
        out: Some(dir.join(out)),
        ..Default::default()
    }
}

fn train(s: FinetuneSettings) -> (PathBuf, FinetuneSummary) {
    let resume = s.resume.clone();
    let out = run(
        resolve(s).unwrap(),
        resume.as_deref(),
        &StopToken::new(),
        &Device::Cpu,
        &DataParallel::default(),
    )
    .unwrap();
    let summary =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    (out, summary)
}

/// (step, loss) of every logged training step, as written.
fn losses(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["step"], v["loss"])
        })
        .collect()
}

#[test]
fn full_fine_tuning_learns_the_task_and_a_resumed_run_continues_bit_for_bit() {
    let dir = scratch("learn");
    let run = settings(&dir, "adamw", "adamw", 100);
    let (out, summary) = train(run.clone());
    let initial = summary.initial_val.unwrap();
    assert!(summary.val.accuracy >= 0.95, "{summary:?}");
    assert!(summary.val.accuracy > initial.accuracy + 0.4, "{summary:?}");
    assert!(summary.test.unwrap().accuracy >= 0.9, "{summary:?}");
    assert_eq!(summary.classes, ["neg", "pos"]);
    assert_eq!(summary.trainable_parameters, summary.parameters);
    assert!(out.join("loss.png").exists());
    // The checkpoint is a Hugging Face classification folder with its labels.
    let ck = out.join("checkpoints/step-100");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"]["1"], "pos");
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    // `frugal classify` with the run (its latest checkpoint) scores the validation split as
    // training did.
    let model = FineTuned::load(&out, None, &Device::Cpu).unwrap();
    assert_eq!(model.classes, ["neg", "pos"]);
    let columns = Columns {
        text: "text",
        pair: None,
        label: Some("label"),
    };
    let choice = TaskChoice {
        labels: &[],
        max_examples: None,
        val_fraction: run.val_fraction,
        test_fraction: run.test_fraction,
    };
    let task = Task::new(read_examples(&task_file(&dir), &columns).unwrap(), &choice).unwrap();
    let val: Vec<Example> = task.val.iter().map(|(e, _)| e.clone()).collect();
    let predictions = model.predict(&val, 7).unwrap();
    let (scores, scored, unknown) = model.scores(&predictions).unwrap();
    assert_eq!((scores, scored, unknown), (summary.val, val.len(), 0));
    for p in &predictions {
        let sum: f64 = p.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5 && p.probability >= 0.5, "{p:?}");
    }

    // 10 steps straight against 5, a pause, and 5 more.
    let (straight, _) = train(settings(&dir, "straight", "adamw", 10));
    let mut first = settings(&dir, "paused", "adamw", 10);
    first.stop_after = Some(5);
    let (paused, _) = train(first);
    let mut resumed = settings(&dir, "paused", "adamw", 10);
    resumed.resume = Some(paused.clone());
    let merged = resumed.merge(&[]).unwrap();
    train(merged);
    assert_eq!(losses(&straight), losses(&paused));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_frugal_recipe_keeps_little_state_and_trains() {
    let dir = scratch("recipe");
    let (_, adamw) = train(settings(&dir, "adamw", "adamw", 10));
    let (_, frugal) = train(settings(&dir, "frugal", "frugal-ft:rank=2", 100));
    let counts = &frugal.parameters_by_class;
    // Key and the dense linears are state-free; query and value projectable.
    assert_eq!(counts.projectable, 2 * 2 * 16 * 16);
    assert!(counts.state_free > counts.projectable);
    assert!(frugal.optimizer_state_total_bytes * 2 < adamw.optimizer_state_total_bytes);
    // From ln 2 = 0.69 (chance) on the validation split; the training losses carry dropout.
    assert!(frugal.val_loss < 0.45, "{frugal:?}");
    assert!(frugal.val.accuracy >= 0.85, "{frugal:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memory_modes_fine_tune_like_the_normal_backward_bit_for_bit() {
    let dir = scratch("memory");
    // Clipping (the default 1.0) and two micro-batches: per-layer updates measure the norm
    // in a first pass and sum the first micro-batch whole.
    for method in ["adamw", "lora", "frugal-ft:rank=2"] {
        let run = |name: &str, memory: BackwardSettings| {
            let mut s = settings(&dir, &format!("{method}-{name}"), method, 6);
            (s.batch_size, s.grad_accum, s.memory) = (8, 2, memory.clone());
            let (out, summary) = train(s);
            // The summary gives the peak `frugal memory` plans for this method and mode.
            let config = resolve(settings(&dir, "plan", method, 6)).unwrap();
            let step = StepShape {
                batch: 8,
                seq: config.seq_len(),
                mode: memory.step_mode(2),
            };
            let methods = [method.to_string()];
            let plans = plan(&config.encoder, 2, &methods, 1, Some(step)).unwrap();
            let selected = plans[0].steps.iter().find(|s| s.selected).unwrap();
            assert_eq!(summary.planned_peak_bytes, Some(selected.peak_bytes));
            (losses(&out), summary.val_loss)
        };
        let normal = run("normal", BackwardSettings::default());
        assert_eq!(normal.0.len(), 6);
        for (name, memory) in [
            (
                "checkpointing",
                BackwardSettings {
                    activation_checkpointing: true,
                    ..Default::default()
                },
            ),
            (
                "low",
                BackwardSettings {
                    memory: MemoryMode::Low,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(run(name, memory), normal, "{method}, {name}");
        }
        if method == "adamw" {
            // Attention computed whole: the fused run's losses up to the order of the sums,
            // and the same bit for bit under checkpointing.
            let whole = |activation_checkpointing| BackwardSettings {
                attention: Attention::Whole,
                activation_checkpointing,
                ..Default::default()
            };
            let computed_whole = run("whole", whole(false));
            let loss = |line: &String| -> f64 { line.split(' ').nth(1).unwrap().parse().unwrap() };
            for (a, b) in computed_whole.0.iter().zip(&normal.0) {
                assert!(
                    (loss(a) - loss(b)).abs() < 1e-5 * loss(b),
                    "{a} against {b}"
                );
            }
            assert_eq!(run("whole-checkpointing", whole(true)), computed_whole);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The error of a run with settings `s`, from its start.
fn fails(s: FinetuneSettings) -> anyhow::Error {
    let stop = StopToken::new();
    run(
        resolve(s).unwrap(),
        None,
        &stop,
        &Device::Cpu,
        &DataParallel::default(),
    )
    .unwrap_err()
}

#[test]
fn bad_tasks_and_tokenizers_are_named() {
    let dir = scratch("bad");
    let mut s = settings(&dir, "one", "adamw", 2);
    std::fs::write(dir.join("one.csv"), "label,text\nx,w4 w5\nx,w6 w7\n").unwrap();
    s.data = Some(dir.join("one.csv"));
    let err = fails(s);
    assert!(format!("{err:#}").contains("1 class (x)"), "{err:#}");
    // A tokenizer without the model's special tokens.
    let s = settings(&dir, "plain", "adamw", 2);
    let mut tok = Tokenizer::from_file(s.model.join("tokenizer.json")).unwrap();
    tok.with_post_processor(None::<TemplateProcessing>);
    tok.save(s.model.join("tokenizer.json"), false).unwrap();
    let err = fails(s);
    assert!(
        format!("{err:#}").contains("adds no special tokens"),
        "{err:#}"
    );
    let mut s = settings(&dir, "x", "frugal-ft:rank=99", 2);
    assert!(resolve(s.clone())
        .err()
        .unwrap()
        .to_string()
        .contains("rank 99 exceeds the model's hidden size 16"));
    s.data = None;
    s.method = "adamw".into();
    assert!(resolve(s)
        .err()
        .unwrap()
        .to_string()
        .contains("--data is required"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lora_trains_its_adapters_and_the_merged_folder_predicts_like_them() {
    let dir = scratch("lora");
    let (out, lora) = train(settings(&dir, "lora", "lora:rank=4,alpha=8", 100));
    // Adapters on query and value of 2 layers (A 4×16, B 16×4), and the head (2×16 + 2).
    assert_eq!(lora.trainable_parameters, 2 * 2 * (64 + 64) + 34);
    assert_eq!(lora.parameters, 5730 + 2 * 2 * 128);
    // (A random base gives LoRA nothing to adapt: the task is not learnt here, only the adapters
    // move. all-MiniLM-L6-v2 on real tasks is in docs/results.md.)
    // The merged folder is a plain model that predicts what the adapted checkpoint predicts.
    let batch_of = |model: &frugal_nn::encoder::Classifier| {
        let inputs: Vec<(Vec<u32>, Vec<u32>)> = (4..40u32)
            .map(|i| (vec![2, i, i + 1, i + 7, 3], vec![0; 5]))
            .collect();
        let batch =
            frugal_nn::encoder::EncoderBatch::new(&model.encoder.config, &inputs, &Device::Cpu)
                .unwrap();
        model.logits(&batch).unwrap()
    };
    let pooling = frugal_nn::encoder::Pooling::Mean;
    let merged = frugal_train::finetune::run::load_classifier(
        &out.join("merged"),
        pooling,
        0.1,
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert!(merged.encoder.lora().is_none());
    let config: frugal_train::finetune::run::FinetuneConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let adapted = frugal_train::finetune::run::load_classifier(
        &out.join("checkpoints/step-100"),
        pooling,
        0.1,
        config.lora.as_ref(),
        &Device::Cpu,
    )
    .unwrap();
    let (a, m) = (batch_of(&adapted), batch_of(&merged));
    let diff = (a - m)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
    // `frugal classify` reads the run's merged model, or a checkpoint with the run's adapters:
    // the same probabilities.
    let merged = FineTuned::load(&out, None, &Device::Cpu).unwrap();
    assert!(merged.dir.ends_with("merged"));
    let adapted = FineTuned::load(&out.join("checkpoints/step-100"), None, &Device::Cpu).unwrap();
    assert!(adapted.model.encoder.lora().is_some());
    let columns = Columns {
        text: "text",
        pair: None,
        label: None,
    };
    let texts = read_examples(&task_file(&dir), &columns).unwrap();
    let (m, a) = (
        merged.predict(&texts[..40], 16).unwrap(),
        adapted.predict(&texts[..40], 16).unwrap(),
    );
    for (m, a) in m.iter().zip(&a) {
        for (x, y) in m.probabilities.iter().zip(&a.probabilities) {
            assert!((x - y).abs() < 1e-5, "{m:?} against {a:?}");
        }
        assert_eq!(m.label, None);
    }
    assert!(merged.scores(&m).is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_comparison_tunes_each_method_and_tabulates_test_scores_over_seeds() {
    use frugal_train::compare::finetune::{compare, FinetuneCompareSettings};
    let dir = scratch("compare");
    let mut base = settings(&dir, "cmp", "adamw", 12);
    (base.lr, base.eval_every) = (None, None);
    let args = FinetuneCompareSettings {
        methods: "adamw lora:rank=4,alpha=8 frugal-ft:rank=2".into(),
        seeds: "0,1".into(),
        tune: vec!["lr=1e-5,1e-2".into(), "lora:lr=1e-4,3e-2,1e-1".into()],
        halving_rate: 2,
        finetune: base,
    };
    let stop = StopToken::new();
    compare(args.clone(), "test", &stop, &Device::Cpu).unwrap();
    let out = dir.join("cmp");
    let read = || -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap()
    };
    let report = read();
    // Each method: both rates for 6 steps, the better one (by validation macro-F1) to step
    // 12; LoRA has its own three rates, so one more round.
    for tuning in report["tuning"].as_array().unwrap() {
        let rungs: Vec<u64> = tuning["rungs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["steps"].as_u64().unwrap())
            .collect();
        let c = tuning["candidates"].as_array().unwrap();
        let lora = tuning["method"].as_str().unwrap().starts_with("lora");
        assert_eq!(rungs, if lora { vec![3, 6, 12] } else { vec![6, 12] });
        assert_eq!(c.len(), if lora { 3 } else { 2 });
        assert!(c[0]["values"].as_str().unwrap() == if lora { "lr=1e-4" } else { "lr=1e-5" });
        let chosen = &c[tuning["chosen"].as_u64().unwrap() as usize];
        assert_eq!(chosen["val"].as_array().unwrap().len(), rungs.len());
        let first = |c: &serde_json::Value| c["val"][0].as_f64().unwrap();
        assert!(
            c.iter().all(|other| first(chosen) >= first(other)),
            "{tuning}"
        );
    }
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(report["runs"].as_array().unwrap().len(), 6);
    let runs = report["runs"].as_array().unwrap();
    for (row, method) in rows.iter().zip(["adamw", "lora", "frugal-ft"]) {
        assert!(row["spec"].as_str().unwrap().starts_with(method), "{row}");
        assert!(row["spec"].as_str().unwrap().contains("lr="), "{row}");
        // The row's mean is that of its two seeds' test accuracies, as their summaries say.
        let mine: Vec<f64> = runs
            .iter()
            .filter(|r| r["method"] == row["method"])
            .map(|r| r["test"]["accuracy"].as_f64().unwrap())
            .collect();
        assert_eq!(mine.len(), 2);
        let mean = row["test_accuracy_mean"].as_f64().unwrap();
        assert!((mean - (mine[0] + mine[1]) / 2.0).abs() < 1e-12, "{row}");
        assert!(
            (row["test_accuracy_spread"].as_f64().unwrap() - (mine[0] - mine[1]).abs() / 2.0).abs()
                < 1e-12
        );
    }
    let param = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    assert!(param(1, "trainable_parameters") < param(0, "trainable_parameters") / 10.0);
    assert!(param(2, "state_mib") < param(0, "state_mib") / 2.0);
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    assert!(
        md.contains("test accuracy") && md.contains("## Tuning"),
        "{md}"
    );
    assert!(out.join("compare.png").exists());
    // A second comparison into the same folder is refused; continuing the finished one trains
    // nothing (the runs' wall times are unchanged).
    let again = compare(args.clone(), "test", &stop, &Device::Cpu).unwrap_err();
    assert!(again.to_string().contains("--resume"), "{again}");
    let mut resumed = args;
    resumed.finetune.resume = Some(out.clone());
    compare(resumed, "test", &stop, &Device::Cpu).unwrap();
    let walls = |r: &serde_json::Value| {
        r["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["wall_s"].as_f64().unwrap())
            .collect::<Vec<_>>()
    };
    let report_again = read();
    assert_eq!(walls(&report_again), walls(&report));
    assert_eq!(report_again["tuning"], report["tuning"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_device_out_of_memory_is_told_the_planned_peak() {
    use frugal_train::finetune::run::out_of_memory_note;
    let dir = scratch("oom");
    let mut s = settings(&dir, "run", "lora", 2);
    s.memory.memory = MemoryMode::Low;
    let config = resolve(s).unwrap();
    let note = out_of_memory_note(&config, 1, &Device::Cpu);
    let step = StepShape {
        batch: 16,
        seq: config.seq_len(),
        mode: frugal_nn::StepMode {
            checkpointing: true,
            per_layer_updates: true,
            grad_accum: 1,
            ..Default::default()
        },
    };
    let methods = ["lora".to_string(), "adamw".to_string()];
    let planned = plan(&config.encoder, 2, &methods, 1, Some(step)).unwrap();
    let peak = |m: usize| {
        let low = planned[m].steps.iter().find(|s| s.selected).unwrap();
        assert_eq!(low.mode, "low");
        low.peak_bytes
    };
    let mib = format!("about {:.0} MiB", peak(0) as f64 / (1024.0 * 1024.0));
    assert!(note.starts_with("cpu ran out of memory"), "{note}");
    assert!(note.contains(&mib), "{note}");
    assert!(
        note.contains(&format!("--batch-size 16 --seq-len {}", step.seq)),
        "{note}"
    );
    assert!(note.contains("--memory low"), "{note}");
    // The note plans the run's own method: on this tiny encoder LoRA's adapters keep more
    // activations than training every weight does.
    assert!(peak(0) > peak(1), "{planned:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
