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

#[test]
fn lora_trains_only_its_adapters_and_merged_weights_predict_the_same() {
    let c = micro();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: LoraTargets::Qv,
    };
    let plain = Classifier::new(
        Encoder::init(&c, 1, &Device::Cpu).unwrap(),
        3,
        Pooling::Mean,
        0.1,
        2,
    )
    .unwrap();
    let encoder = Encoder::init(&c, 1, &Device::Cpu)
        .unwrap()
        .with_lora(&lora, 3)
        .unwrap();
    let model = Classifier::new(encoder, 3, Pooling::Mean, 0.1, 2).unwrap();
    let batch = EncoderBatch::new(&c, &inputs(&[&[2, 7, 9], &[5, 6]]), &Device::Cpu).unwrap();
    // B = 0: the adapters change nothing yet.
    let max = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        max(
            &plain.logits(&batch).unwrap(),
            &model.logits(&batch).unwrap()
        ),
        0.0
    );
    // Adapters on query and value of 2 layers, then the head.
    let params = model.params();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names.len(), 2 * 2 * 2 + 2);
    assert_eq!(
        names[0],
        "bert.encoder.layer.0.attention.self.query.lora_A.weight"
    );
    assert_eq!(
        names[3],
        "bert.encoder.layer.0.attention.self.value.lora_B.weight"
    );
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    let grads = model
        .loss(&batch.clone().with_dropout(4), &labels)
        .unwrap()
        .backward()
        .unwrap();
    for p in &params {
        assert!(grads.get(p.var.as_tensor()).is_some(), "{}", p.name);
    }
    // The frozen weights get no gradient at all.
    let frozen = &model.encoder.named_tensors()[0].1;
    assert!(grads.get(frozen).is_none());
    // Trained adapters (B set at random), merged: the same predictions from a plain model.
    let mut rng = <ChaCha8Rng as SeedableRng>::seed_from_u64(6);
    for p in params.iter().filter(|p| p.name.contains("lora_B")) {
        let n = p.var.elem_count();
        let values = crate::init::normal(&mut rng, n, 0.5);
        p.var
            .set(&Tensor::from_vec(values, p.var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let adapted = model.logits(&batch).unwrap();
    assert!(max(&adapted, &plain.logits(&batch).unwrap()) > 1e-3);
    let merged: HashMap<String, Tensor> = model.merged_tensors().unwrap().into_iter().collect();
    assert!(!merged.keys().any(|n| n.contains("lora")));
    let (encoder, head) = Encoder::from_checkpoint(&c, merged, &Device::Cpu, None).unwrap();
    let reloaded = Classifier::from_head(encoder, head, Pooling::Mean, 0.1).unwrap();
    assert!(max(&adapted, &reloaded.logits(&batch).unwrap()) < 1e-5);
    // A checkpoint with adapters resumes as the same adapted model.
    let saved: HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
    let (encoder, head) = Encoder::from_checkpoint(&c, saved, &Device::Cpu, Some(&lora)).unwrap();
    let resumed = Classifier::from_head(encoder, head, Pooling::Mean, 0.1).unwrap();
    assert_eq!(max(&adapted, &resumed.logits(&batch).unwrap()), 0.0);
}
