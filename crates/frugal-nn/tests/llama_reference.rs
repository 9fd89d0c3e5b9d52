//! LLaMA against `transformers`: small random `LlamaForCausalLM` checkpoints saved by
//! `save_pretrained` in shards (one with a tied LM head, one with a PEFT LoRA adapter), with
//! their logits and loss (`scripts/make-llama-fixtures.py`), loaded by `Llama::from_hf`.

use candle_core::{DType, Device, Tensor};
use frugal_nn::llama::{DecoderLora, Llama};
use frugal_nn::lora::{LoraConfig, LoraTargets};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A copy of fixture `name` in a scratch folder of its own (`tag` names it), to alter.
fn copied(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("frugal-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check(name: &str) {
    let (config, model) = Llama::from_hf(&fixture(name), &Device::Cpu, DType::F32).unwrap();
    assert_eq!((config.kv_heads(), config.num_attention_heads), (2, 4));
    check_model(name, &model);
}

/// The model's logits and loss against the fixture's `transformers` (or PEFT) outputs.
fn check_model(name: &str, model: &Llama) {
    let diff = logit_diff(name, model);
    assert!(diff < 1e-4, "{name}: logits differ by {diff}");
    let (ids, expected) = expected(name);
    // The mean next-token loss of `transformers` (labels = ids, shifted inside).
    let t = ids.dim(1).unwrap();
    let loss = model
        .loss(
            &ids.narrow(1, 0, t - 1).unwrap(),
            &ids.narrow(1, 1, t - 1).unwrap(),
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let want = expected["loss"].as_f64().unwrap() as f32;
    assert!((loss - want).abs() < 1e-5, "{name}: loss {loss} vs {want}");
}

/// The fixture's token ids and expected outputs.
fn expected(name: &str) -> (Tensor, serde_json::Value) {
    let dir = fixture(name);
    let expected = read_json(&dir.join("expected.json"));
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["ids"].clone()).unwrap();
    (Tensor::new(ids, &Device::Cpu).unwrap(), expected)
}

/// The largest difference of the model's logits from the fixture's.
fn logit_diff(name: &str, model: &Llama) -> f32 {
    let (ids, expected) = expected(name);
    let logits: Vec<f32> = model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = serde_json::from_value(expected["logits"].clone()).unwrap();
    assert_eq!(logits.len(), want.len());
    logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn sharded_checkpoints_match_transformers() {
    check("tiny-llama");
}

#[test]
fn a_tied_head_matches_transformers() {
    check("tiny-llama-tied");
}

/// A PEFT adapter beside the weights: merged by `from_hf`, or kept apart on the frozen linears
/// (as a resumed LoRA run has it); both give PEFT's outputs.
#[test]
fn a_peft_lora_adapter_matches_peft_merged_and_apart() {
    check("tiny-llama-lora");
    let dir = fixture("tiny-llama-lora");
    let (config, _) = Llama::from_hf(&dir, &Device::Cpu, DType::F32).unwrap();
    let lora = DecoderLora {
        adapters: LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraTargets::Qv,
        },
        train_others: false,
    };
    let apart = Llama::load(
        &config,
        &dir.join("model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
    .with_saved_adapters(&lora, &dir)
    .unwrap();
    assert_eq!(apart.params().len(), 2 * 2 * config.num_hidden_layers);
    check_model("tiny-llama-lora", &apart);
    // Without the adapter the logits are the base model's, not PEFT's.
    let base = Llama::load(
        &config,
        &dir.join("model.safetensors"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let diff = logit_diff("tiny-llama-lora", &base);
    assert!(diff > 0.1, "the adapter changes the logits by {diff} only");
    // PEFT features frugal does not read are refused by name.
    let copy = copied("tiny-llama-lora", "peft");
    let peft = read_json(&dir.join("adapter_config.json"));
    for (key, value) in [
        ("use_dora", serde_json::json!(true)),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("modules_to_save", serde_json::json!(["lm_head"])),
    ] {
        let mut changed = peft.clone();
        changed[key] = value;
        std::fs::write(copy.join("adapter_config.json"), changed.to_string()).unwrap();
        let err = Llama::from_hf(&copy, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{err}");
    }
    std::fs::remove_dir_all(&copy).ok();
}

#[test]
fn scaled_rotary_embeddings_and_other_architectures_are_refused_by_name() {
    let fixture = fixture("tiny-llama");
    let dir = copied("tiny-llama", "llama-ref");
    let config = read_json(&fixture.join("config.json"));
    for (key, value, named) in [
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "rope_theta": 5e5}),
            "rope_type `llama3`",
        ),
        ("hidden_act", "gelu".into(), "hidden_act `gelu`"),
        ("mlp_bias", true.into(), "mlp_bias"),
        ("head_dim", 16.into(), "head_dim 16"),
        ("model_type", "mistral".into(), "model_type `mistral`"),
    ] {
        let mut c = config.clone();
        c[key] = value;
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let err = Llama::from_hf(&dir, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(named), "{key}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
