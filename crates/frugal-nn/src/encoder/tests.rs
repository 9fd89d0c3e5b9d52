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
    // Evaluation keeps no graph and drops nothing out: the plain logits, bit for bit.
    let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let plain = values(model.logits(&batch).unwrap());
    assert_eq!(values(model.eval_logits(&batch).unwrap()), plain);
    let evaluated = model.eval_logits(&batch.clone().with_dropout(5)).unwrap();
    let reached = evaluated.sum_all().unwrap().backward().unwrap();
    assert!(params
        .iter()
        .all(|p| reached.get(p.var.as_tensor()).is_none()));
    assert_eq!(values(evaluated), plain);
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

#[test]
fn the_layered_backward_gives_the_whole_backward_s_gradients_bit_for_bit() {
    let c = micro();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.1,
        targets: LoraTargets::All,
    };
    let batch = EncoderBatch::new(&c, &inputs(&[&[2, 7, 9], &[5, 6, 1, 3]]), &Device::Cpu)
        .unwrap()
        .with_dropout(4);
    let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    for (adapters, pooling, scale) in [
        (false, Pooling::Mean, 1.0),
        (false, Pooling::Cls, 0.5),
        (true, Pooling::Mean, 0.5),
    ] {
        let mut encoder = Encoder::init(&c, 1, &Device::Cpu).unwrap();
        if adapters {
            encoder = encoder.with_lora(&lora, 3).unwrap();
        }
        let model = Classifier::new(encoder, 3, pooling, 0.1, 2).unwrap();
        let params = model.params();
        // Adapters with B ≠ 0, so that every gradient is non-trivial.
        let mut rng = <ChaCha8Rng as SeedableRng>::seed_from_u64(6);
        for p in params.iter().filter(|p| p.name.contains("lora_B")) {
            let values = crate::init::normal(&mut rng, p.var.elem_count(), 0.5);
            p.var
                .set(&Tensor::from_vec(values, p.var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let loss = model.loss(&batch, &labels).unwrap();
        let value = loss.to_scalar::<f32>().unwrap();
        let whole = (loss * scale).unwrap().backward().unwrap();
        let values = |g: &Tensor| g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut parts: Vec<Vec<(String, Vec<f32>)>> = Vec::new();
        let got = model
            .backward_by_layers(&batch, &labels, scale, |g| {
                let part = params
                    .iter()
                    .filter_map(|p| Some((p.name.clone(), values(g.get(p.var.as_tensor())?))))
                    .collect();
                parts.push(part);
                Ok::<(), Error>(())
            })
            .unwrap();
        assert_eq!(got, value);
        // The head, each layer from the top, then the embeddings (frozen under LoRA).
        assert_eq!(parts.len(), if adapters { 3 } else { 4 });
        let names = |i: usize| -> Vec<String> { parts[i].iter().map(|(n, _)| n.clone()).collect() };
        assert_eq!(names(0), ["classifier.weight", "classifier.bias"]);
        assert!(names(1).iter().all(|n| n.contains("layer.1.")));
        assert!(names(2).iter().all(|n| n.contains("layer.0.")));
        let flat: HashMap<String, Vec<f32>> = parts.into_iter().flatten().collect();
        assert_eq!(flat.len(), params.len());
        for p in &params {
            let want = values(whole.get(p.var.as_tensor()).unwrap());
            assert!(flat[&p.name] == want, "{}, adapters {adapters}", p.name);
        }
    }
}
