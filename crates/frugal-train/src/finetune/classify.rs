//! `frugal classify`: the classes a fine-tuned encoder gives texts, or a task file, with their
//! probabilities; scored where the inputs are labelled.

use super::run::{load_classifier, FinetuneConfig};
use super::scores::Scores;
use super::task::{read_examples, Example, TextColumns};
use super::tokenize::ClassTokenizer;
use crate::checkpoint;
use anyhow::{bail, Context, Result};
use candle_core::{Device, D};
use frugal_nn::encoder::{Classifier, EncoderBatch, EncoderConfig, LoraConfig, Pooling};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `frugal classify` classifies, and with which model.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ClassifySettings {
    /// A fine-tuning run (its merged model, else its latest checkpoint), one of its checkpoints,
    /// or its `merged` folder.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: PathBuf,
    /// A text to classify (repeatable).
    #[cfg_attr(feature = "cli", arg(long = "text"))]
    pub texts: Vec<String>,
    /// A task file (.csv, .tsv, .jsonl) or folder of class subfolders, as `finetune --data`,
    /// whose texts to classify.
    #[cfg_attr(feature = "cli", arg(long))]
    pub data: Option<PathBuf>,
    #[cfg_attr(feature = "cli", command(flatten))]
    pub columns: TextColumns,
    /// Column of the labels: the predictions are then scored (a folder's subfolders are its
    /// labels).
    #[cfg_attr(feature = "cli", arg(long))]
    pub label_column: Option<String>,
    /// Tokens per input at most [default: the run's --max-len, else min(128, positions)].
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_len: Option<usize>,
    /// Inputs per batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub batch_size: usize,
    /// One JSON object per input instead of a table.
    #[cfg_attr(feature = "cli", arg(long))]
    pub json: bool,
    /// Worker threads and the matrix-product library.
    #[cfg_attr(feature = "cli", command(flatten))]
    pub cpu: crate::threads::CpuSettings,
}

/// A fine-tuned classifier with its tokenizer and class names.
pub struct FineTuned {
    pub model: Classifier,
    pub tokenizer: ClassTokenizer,
    /// Class names in class-id order.
    pub classes: Vec<String>,
    /// The folder the weights were read from.
    pub dir: PathBuf,
}

/// The class a model gives one input.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair: Option<String>,
    pub class: String,
    pub probability: f64,
    /// Every class's probability, in class-id order.
    pub probabilities: Vec<f64>,
    /// The input's label, where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// The folder a model path names, the LoRA adapters its weights need, and the run's settings
/// where it belongs to a run.
fn locate(path: &Path) -> Result<(PathBuf, Option<LoraConfig>, Option<FinetuneConfig>)> {
    let run_of = |dir: &Path| -> Option<FinetuneConfig> {
        let text = std::fs::read_to_string(dir.join(checkpoint::MODEL_CONFIG)).ok()?;
        serde_json::from_str(&text).ok()
    };
    if path.join(checkpoint::MODEL).exists() {
        // A checkpoint (`<run>/checkpoints/step-N`), whose adapters are those of its run, or a
        // plain model such as `<run>/merged`.
        let parent = path.parent();
        let checkpoint = parent.and_then(Path::file_name) == Some("checkpoints".as_ref());
        let run = match checkpoint {
            true => parent.and_then(Path::parent).and_then(run_of),
            false => parent.and_then(run_of),
        };
        let lora = run.as_ref().and_then(|r| r.lora).filter(|_| checkpoint);
        return Ok((path.to_path_buf(), lora, run));
    }
    let run = run_of(path).with_context(|| {
        format!(
            "{} is neither a model folder (model.safetensors) nor a fine-tuning run",
            path.display()
        )
    })?;
    let merged = path.join("merged");
    if merged.join(checkpoint::MODEL).exists() {
        return Ok((merged, None, Some(run)));
    }
    Ok((checkpoint::locate(path)?, run.lora, Some(run)))
}

impl FineTuned {
    /// Loads the classifier `path` names (see [`ClassifySettings::model`]) onto `device`,
    /// cutting inputs to `max_len` tokens (default: the run's, else min(128, positions)).
    pub fn load(path: &Path, max_len: Option<usize>, device: &Device) -> Result<Self> {
        let (dir, lora, run) = locate(path)?;
        let hf: serde_json::Value = frugal_nn::hf::read_config(&dir)?;
        let classes = class_names(&hf).with_context(|| {
            format!(
                "{}: config.json names no classes (id2label); classify with a model `frugal finetune` wrote",
                dir.display()
            )
        })?;
        let pooling: Pooling = match hf.get("frugal_pooling") {
            Some(p) => serde_json::from_value(p.clone())?,
            None => Pooling::default(),
        };
        let model = load_classifier(&dir, pooling, 0.0, lora.as_ref(), device)?;
        if model.labels() != classes.len() {
            bail!(
                "{}: the head has {} classes but id2label names {}",
                dir.display(),
                model.labels(),
                classes.len()
            );
        }
        let config: EncoderConfig = frugal_nn::hf::read_config(&dir)?;
        let max_len = max_len
            .or(run.map(|r| r.args.max_len))
            .unwrap_or(128)
            .min(config.max_tokens());
        if max_len == 0 {
            bail!("--max-len must be at least 1");
        }
        let tokenizer = ClassTokenizer::load(&dir.join(checkpoint::TOKENIZER), &config, max_len)?;
        Ok(FineTuned {
            model,
            tokenizer,
            classes,
            dir,
        })
    }

    /// The class of each example, in batches of `batch_size`.
    pub fn predict(&self, examples: &[Example], batch_size: usize) -> Result<Vec<Prediction>> {
        let unlabelled: Vec<(Example, u32)> = examples.iter().map(|e| (e.clone(), 0)).collect();
        let encoded = self.tokenizer.encode(&unlabelled)?;
        let device = self.model.encoder.device().clone();
        let mut out = Vec::with_capacity(examples.len());
        let batches = encoded.inputs.chunks(batch_size.max(1));
        for (inputs, examples) in batches.zip(examples.chunks(batch_size.max(1))) {
            let batch = EncoderBatch::new(&self.model.encoder.config, inputs, &device)?;
            let logits = self.model.eval_logits(&batch)?;
            let probabilities = candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
            for (e, p) in examples.iter().zip(probabilities) {
                let p: Vec<f64> = p.into_iter().map(f64::from).collect();
                let best = (0..p.len()).fold(0, |b, i| if p[i] > p[b] { i } else { b });
                out.push(Prediction {
                    text: e.text.clone(),
                    pair: e.pair.clone(),
                    class: self.classes[best].clone(),
                    probability: p[best],
                    probabilities: p,
                    label: (!e.label.is_empty()).then(|| e.label.clone()),
                });
            }
        }
        Ok(out)
    }

    /// Accuracy and macro-F1 of the labelled predictions whose label is one of the model's
    /// classes, and how many labelled ones are not.
    pub fn scores(&self, predictions: &[Prediction]) -> Option<(Scores, usize, usize)> {
        let id = |c: &str| self.classes.iter().position(|k| k == c).map(|i| i as u32);
        let (mut predicted, mut labels, mut unknown) = (Vec::new(), Vec::new(), 0);
        for p in predictions {
            match p.label.as_deref().map(id) {
                Some(Some(label)) => {
                    labels.push(label);
                    predicted.push(id(&p.class).expect("a predicted class is a class"));
                }
                Some(None) => unknown += 1,
                None => {}
            }
        }
        (!labels.is_empty()).then(|| {
            let scores = Scores::of(&predicted, &labels, self.classes.len());
            (scores, labels.len(), unknown)
        })
    }
}

/// The class names of a classifier's `config.json`, in class-id order.
fn class_names(hf: &serde_json::Value) -> Option<Vec<String>> {
    let map = hf.get("id2label")?.as_object()?;
    let mut named: Vec<(usize, String)> = map
        .iter()
        .map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
        .collect::<Option<_>>()?;
    named.sort();
    let in_order = named.iter().enumerate().all(|(i, (k, _))| *k == i);
    (in_order && !named.is_empty()).then(|| named.into_iter().map(|(_, c)| c).collect())
}

/// Runs `frugal classify`: a line per input on `out` (class, probability, text; or JSON), and
/// the scores of labelled inputs on standard error.
pub fn classify(
    settings: &ClassifySettings,
    device: &Device,
    out: &mut impl std::io::Write,
) -> Result<Vec<Prediction>> {
    let mut examples: Vec<Example> = settings
        .texts
        .iter()
        .map(|t| Example {
            text: t.clone(),
            pair: None,
            label: String::new(),
        })
        .collect();
    if let Some(data) = &settings.data {
        let columns = settings
            .columns
            .with_label(settings.label_column.as_deref());
        examples.extend(read_examples(data, &columns)?);
    }
    if examples.is_empty() {
        bail!("nothing to classify: give --text (repeatable) or --data");
    }
    if settings.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let model = FineTuned::load(&settings.model, settings.max_len, device).context("--model")?;
    let predictions = model.predict(&examples, settings.batch_size)?;
    for p in &predictions {
        if settings.json {
            writeln!(out, "{}", serde_json::to_string(p)?)?;
        } else {
            let text: String = p.text.chars().take(100).collect();
            let text = text.replace(['\n', '\t'], " ");
            writeln!(out, "{}\t{:.4}\t{text}", p.class, p.probability)?;
        }
    }
    if let Some((s, scored, unknown)) = model.scores(&predictions) {
        eprintln!(
            "{scored} labelled inputs: accuracy {:.4}, macro-F1 {:.4}{}",
            s.accuracy,
            s.macro_f1,
            match unknown {
                0 => String::new(),
                n => format!(
                    "; {n} more carry labels the model does not know ({}), not scored",
                    model.classes.join(", ")
                ),
            }
        );
    }
    Ok(predictions)
}
