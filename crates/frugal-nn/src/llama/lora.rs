//! LoRA on a LLaMA: adapters on its frozen linears, the other weights (embeddings, norms, LM
//! head) trained or frozen, and the adapters saved as PEFT saves them (`adapter_config.json`
//! and `adapter_model.safetensors`, tensors named `base_model.model.<module>.lora_A.weight`),
//! so that a checkpoint is a Hugging Face LLaMA with a PEFT adapter beside it.

use super::{Llama, LlamaConfig};
use crate::error::{Error, Result};
use crate::lora::{Adapter, LoraConfig, LoraTargets};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The adapters' weights in a checkpoint (PEFT's name).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapters' settings in a checkpoint (PEFT's name and keys).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The prefix PEFT gives a causal LM's tensors.
const PEFT_PREFIX: &str = "base_model.model.";
/// The modules PEFT names in `target_modules`, in model order.
const LINEARS: &[&str] = crate::labels::LLAMA_LINEARS;

/// LoRA on a decoder: adapters on its linears, and whether the weights that are not linears of
/// a layer (embeddings, norms, LM head) are trained too, as in GaLore's pre-training comparison,
/// or frozen, as PEFT fine-tunes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderLora {
    #[serde(flatten)]
    pub adapters: LoraConfig,
    /// Train the embeddings, norms and LM head beside the adapters.
    pub train_others: bool,
}

impl DecoderLora {
    /// Checks the settings: the decoder has no dropout, so the adapters have none either.
    pub fn validate(&self) -> Result<()> {
        self.adapters.validate()?;
        if self.adapters.dropout != 0.0 {
            return Err(Error::Config(format!(
                "LoRA dropout {} on a LLaMA: the decoder runs without dropout; use dropout=0",
                self.adapters.dropout
            )));
        }
        Ok(())
    }

    /// True if the weight `name` is trained: a linear of a layer never is (its adapter is, where
    /// it has one), the other weights when `train_others`.
    pub fn trains(&self, name: &str) -> bool {
        let linear = crate::labels::llama(name).role == frugal::labels::Role::Projectable;
        self.train_others && !linear
    }

    /// The trained tensors of a model of `config`: (name, shape), the adapters' A and B in
    /// their linears' places and the weights it trains, in model order.
    pub fn trained_shapes(&self, config: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for (name, shape) in config.parameter_shapes() {
            if self.trains(&name) {
                out.push((name.clone(), shape.clone()));
            }
            out.extend(self.adapters.adapter_shapes(vec![(name, shape)]));
        }
        out
    }

    /// The adapters' values on a model of `config`.
    pub fn adapter_count(&self, config: &LlamaConfig) -> usize {
        self.adapters
            .adapter_shapes(config.parameter_shapes())
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The settings of a PEFT `adapter_config.json`.
    fn from_peft(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not a PEFT adapter configuration: {e}")))?;
        let bad = |what: String| Error::file(path, what);
        if raw["peft_type"].as_str().is_some_and(|t| t != "LORA") {
            return Err(bad(format!(
                "adapter type {} is not LORA, the only one frugal reads",
                raw["peft_type"]
            )));
        }
        // PEFT features beyond plain adapters of one rank on whole linears.
        let unsupported = |key: &str| match &raw[key] {
            serde_json::Value::Null => false,
            serde_json::Value::Bool(on) => *on,
            serde_json::Value::String(s) => key != "bias" || s != "none",
            serde_json::Value::Object(o) => !o.is_empty(),
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Number(_) => true,
        };
        let keys = [
            "use_rslora",
            "use_dora",
            "use_qalora",
            "lora_bias",
            "bias",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
            "modules_to_save",
            "target_parameters",
        ];
        if let Some(key) = keys.into_iter().find(|k| unsupported(k)) {
            return Err(bad(format!(
                "`{key}` {} is not supported (frugal reads adapters of one rank on whole linears); merge the adapter into the weights first (PEFT's merge_and_unload)",
                raw[key]
            )));
        }
        let rank = raw["r"]
            .as_u64()
            .ok_or_else(|| bad("no whole number `r` (the rank)".into()))?;
        let alpha = raw["lora_alpha"].as_f64().unwrap_or(rank as f64);
        let mut modules: Vec<String> = match &raw["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .filter_map(|m| Some(m.as_str()?.rsplit('.').next()?.to_string()))
                .collect(),
            serde_json::Value::String(s) if s == "all-linear" => {
                LINEARS.iter().map(|s| s.to_string()).collect()
            }
            other => {
                return Err(bad(format!(
                    "target_modules {other} is not a list of module names"
                )))
            }
        };
        modules.sort();
        let mut all: Vec<String> = LINEARS.iter().map(|s| s.to_string()).collect();
        all.sort();
        let targets = if modules == all {
            LoraTargets::All
        } else if modules == ["q_proj", "v_proj"] {
            LoraTargets::Qv
        } else {
            return Err(bad(format!(
                "target_modules {modules:?}: frugal reads adapters on q_proj and v_proj, or on all seven linears"
            )));
        };
        let lora = DecoderLora {
            adapters: LoraConfig {
                rank: rank as usize,
                alpha,
                dropout: 0.0,
                targets,
            },
            train_others: false,
        };
        lora.adapters.validate()?;
        Ok(lora)
    }

    /// PEFT's `adapter_config.json` for these adapters.
    fn to_peft(&self) -> serde_json::Value {
        let targets: Vec<&str> = LINEARS
            .iter()
            .copied()
            .filter(|m| match self.adapters.targets {
                LoraTargets::All => true,
                LoraTargets::Qv => matches!(*m, "q_proj" | "v_proj"),
            })
            .collect();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.adapters.rank,
            "lora_alpha": self.adapters.alpha,
            "lora_dropout": self.adapters.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "base_model_name_or_path": null,
        })
    }
}

/// The label of a LLaMA parameter or adapter (adapters are state-full, without weight decay).
pub(super) fn label(name: &str) -> frugal::Label {
    let label = crate::labels::llama(name);
    if name.contains(".lora_") {
        label.with_weight_decay(false)
    } else {
        label
    }
}

impl LlamaConfig {
    /// The trained parameters with their labels, in model order: every weight
    /// ([`LlamaConfig::labelled_shapes`]), or under `lora` what it trains
    /// ([`DecoderLora::trained_shapes`]). What the optimizer plans from.
    pub fn trained_shapes(&self, lora: Option<&DecoderLora>) -> Vec<frugal::labels::ParamShape> {
        match lora {
            None => self.labelled_shapes(),
            Some(l) => l
                .trained_shapes(self)
                .into_iter()
                .map(|(name, shape)| frugal::labels::ParamShape {
                    label: label(&name),
                    name,
                    shape,
                })
                .collect(),
        }
    }
}

/// The adapters of a model of `config` by module: those in `saved` (named
/// `<module>.lora_A.weight` and `<module>.lora_B.weight`), on `device` in `dtype`.
pub(super) fn adapters(
    lora: &DecoderLora,
    config: &LlamaConfig,
    saved: &HashMap<String, Tensor>,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Adapter>> {
    let mut out = HashMap::new();
    for (name, shape) in config.parameter_shapes() {
        let Some(module) = lora.adapters.module(&name) else {
            continue;
        };
        let take = |part: &str, want: [usize; 2]| -> Result<Tensor> {
            let key = format!("{module}.{part}.weight");
            let t = saved
                .get(&key)
                .ok_or_else(|| Error::Weights(format!("the adapters have no tensor `{key}`")))?;
            if t.dims() != want {
                return Err(Error::Weights(format!(
                    "adapter tensor `{key}` has shape {:?}, rank {} on this model needs {want:?}",
                    t.dims(),
                    lora.adapters.rank
                )));
            }
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let rank = lora.adapters.rank;
        let a = take("lora_A", [rank, shape[1]])?;
        let b = take("lora_B", [shape[0], rank])?;
        out.insert(
            module.to_string(),
            Adapter::from_tensors(&lora.adapters, a, b)?,
        );
    }
    Ok(out)
}

/// Merges the PEFT adapters saved in `dir`, if it has any, into the weights `tensors`
/// (W + (α/r)·B·A). Returns whether it had adapters.
pub(super) fn merge_saved_adapters(
    dir: &Path,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<bool> {
    let Some((lora, saved)) = read_saved(dir)? else {
        return Ok(false);
    };
    let scale = lora.adapters.alpha / lora.adapters.rank as f64;
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let mut merged = 0;
    for name in names {
        let Some(module) = lora.adapters.module(&name) else {
            continue;
        };
        let part = |p: &str| {
            let key = format!("{module}.{p}.weight");
            saved.get(&key).ok_or_else(|| {
                Error::file(
                    &dir.join(ADAPTER_WEIGHTS),
                    format!("no tensor `{PEFT_PREFIX}{key}` for the adapted linear"),
                )
            })
        };
        let delta = (part("lora_B")?.matmul(part("lora_A")?)? * scale)?;
        let w = &tensors[&name];
        if w.dims() != delta.dims() {
            return Err(Error::file(
                &dir.join(ADAPTER_WEIGHTS),
                format!(
                    "the adapter of `{name}` makes a {:?} update for a {:?} weight: it belongs to another model",
                    delta.dims(),
                    w.dims()
                ),
            ));
        }
        let sum = (w.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?.to_dtype(w.dtype())?;
        tensors.insert(name, sum);
        merged += 1;
    }
    if merged * 2 != saved.len() {
        return Err(Error::file(
            &dir.join(ADAPTER_WEIGHTS),
            format!(
                "{} adapter tensors for {merged} adapted linears: the adapters belong to another model",
                saved.len()
            ),
        ));
    }
    Ok(true)
}

/// The adapters saved in `dir` (settings and tensors by frugal's names), if it has any.
fn read_saved(dir: &Path) -> Result<Option<(DecoderLora, HashMap<String, Tensor>)>> {
    let config = dir.join(ADAPTER_CONFIG);
    if !config.exists() {
        return Ok(None);
    }
    let lora = DecoderLora::from_peft(&config)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
        Error::file(
            &path,
            format!("cannot read the adapters that {ADAPTER_CONFIG} describes: {e}"),
        )
    })?;
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| {
            let name = name.strip_prefix(PEFT_PREFIX).unwrap_or(&name);
            // PEFT names adapters `….lora_A.default.weight` in memory, `….lora_A.weight` saved.
            (name.replace(".default.weight", ".weight"), t)
        })
        .collect();
    Ok(Some((lora, tensors)))
}

impl Llama {
    /// The model with its linears frozen and new LoRA adapters on them (B = 0: the output is
    /// unchanged until they train), A drawn from `seed`; the other weights are trained or frozen
    /// as `lora` says.
    pub fn with_lora(self, lora: &DecoderLora, seed: u64) -> Result<Self> {
        lora.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut saved = HashMap::new();
        for (name, shape) in self.config.parameter_shapes() {
            if let Some(module) = lora.adapters.module(&name) {
                let adapter =
                    Adapter::new(&lora.adapters, shape[1], shape[0], &mut rng, &Device::Cpu)?;
                saved.insert(
                    format!("{module}.lora_A.weight"),
                    adapter.a.as_tensor().clone(),
                );
                saved.insert(
                    format!("{module}.lora_B.weight"),
                    adapter.b.as_tensor().clone(),
                );
            }
        }
        self.rebuilt(lora, saved)
    }

    /// The model with the adapters saved in checkpoint `dir` ([`Llama::save_adapters`]) on its
    /// frozen linears, trained as `lora` says (the saved settings must be `lora`'s).
    pub fn with_saved_adapters(self, lora: &DecoderLora, dir: &Path) -> Result<Self> {
        lora.validate()?;
        let Some((saved, tensors)) = read_saved(dir)? else {
            return Err(Error::file(
                dir,
                format!("no {ADAPTER_CONFIG}: the checkpoint holds no LoRA adapters"),
            ));
        };
        if saved.adapters != lora.adapters {
            return Err(Error::file(
                &dir.join(ADAPTER_CONFIG),
                format!(
                    "adapters of rank {}, alpha {}, {:?} targets, but the run has rank {}, alpha {}, {:?}",
                    saved.adapters.rank,
                    saved.adapters.alpha,
                    saved.adapters.targets,
                    lora.adapters.rank,
                    lora.adapters.alpha,
                    lora.adapters.targets
                ),
            ));
        }
        self.rebuilt(lora, tensors)
    }

    /// This model's weights with adapters made of `saved` (on the CPU), keeping its settings.
    fn rebuilt(self, lora: &DecoderLora, saved: HashMap<String, Tensor>) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = {
            let data = self
                .varmap
                .data()
                .lock()
                .map_err(|_| Error::Weights("the model's VarMap lock is poisoned".into()))?;
            data.iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect()
        };
        let mut model = Self::from_tensors(
            &self.config,
            tensors,
            &self.device,
            self.embed.dtype(),
            Some((lora, saved)),
        )?;
        model.loss_chunks = self.loss_chunks;
        model.attention = self.attention;
        model.set_compute_dtype(self.compute);
        Ok(model)
    }

    /// The LoRA settings, when the model has adapters.
    pub fn lora(&self) -> Option<&DecoderLora> {
        self.lora.as_ref()
    }

    /// Writes the adapters into `dir` as PEFT writes them: `adapter_config.json` and
    /// `adapter_model.safetensors`. Nothing is written for a model without adapters.
    pub fn save_adapters(&self, dir: &Path) -> Result<()> {
        let Some(lora) = &self.lora else {
            return Ok(());
        };
        let tensors: HashMap<String, Tensor> = self
            .adapters()
            .into_iter()
            .flat_map(|(module, a)| {
                [
                    (
                        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
                        a.a.as_tensor().clone(),
                    ),
                    (
                        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
                        a.b.as_tensor().clone(),
                    ),
                ]
            })
            .collect();
        let path = dir.join(ADAPTER_WEIGHTS);
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| Error::file(&path, format!("cannot write the adapters: {e}")))?;
        let path = dir.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&lora.to_peft())
            .map_err(|e| Error::file(&path, e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| Error::file(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::tests::{batch, by_name, check_gradient, loss_and_grads, micro, rel_diff};
    use crate::ops::tests::max_diff;

    fn lora(targets: LoraTargets, train_others: bool) -> DecoderLora {
        DecoderLora {
            adapters: LoraConfig {
                rank: 3,
                alpha: 6.0,
                dropout: 0.0,
                targets,
            },
            train_others,
        }
    }

    fn model(seed: u64) -> Llama {
        Llama::init(&micro(), seed, &Device::Cpu, DType::F32).unwrap()
    }

    fn logits(m: &Llama) -> Vec<f32> {
        let (x, _) = batch();
        m.forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Gives every adapter's B random values, so that the adapters change the output.
    fn perturb(m: &Llama, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (_, a) in m.adapters() {
            let dims = a.b.as_tensor().dims().to_vec();
            let values = crate::init::normal(&mut rng, dims.iter().product(), 0.3);
            a.b.set(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    /// The base weights saved in `dir`, without adapters.
    fn base(dir: &Path) -> Llama {
        Llama::load(
            &micro(),
            &dir.join("model.safetensors"),
            &Device::Cpu,
            DType::F32,
        )
        .unwrap()
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("frugal-lora-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn adapters_start_as_the_model_and_train_only_what_they_say() {
        let base = logits(&model(3));
        for (targets, others, adapted) in [
            (LoraTargets::All, true, 7),
            (LoraTargets::Qv, true, 2),
            (LoraTargets::All, false, 7),
        ] {
            let m = model(3).with_lora(&lora(targets, others), 9).unwrap();
            // B = 0: the same logits, bit for bit.
            assert_eq!(logits(&m), base);
            // What the optimizer plans from is what it gets.
            let planned: Vec<_> = micro()
                .trained_shapes(Some(&lora(targets, others)))
                .into_iter()
                .map(|p| (p.name, p.shape, p.label))
                .collect();
            let got: Vec<_> = m
                .params()
                .into_iter()
                .map(|p| (p.name, p.var.as_tensor().dims().to_vec(), p.label))
                .collect();
            assert_eq!(planned, got);
            let names: Vec<String> = m.params().into_iter().map(|p| p.name).collect();
            let layers = micro().num_hidden_layers;
            let others_count = if others { 2 + 2 * layers + 1 } else { 0 };
            assert_eq!(
                names.len(),
                others_count + 2 * adapted * layers,
                "{names:?}"
            );
            assert!(names.iter().all(|n| !n.ends_with("_proj.weight")));
            assert_eq!(
                names.contains(&"model.embed_tokens.weight".to_string()),
                others
            );
            // The frozen linears get no gradient; every trained tensor gets one.
            perturb(&m, 1);
            let (x, y) = batch();
            let grads = m.loss(&x, &y).unwrap().backward().unwrap();
            for p in m.params() {
                assert!(grads.get(p.var.as_tensor()).is_some(), "{}", p.name);
            }
            for l in &m.layers {
                assert!(grads.get(&l.q.w).is_none());
                assert!(!l.q.w.is_variable());
            }
        }
    }

    #[test]
    fn adapter_gradients_match_finite_differences() {
        let m = model(4)
            .with_lora(&lora(LoraTargets::All, true), 2)
            .unwrap();
        perturb(&m, 2);
        let (x, y) = batch();
        let grads = m.loss(&x, &y).unwrap().backward().unwrap();
        for p in m.params().iter().filter(|p| p.name.contains("lora")) {
            let g = grads.get(p.var.as_tensor()).unwrap();
            // A step small against the curvature, large against f32 rounding of the loss.
            check_gradient(&m, &p.name, &p.var, g, |norm| {
                (2e-4 / norm).clamp(1e-3, 0.1)
            });
        }
    }

    #[test]
    fn layer_by_layer_backward_gives_the_whole_backward_under_lora() {
        let (x, y) = batch();
        for others in [true, false] {
            let m = model(5)
                .with_lora(&lora(LoraTargets::Qv, others), 3)
                .unwrap();
            perturb(&m, 3);
            let mut whole = by_name(&m, &m.loss(&x, &y).unwrap().backward().unwrap());
            let mut parts = Vec::new();
            m.backward_by_layers(&x, &y, 1.0, |g| {
                parts.extend(by_name(&m, &g));
                Ok::<(), Error>(())
            })
            .unwrap();
            assert_eq!(parts.len(), m.params().len());
            parts.sort_by(|a, b| a.0.cmp(&b.0));
            whole.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(parts, whole, "others trained: {others}");
        }
    }

    #[test]
    fn saved_adapters_resume_exactly_and_load_merged() {
        let dir = scratch("save");
        let m = model(6)
            .with_lora(&lora(LoraTargets::All, true), 4)
            .unwrap();
        perturb(&m, 4);
        let adapted = logits(&m);
        m.save(&dir.join("model.safetensors")).unwrap();
        m.save_adapters(&dir).unwrap();
        std::fs::write(dir.join("config.json"), micro().to_hf_json(0).to_string()).unwrap();
        // PEFT's file: its config and tensor names.
        let peft: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        assert_eq!(
            (peft["r"].as_u64(), peft["lora_alpha"].as_f64()),
            (Some(3), Some(6.0))
        );
        let saved =
            candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
        assert!(saved.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
        assert_eq!(saved.len(), 2 * 7 * micro().num_hidden_layers);
        // Resumed: the base weights and the adapters, bit for bit.
        let resumed = base(&dir)
            .with_saved_adapters(&lora(LoraTargets::All, true), &dir)
            .unwrap();
        assert_eq!(logits(&resumed), adapted);
        // Loaded as a Hugging Face folder: merged into the weights.
        let (_, merged) = Llama::from_hf(&dir, &Device::Cpu, DType::F32).unwrap();
        assert!(merged.lora().is_none());
        let diff = logits(&merged)
            .iter()
            .zip(&adapted)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "merged logits differ by {diff}");
        assert!(
            logits(&merged) != logits(&model(6)),
            "the adapters changed nothing"
        );
        // Refusals: other settings, another target set, dropout.
        let err = |e: Error| e.to_string();
        let other = base(&dir)
            .with_saved_adapters(&lora(LoraTargets::Qv, true), &dir)
            .err()
            .map(err)
            .unwrap();
        assert!(other.contains("but the run has rank 3"), "{other}");
        let mut peft = peft;
        peft["target_modules"] = serde_json::json!(["q_proj", "k_proj"]);
        std::fs::write(dir.join(ADAPTER_CONFIG), peft.to_string()).unwrap();
        let targets = Llama::from_hf(&dir, &Device::Cpu, DType::F32)
            .err()
            .map(err)
            .unwrap();
        assert!(
            targets.contains("q_proj and v_proj, or on all seven"),
            "{targets}"
        );
        let mut dropped = lora(LoraTargets::Qv, true);
        dropped.adapters.dropout = 0.1;
        let dropout = model(1).with_lora(&dropped, 1).err().map(err).unwrap();
        assert!(dropout.contains("use dropout=0"), "{dropout}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The device-generic operations (f64 compute takes them on the CPU, as a GPU does) give
    /// the fused adapted linears' loss and gradients.
    #[test]
    fn adapters_computed_generically_match_the_fused_operation() {
        let mut m = model(8)
            .with_lora(&lora(LoraTargets::All, false), 6)
            .unwrap();
        perturb(&m, 6);
        let (fused_loss, fused) = loss_and_grads(&mut m, DType::F32);
        let (loss, generic) = loss_and_grads(&mut m, DType::F64);
        assert!(
            (loss - fused_loss).abs() < 1e-5 * fused_loss,
            "{loss} vs {fused_loss}"
        );
        for ((name, a), (_, b)) in fused.iter().zip(&generic) {
            let d = rel_diff(a, b);
            assert!(d < 1e-4, "{name}: gradients differ by {d}");
        }
    }

    #[test]
    fn a_model_with_adapters_decodes_as_it_reads() {
        let m = model(7)
            .with_lora(&lora(LoraTargets::All, false), 5)
            .unwrap();
        perturb(&m, 5);
        let (x, _) = batch();
        let whole = m.forward(&x).unwrap();
        let mut cache = crate::llama::KvCache::new();
        let first = m
            .next_logits(&x.narrow(1, 0, 5).unwrap(), &mut cache)
            .unwrap();
        let next = m
            .next_logits(&x.narrow(1, 5, 1).unwrap(), &mut cache)
            .unwrap();
        for (got, at) in [(first, 4), (next, 5)] {
            let want = whole.narrow(1, at, 1).unwrap().squeeze(1).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "position {at}: {d}");
        }
    }
}
