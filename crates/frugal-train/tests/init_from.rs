//! Starting from a pretrained Hugging Face LLaMA folder (`--init-from`): a small random model
//! written as two safetensors shards with an index, loaded exactly, trained on instruction
//! records with the loss on the responses; and the folders it refuses.

use candle_core::{DType, Device, Tensor};
use frugal_nn::llama::{Llama, LlamaConfig};
use frugal_train::data::TextTokenizer;
use frugal_train::metrics::Summary;
use frugal_train::run::{resolve, run};
use frugal_train::{StopToken, TrainSettings};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frugal-init-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 120 records: repeat a word twice.
fn records(dir: &Path) -> (PathBuf, Vec<String>) {
    let mut jsonl = String::new();
    let mut texts = Vec::new();
    for i in 0..120 {
        let word = format!("w{}", i % 30);
        let r = serde_json::json!({"instruction": format!("Repeat {word}"), "output": format!("{word} {word}")});
        jsonl += &format!("{r}\n");
        texts.push(format!(
            "### Instruction:\nRepeat {word}\n\n### Response:\n{word} {word}"
        ));
    }
    let path = dir.join("instructions.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    (path, texts)
}

fn config(vocab: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_hidden_layers: 2,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
    }
}

/// A random model as a Hugging Face folder: config.json, two shards with their index (and a
/// rotary table, as older exports hold), tokenizer.json. Returns the folder and the model.
fn pretrained(dir: &Path, texts: &[String]) -> (PathBuf, Llama) {
    let folder = dir.join("pretrained");
    std::fs::create_dir_all(&folder).unwrap();
    let tok = TextTokenizer::train(texts.iter(), 300).unwrap();
    std::fs::write(folder.join("tokenizer.json"), tok.to_json().unwrap()).unwrap();
    let config = config(tok.vocab_size());
    std::fs::write(
        folder.join("config.json"),
        config.to_hf_json(tok.eos).to_string(),
    )
    .unwrap();
    let model = Llama::init(&config, 42, &Device::Cpu, DType::F32).unwrap();
    let whole = dir.join("whole.safetensors");
    model.save(&whole).unwrap();
    let tensors = candle_core::safetensors::load(&whole, &Device::Cpu).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut map = serde_json::Map::new();
    for (name, t) in tensors {
        let k = usize::from(name.contains("layers.1") || name.starts_with("lm_head"));
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        map.insert(name.clone(), file.into());
        shards[k].insert(name, t);
    }
    let inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq".to_string();
    map.insert(inv_freq.clone(), "model-00001-of-00002.safetensors".into());
    shards[0].insert(inv_freq, Tensor::ones(4, DType::F32, &Device::Cpu).unwrap());
    for (k, shard) in shards.iter().enumerate() {
        let path = folder.join(format!("model-0000{}-of-00002.safetensors", k + 1));
        candle_core::safetensors::save(shard, path).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    (folder, model)
}

fn settings(dir: &Path, out: &str, data: &Path) -> TrainSettings {
    TrainSettings {
        data: data.display().to_string(),
        instructions: true,
        seq_len: Some(24),
        batch_size: 8,
        steps: 100,
        lr: Some(3e-3),
        val_fraction: 0.2,
        eval_every: Some(100),
        log_every: 10,
        out: Some(dir.join(out)),
        cache_dir: Some(dir.join("cache")),
        ..Default::default()
    }
}

fn train(s: TrainSettings, cache: &Path) -> Summary {
    let out = run(
        resolve(s).unwrap(),
        None,
        cache,
        &StopToken::new(),
        &Device::Cpu,
        &Default::default(),
    )
    .unwrap();
    Summary::read(&out).unwrap()
}

#[test]
fn a_sharded_pretrained_folder_loads_exactly_and_trains_on_responses() {
    let dir = scratch("load");
    let (data, texts) = records(&dir);
    let (folder, original) = pretrained(&dir, &texts);
    let cache = dir.join("cache");

    // The shards load into the same model: the same logits, bit for bit.
    let (config, loaded) = Llama::from_hf(&folder, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(config.num_key_value_heads, Some(2));
    let ids = Tensor::new(&[[3u32, 7, 11, 5, 2, 9]], &Device::Cpu).unwrap();
    let (a, b) = (
        original.forward(&ids).unwrap(),
        loaded.forward(&ids).unwrap(),
    );
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // A run from the folder starts from its weights whatever the seed, and learns the responses.
    let mut from = settings(&dir, "from", &data);
    from.init_from = Some(folder.clone());
    let trained = train(from.clone(), &cache);
    let mut other_seed = from.clone();
    (other_seed.seed, other_seed.steps, other_seed.out) = (5, 1, Some(dir.join("seed5")));
    let started = train(other_seed, &cache).initial_val_ppl.unwrap();
    assert_eq!(trained.initial_val_ppl.unwrap(), started);
    // A random model of the same configuration starts elsewhere.
    let mut scratch_run = settings(&dir, "scratch", &data);
    scratch_run.model = folder.join("config.json").display().to_string();
    scratch_run.tokenizer = Some(folder.join("tokenizer.json"));
    scratch_run.steps = 1;
    let random = train(scratch_run, &cache).initial_val_ppl.unwrap();
    assert_ne!(random, started);
    // The responses are two words and an end-of-text: learnt to well under a tenth of the
    // starting perplexity.
    assert!(
        trained.val_ppl < started / 10.0,
        "{} from {started}",
        trained.val_ppl
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn folders_that_do_not_fit_are_refused_with_the_reason() {
    let dir = scratch("bad");
    let (data, texts) = records(&dir);
    let (folder, _) = pretrained(&dir, &texts);
    let cache = dir.join("cache");
    let attempt = |s: TrainSettings| {
        let err = match resolve(s) {
            Ok(c) => run(
                c,
                None,
                &cache,
                &StopToken::new(),
                &Device::Cpu,
                &Default::default(),
            )
            .unwrap_err(),
            Err(e) => e,
        };
        format!("{err:#}")
    };
    let mut s = settings(&dir, "x", &data);
    s.init_from = Some(folder.clone());
    s.model = "20m".into();
    assert!(attempt(s.clone()).contains("drop --model"));

    // A configuration that disagrees with the weights names the tensor.
    let config_path = folder.join("config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut wrong: serde_json::Value = serde_json::from_str(&text).unwrap();
    wrong["intermediate_size"] = 48.into();
    std::fs::write(&config_path, wrong.to_string()).unwrap();
    s.model = TrainSettings::default().model;
    s.out = Some(dir.join("y"));
    let err = attempt(s.clone());
    assert!(err.contains("mlp") && err.contains("[48, 32]"), "{err}");
    // Biases are another architecture.
    wrong["intermediate_size"] = 64.into();
    wrong["attention_bias"] = true.into();
    std::fs::write(&config_path, wrong.to_string()).unwrap();
    s.out = Some(dir.join("z"));
    assert!(attempt(s.clone()).contains("attention_bias"));
    std::fs::write(&config_path, text).unwrap();
    // No tokenizer.
    std::fs::remove_file(folder.join("tokenizer.json")).unwrap();
    s.out = Some(dir.join("w"));
    assert!(attempt(s.clone()).contains("tokenizer.json does not exist"));
    // Text is not instruction records.
    let plain = dir.join("plain.jsonl");
    std::fs::write(&plain, "{\"text\": \"hello\"}\n").unwrap();
    let mut t = settings(&dir, "v", &plain);
    t.model = "tiny".into();
    assert!(attempt(t).contains("an instruction record needs"));
    std::fs::remove_dir_all(&dir).unwrap();
}
