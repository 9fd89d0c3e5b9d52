use super::*;

fn micro() -> EncoderConfig {
    serde_json::from_str(
        r#"{"vocab_size": 40, "hidden_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3,
            "intermediate_size": 20, "max_position_embeddings": 16}"#,
    )
    .unwrap()
}

fn inputs(rows: &[&[u32]]) -> Vec<(Vec<u32>, Vec<u32>)> {
    rows.iter()
        .map(|r| (r.to_vec(), vec![0; r.len()]))
        .collect()
}

#[test]
fn padding_changes_no_real_tokens_output() {
    let c = micro();
    let enc = Encoder::init(&c, 1, &Device::Cpu).unwrap();
    let alone = EncoderBatch::new(&c, &inputs(&[&[2, 7, 9]]), &Device::Cpu).unwrap();
    let padded = EncoderBatch::new(
        &c,
        &inputs(&[&[2, 7, 9], &[5, 6, 7, 8, 9, 10]]),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!((padded.len(), padded.tokens()), (2, 9));
    let a = enc.forward(&alone, None).unwrap().get(0).unwrap();
    let b = enc
        .forward(&padded, None)
        .unwrap()
        .get(0)
        .unwrap()
        .narrow(0, 0, 3)
        .unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn every_classifier_parameter_gets_a_gradient_and_dropout_follows_the_seed() {
    let c = micro();
    let model = Classifier::new(
        Encoder::init(&c, 1, &Device::Cpu).unwrap(),
        3,
        Pooling::Mean,
        0.1,
        2,
    )
    .unwrap();
    let batch = EncoderBatch::new(&c, &inputs(&[&[2, 7, 9], &[5, 6]]), &Device::Cpu).unwrap();
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let plain = model
        .loss(&batch, &labels)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let dropped = |seed| {
        model
            .loss(&batch.clone().with_dropout(seed), &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(dropped(5), dropped(5));
    assert_ne!(dropped(5), dropped(6));
    assert_ne!(dropped(5), plain);
    let grads = model.loss(&batch, &labels).unwrap().backward().unwrap();
    let params = model.params();
    assert_eq!(params.len(), c.parameter_shapes().len() + 2);
    for p in &params {
        let g = grads
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("{} has no gradient", p.name));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // Position rows beyond the batch and unused vocabulary rows are zero, never the whole tensor.
        assert!(norm > 0.0, "{} has a zero gradient", p.name);
    }
    assert_eq!(model.predict(&batch).unwrap().len(), 2);
}

#[test]
fn bad_inputs_are_named() {
    let c = micro();
    let err = |rows: Vec<(Vec<u32>, Vec<u32>)>| {
        EncoderBatch::new(&c, &rows, &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(err(vec![(vec![1; 17], vec![0; 17])]).contains("exceeds the model's 16 positions"));
    assert!(err(vec![(vec![40], vec![0])]).contains("outside the model's vocabulary of 40"));
    assert!(err(vec![(vec![1, 2], vec![0, 2])]).contains("token type 2"));
    assert!(err(vec![(vec![1, 2], vec![0])]).contains("2 tokens but 1 token types"));
    assert!(err(vec![]).contains("at least one"));
    let enc = Encoder::init(&c, 1, &Device::Cpu).unwrap();
    assert!(Classifier::new(enc, 1, Pooling::Cls, 0.0, 0)
        .err()
        .unwrap()
        .to_string()
        .contains("at least 2 classes"));
}
