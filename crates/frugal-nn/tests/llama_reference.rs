//! LLaMA against `transformers`: small random `LlamaForCausalLM` checkpoints saved by
//! `save_pretrained` in shards (one with a tied LM head), with their logits and loss
//! (`scripts/make-llama-fixtures.py`), loaded by `Llama::from_hf`.

use candle_core::{DType, Device, Tensor};
use frugal_nn::llama::Llama;
use std::path::Path;

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let (config, model) = Llama::from_hf(&dir, &Device::Cpu, DType::F32).unwrap();
    assert_eq!((config.kv_heads(), config.num_attention_heads), (2, 4));
    let ids: Vec<Vec<u32>> = serde_json::from_value(expected["ids"].clone()).unwrap();
    let ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let logits: Vec<f32> = model
        .forward(&ids)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want: Vec<f32> = serde_json::from_value(expected["logits"].clone()).unwrap();
    assert_eq!(logits.len(), want.len());
    let diff = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{name}: logits differ by {diff}");
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

#[test]
fn sharded_checkpoints_match_transformers() {
    check("tiny-llama");
}

#[test]
fn a_tied_head_matches_transformers() {
    check("tiny-llama-tied");
}

#[test]
fn scaled_rotary_embeddings_and_other_architectures_are_refused_by_name() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let dir = std::env::temp_dir().join(format!("frugal-llama-ref-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
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
