//! LLaMA decoder in candle, built from differentiable operations only: token embedding,
//! N × (RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU MLP), final RMSNorm, untied head.
//! Parameter names follow Hugging Face's `LlamaForCausalLM`.

mod config;
mod decode;
mod lora;
mod memory;

pub use config::{LlamaConfig, BUILTIN};
pub use decode::KvCache;
pub use lora::{DecoderLora, ADAPTER_CONFIG, ADAPTER_WEIGHTS};

use crate::attention::Attention;
use crate::chunked_loss::{linear_cross_entropy, linear_cross_entropy_value, LossChunks};
use crate::error::{Error, Result};
use crate::layered::{backward_from, only, take, top_backward};
use crate::lora::Adapter;
use crate::ops::{
    causal_attention, cross_entropy, frozen_linear, linear, lora_linear, rms_norm, rope_heads,
    swiglu, whole_causal_attention,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use frugal::Param;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// A linear layer y = x·Wᵀ, with a LoRA adapter on a frozen W or not.
struct Linear {
    /// Its module (`model.layers.0.self_attn.q_proj`).
    module: String,
    w: Tensor,
    lora: Option<Adapter>,
}

/// Weights of one decoder layer.
struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Layer {
    /// The linears in Hugging Face order.
    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
    }

    /// The trained tensors: the norms, and each linear's weight or adapter (A and B).
    fn trained(&self) -> Vec<&Tensor> {
        let linears = self.linears().into_iter().flat_map(|l| {
            let adapter = l
                .lora
                .iter()
                .flat_map(|a| [a.a.as_tensor(), a.b.as_tensor()]);
            std::iter::once(&l.w).chain(adapter)
        });
        [&self.input_norm, &self.post_norm]
            .into_iter()
            .chain(linears)
            .filter(|t| t.is_variable())
            .collect()
    }
}

/// A LLaMA model whose parameters live in a `VarMap`, on one device in one dtype.
pub struct Llama {
    pub config: LlamaConfig,
    pub varmap: VarMap,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Tensor,
    /// Chunks of tokens and of vocabulary the loss is computed in (1: the whole logits).
    loss_chunks: LossChunks,
    /// How attention runs on the CPU (see [`Llama::set_attention`]).
    attention: Attention,
    /// The dtype of activations and of the weights as used (see [`Llama::set_compute_dtype`]).
    compute: DType,
    /// Rotary tables (cos, sin) per sequence length.
    tables: std::sync::Mutex<HashMap<usize, (Tensor, Tensor)>>,
    /// LoRA adapters on frozen linears, when the model has them.
    lora: Option<DecoderLora>,
}

impl Llama {
    /// A freshly initialised model on `device` in `dtype`: N(0, 0.02²) weights, unit norms,
    /// from `seed` (the same weights on every device).
    pub fn init(config: &LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let n = shape.iter().product();
            let data = if name.contains("norm") {
                vec![1.0; n]
            } else {
                crate::init::normal(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors, device, dtype, None)
    }

    /// Loads `model.safetensors` (Hugging Face names) for the given configuration onto `device`
    /// in `dtype`.
    pub fn load(config: &LlamaConfig, path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::file(path, format!("cannot read model weights: {e}")))?;
        Self::from_tensors(config, tensors, device, dtype, None)
    }

    /// Loads a Hugging Face LLaMA folder (`config.json`, and `model.safetensors` or shards
    /// listed in `model.safetensors.index.json`) onto `device` in `dtype`: its configuration and
    /// weights. A tied LM head (`tie_word_embeddings`, no `lm_head.weight`) starts as a copy of
    /// the embeddings and is trained apart from them. LoRA adapters saved beside the weights
    /// (`adapter_config.json` and `adapter_model.safetensors`, as PEFT writes them) are merged
    /// into them. Tensors it would not use are errors, as are architectures it does not
    /// implement ([`LlamaConfig::from_file`]).
    pub fn from_hf(dir: &Path, device: &Device, dtype: DType) -> Result<(LlamaConfig, Self)> {
        let (config, raw) = LlamaConfig::from_file_with_json(&dir.join("config.json"))?;
        let mut tensors = crate::hf::read_weights(dir)?;
        lora::merge_saved_adapters(dir, &mut tensors)?;
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if !tensors.contains_key("lm_head.weight")
            && raw["tie_word_embeddings"].as_bool() == Some(true)
        {
            if let Some(embed) = tensors.get("model.embed_tokens.weight") {
                let head = embed.copy()?;
                tensors.insert("lm_head.weight".into(), head);
            }
        }
        let expected: std::collections::HashSet<String> = config
            .parameter_shapes()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut unused: Vec<&String> = tensors.keys().filter(|n| !expected.contains(*n)).collect();
        if !unused.is_empty() {
            unused.sort();
            return Err(Error::Weights(format!(
                "{}: {} tensor(s) this LLaMA would not use, e.g. `{}`; the folder holds another architecture or a config.json that does not match its weights",
                dir.display(),
                unused.len(),
                unused[0]
            )));
        }
        let model = Self::from_tensors(&config, tensors, device, dtype, None)
            .map_err(|e| Error::Weights(format!("{}: {e}", dir.display())))?;
        Ok((config, model))
    }

    /// The model of `tensors` (Hugging Face names). With `lora`, its adapters' A and B (named
    /// `….lora_A.weight`, `….lora_B.weight` after the linear's module) are trained, and the
    /// weights it does not train are frozen: plain tensors that get no gradient.
    fn from_tensors(
        config: &LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
        lora: Option<(&DecoderLora, HashMap<String, Tensor>)>,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut vars = HashMap::new();
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::Weights("the model's VarMap lock is poisoned".into()))?;
        for (name, shape) in config.parameter_shapes() {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Weights(format!("the weights have no tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Weights(format!(
                    "tensor `{name}` has shape {:?}, the configuration needs {shape:?}",
                    t.dims()
                )));
            }
            let var = Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?;
            // A frozen weight is used detached (the same storage): it gets no gradient.
            let used = match &lora {
                Some((l, _)) if !l.trains(&name) => var.as_tensor().detach(),
                _ => var.as_tensor().clone(),
            };
            vars.insert(name.clone(), used);
            data.insert(name, var);
        }
        drop(data);
        let mut adapters = match &lora {
            Some((l, saved)) => lora::adapters(l, config, saved, device, dtype)?,
            None => HashMap::new(),
        };
        let get = |n: &str| vars[n].clone();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| get(&format!("model.layers.{i}.{s}.weight"));
                let mut linear = |s: &str| {
                    let module = format!("model.layers.{i}.{s}");
                    Linear {
                        w: p(s),
                        lora: adapters.remove(&module),
                        module,
                    }
                };
                Layer {
                    input_norm: p("input_layernorm"),
                    q: linear("self_attn.q_proj"),
                    k: linear("self_attn.k_proj"),
                    v: linear("self_attn.v_proj"),
                    o: linear("self_attn.o_proj"),
                    post_norm: p("post_attention_layernorm"),
                    gate: linear("mlp.gate_proj"),
                    up: linear("mlp.up_proj"),
                    down: linear("mlp.down_proj"),
                }
            })
            .collect();
        Ok(Llama {
            config: config.clone(),
            embed: get("model.embed_tokens.weight"),
            norm: get("model.norm.weight"),
            head: get("lm_head.weight"),
            layers,
            varmap,
            device: device.clone(),
            loss_chunks: LossChunks::WHOLE,
            attention: Attention::default(),
            compute: dtype,
            tables: Default::default(),
            lora: lora.map(|(l, _)| l.clone()),
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Computes in `dtype` while the weights stay in theirs: mixed precision with bf16 compute
    /// and f32 master weights. Each weight is cast where it is used, so its gradient arrives in
    /// the weights' dtype; norms, softmaxes and the loss reduce in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        if dtype != self.compute {
            self.compute = dtype;
            if let Ok(mut tables) = self.tables.lock() {
                tables.clear();
            }
        }
    }

    /// The dtype of the forward and backward computation.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// A weight as the computation uses it (cast to the compute dtype).
    fn used(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        w.to_dtype(self.compute)
    }

    /// x·Wᵀ of a linear layer (a frozen W gets no gradient formed), or with its adapter
    /// x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ as one operation.
    fn project(&self, l: &Linear, x: &Tensor) -> Result<Tensor> {
        let w = self.used(&l.w)?;
        Ok(match &l.lora {
            Some(adapter) => lora_linear(
                x,
                &w,
                adapter.a.as_tensor(),
                adapter.b.as_tensor(),
                adapter.scale(),
            )?,
            None if l.w.is_variable() => linear(x, &w)?,
            None => frozen_linear(x, &w)?,
        })
    }

    /// Writes the weights as `model.safetensors` with Hugging Face names.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.varmap
            .save(path)
            .map_err(|e| Error::file(path, format!("cannot write model weights: {e}")))
    }

    fn tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self
            .tables
            .lock()
            .map_err(|_| Error::Input("the rotary table cache lock is poisoned".into()))?;
        if let Some(x) = cache.get(&t) {
            return Ok(x.clone());
        }
        let d = self.config.head_dim();
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| (1.0 / self.config.rope_theta.powf(2.0 * i as f64 / d as f64)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(t * d);
        let mut sin = Vec::with_capacity(t * d);
        for pos in 0..t {
            for k in 0..d {
                let angle = pos as f32 * inv[k % (d / 2)];
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let dtype = self.compute;
        let entry = (
            Tensor::from_vec(cos, (t, d), &self.device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (t, d), &self.device)?.to_dtype(dtype)?,
        );
        cache.insert(t, entry.clone());
        Ok(entry)
    }

    /// Checks the sequence length of token ids (batch, seq).
    fn check_input(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(Error::Input(format!(
                "sequence length {t} exceeds the model's max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        Ok((b, t))
    }

    /// Token embeddings (batch, seq, hidden) of ids (batch, seq).
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        Ok(self
            .embed
            .embedding(&ids.flatten_all()?)?
            .to_dtype(self.compute)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// One decoder layer on hidden states `x` (batch, seq, hidden).
    fn layer(&self, l: &Layer, x: &Tensor, tables: &(Tensor, Tensor)) -> Result<Tensor> {
        self.layer_attending(l, x, tables, |q, k, v, scale| {
            Ok(match self.attention {
                Attention::Fused => causal_attention(q, k, v, scale)?,
                Attention::Whole => whole_causal_attention(q, k, v, scale)?,
            })
        })
    }

    /// One decoder layer on hidden states `x` (batch, seq, hidden) at the positions of the
    /// rotary tables, whose attention `attend` computes from the rotated queries (batch,
    /// heads, seq, d), keys and values (batch, kv heads, seq, d) and the scale, as (batch, seq,
    /// heads · d).
    fn layer_attending(
        &self,
        l: &Layer,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let scale = 1.0 / (d as f64).sqrt();
        let h = rms_norm(x, &self.used(&l.input_norm)?, c.rms_norm_eps)?;
        let q = rope_heads(&self.project(&l.q, &h)?, heads, cos, sin)?;
        let k = rope_heads(&self.project(&l.k, &h)?, kv, cos, sin)?;
        let v = self
            .project(&l.v, &h)?
            .reshape((b, t, kv, d))?
            .transpose(1, 2)?;
        let att = attend(&q, &k, &v, scale)?;
        let x = (x + self.project(&l.o, &att)?)?;
        let h = rms_norm(&x, &self.used(&l.post_norm)?, c.rms_norm_eps)?;
        let mlp = swiglu(&self.project(&l.gate, &h)?, &self.project(&l.up, &h)?)?;
        Ok((x + self.project(&l.down, &mlp)?)?)
    }

    /// The final norm of the last hidden states (batch, seq, hidden) as (batch·seq, hidden).
    fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        Ok(rms_norm(x, &self.used(&self.norm)?, c.rms_norm_eps)?.reshape(((), c.hidden_size))?)
    }

    /// Mean cross-entropy of `targets` under the head on the last hidden states `x`: through
    /// the whole logits, or chunk by chunk (see [`Llama::set_loss_chunks`]).
    fn head_loss(&self, x: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let h = self.final_norm(x)?;
        let targets = targets.flatten_all()?;
        Ok(if self.loss_chunks.is_whole() {
            let head = self.used(&self.head)?;
            let logits = match self.head.is_variable() {
                true => linear(&h, &head)?,
                false => frozen_linear(&h, &head)?,
            };
            cross_entropy(&logits, &targets)?
        } else {
            linear_cross_entropy(&h, &self.head, &targets, self.loss_chunks)?
        })
    }

    /// Computes the loss in chunks of tokens (and of the vocabulary), so that the whole logits
    /// never exist ([`LossChunks::WHOLE`], the default, computes them at once). The loss equals
    /// the whole-logits one up to f32 rounding.
    pub fn set_loss_chunks(&mut self, chunks: LossChunks) {
        self.loss_chunks = chunks;
    }

    /// Runs attention as `attention` asks: [`Attention::Fused`] (the default) keeps no t × t
    /// tensor on the CPU. Off the CPU both run the same tensor operations.
    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
    }

    /// The loss chunking in force.
    pub fn loss_chunks(&self) -> LossChunks {
        self.loss_chunks
    }

    /// Logits of shape (batch, seq, vocab) for token ids of shape (batch, seq).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_input(ids)?;
        let tables = self.tables(t)?;
        let mut x = self.embed(ids)?;
        for l in &self.layers {
            x = self.layer(l, &x, &tables)?;
        }
        let logits = linear(&self.final_norm(&x)?, &self.used(&self.head)?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Mean next-token cross-entropy of `targets` (batch, seq) under the logits of `ids`.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let (_, t) = self.check_input(ids)?;
        let tables = self.tables(t)?;
        let mut x = self.embed(ids)?;
        for l in &self.layers {
            x = self.layer(l, &x, &tables)?;
        }
        self.head_loss(&x, targets)
    }

    /// [`Llama::loss`] for evaluation: the same value, but no layer's activations outlive it
    /// (nothing is kept for a backward pass).
    pub fn eval_loss(&self, ids: &Tensor, targets: &Tensor) -> Result<f32> {
        let (_, t) = self.check_input(ids)?;
        let tables = self.tables(t)?;
        let mut x = self.embed(ids)?.detach();
        for l in &self.layers {
            x = self.layer(l, &x, &tables)?.detach();
        }
        if self.loss_chunks.is_whole() {
            return Ok(self.head_loss(&x, targets)?.to_scalar::<f32>()?);
        }
        let h = self.final_norm(&x)?;
        let targets = targets.flatten_all()?;
        Ok(linear_cross_entropy_value(
            &h,
            &self.head,
            &targets,
            self.loss_chunks,
        )?)
    }

    /// The loss of a batch and its gradients, layer by layer with activation checkpointing:
    /// the forward pass keeps only each layer's input; the backward pass goes from the head
    /// down, recomputes each layer from its input, backpropagates through it and hands that
    /// part's parameter gradients to `sink` at once (head and final norm first, then each
    /// layer from the top, the embeddings last). `scale` multiplies the loss before the
    /// backward pass (1/micro-batches under accumulation). The gradients equal those of
    /// `loss(..).backward()`, bit for bit. Returns the unscaled loss; a non-finite loss is an
    /// error before any gradient reaches `sink`.
    pub fn backward_by_layers<E: From<Error> + From<candle_core::Error>>(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        scale: f64,
        mut sink: impl FnMut(GradStore) -> std::result::Result<(), E>,
    ) -> std::result::Result<f32, E> {
        let (_, t) = self.check_input(ids)?;
        let tables = self.tables(t)?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = self.embed(ids)?.detach();
        for l in &self.layers {
            let next = self.layer(l, &x, &tables)?.detach();
            inputs.push(x);
            x = next;
        }
        let top = Var::from_tensor(&x)?;
        drop(x);
        let (value, mut dy, grads) =
            top_backward(self.head_loss(&top, targets)?, top.as_tensor(), scale)?;
        sink(only(grads, &[&self.norm, &self.head]))?;
        for (l, x) in self.layers.iter().zip(inputs).rev() {
            let input = Var::from_tensor(&x)?;
            drop(x);
            let y = self.layer(l, &input, &tables)?;
            let mut grads = backward_from(&y, &dy)?;
            dy = take(&mut grads, input.as_tensor())?;
            sink(only(grads, &l.trained()))?;
        }
        if self.embed.is_variable() {
            let grads = backward_from(&self.embed(ids)?, &dy)?;
            sink(only(grads, &[&self.embed]))?;
        }
        Ok(value)
    }

    /// The trained parameters with their LLaMA labels, in model order (see
    /// [`LlamaConfig::parameter_shapes`]): every weight, or under LoRA the adapters (each
    /// after its linear's place, without weight decay) and the weights it trains.
    pub fn params(&self) -> Vec<Param> {
        let data = match self.varmap.data().lock() {
            Ok(d) => d,
            Err(poisoned) => poisoned.into_inner(),
        };
        let adapters: HashMap<&str, &Adapter> = self.adapters().into_iter().collect();
        let mut params = Vec::new();
        for (name, _) in self.config.parameter_shapes() {
            if self.lora.as_ref().is_none_or(|l| l.trains(&name)) {
                if let Some(var) = data.get(&name) {
                    params.push(Param::new(
                        name.clone(),
                        var.clone(),
                        crate::labels::llama(&name),
                    ));
                }
            }
            let module = name.strip_suffix(".weight").unwrap_or(&name);
            if let Some(adapter) = adapters.get(module) {
                for (part, var) in [("lora_A", &adapter.a), ("lora_B", &adapter.b)] {
                    let name = format!("{module}.{part}.weight");
                    params.push(Param::new(name.clone(), var.clone(), lora::label(&name)));
                }
            }
        }
        params
    }

    /// The adapters by module (`model.layers.0.self_attn.q_proj`), in model order.
    fn adapters(&self) -> Vec<(&str, &Adapter)> {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .filter_map(|l| Some((l.module.as_str(), l.lora.as_ref()?)))
            .collect()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn init(config: &LlamaConfig, seed: u64) -> Llama {
        Llama::init(config, seed, &Device::Cpu, DType::F32).unwrap()
    }

    pub(crate) fn micro() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_attention_heads: 4,
            num_hidden_layers: 2,
            num_key_value_heads: Some(2),
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            max_position_embeddings: 16,
        }
    }

    pub(crate) fn batch() -> (Tensor, Tensor) {
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % 50).collect();
        let x = Tensor::from_vec(ids[..16].to_vec(), (2, 8), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(ids[2..].to_vec(), (2, 8), &Device::Cpu).unwrap();
        (x, y)
    }

    /// Checks that the loss's derivative along the normalised gradient `g` of `var` equals
    /// the gradient's norm, by central differences with a step of `step(norm)`, within 2%.
    pub(crate) fn check_gradient(
        model: &Llama,
        name: &str,
        var: &Var,
        g: &Tensor,
        step: impl Fn(f64) -> f64,
    ) {
        let (x, y) = batch();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        let eps = step(norm as f64);
        let dir = (g / norm as f64).unwrap();
        let original = var.as_tensor().copy().unwrap();
        let at = |s: f64| {
            var.set(&(&original + (&dir * s).unwrap()).unwrap())
                .unwrap();
            model.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap() as f64
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&original).unwrap();
        let rel = (fd - norm as f64).abs() / norm as f64;
        assert!(
            rel < 2e-2,
            "{name}: finite difference {fd} vs autograd {norm}"
        );
    }

    #[test]
    fn every_parameter_gets_a_gradient_that_matches_finite_differences() {
        let model = init(&micro(), 3);
        let (x, y) = batch();
        let loss = model.loss(&x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let params = model.params();
        assert_eq!(params.len(), 2 + 2 * 9 + 1);
        for frugal::Param { name, var, .. } in &params {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            // The step is large enough for the loss change to stand well above f32 rounding.
            check_gradient(&model, name, var, g, |norm| (2e-3 / norm).clamp(1e-2, 1.0));
        }
    }

    /// Loss and gradients (as f64 values by name) of the model computing in `dtype`.
    pub(crate) fn loss_and_grads(
        model: &mut Llama,
        dtype: DType,
    ) -> (f64, Vec<(String, Vec<f64>)>) {
        model.set_compute_dtype(dtype);
        let (x, y) = batch();
        let loss = model.loss(&x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let value = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let grads = model
            .params()
            .iter()
            .map(|p| {
                let g = grads.get(p.var.as_tensor()).unwrap();
                assert_eq!(
                    g.dtype(),
                    DType::F32,
                    "{}: the gradient is not in the weights' dtype",
                    p.name
                );
                let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                (p.name.clone(), g.to_vec1().unwrap())
            })
            .collect();
        (value, grads)
    }

    /// The largest difference of two gradients relative to the larger one's largest entry.
    pub(crate) fn rel_diff(a: &[f64], b: &[f64]) -> f64 {
        let scale = a.iter().chain(b).fold(1e-12f64, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    /// The device-generic operations (f64 compute takes them on the CPU) give the fused f32
    /// model's loss and gradients, whole or with the loss in chunks; bf16 mixed precision stays
    /// close to them.
    #[test]
    fn generic_and_bf16_computation_match_the_fused_model() {
        let mut model = init(&micro(), 5);
        let (loss, grads) = loss_and_grads(&mut model, DType::F32);
        for (tokens, vocab) in [(1, 1), (3, 1), (3, 4)] {
            model.set_loss_chunks(LossChunks { tokens, vocab });
            for (dtype, tol) in [(DType::F64, 1e-5), (DType::BF16, 6e-2)] {
                let (l, g) = loss_and_grads(&mut model, dtype);
                let at = format!("{dtype:?}, {tokens} × {vocab} chunks");
                assert!((l - loss).abs() < tol * loss, "{at}: loss {l} vs {loss}");
                for ((name, a), (_, b)) in grads.iter().zip(&g) {
                    let d = rel_diff(a, b);
                    assert!(d < tol, "{at}: gradient of {name} differs by {d}");
                }
            }
            model.set_compute_dtype(DType::F32);
        }
    }

    /// Gradients of every parameter, by name, from a store.
    pub(crate) fn by_name(model: &Llama, grads: &GradStore) -> Vec<(String, Vec<f32>)> {
        model
            .params()
            .iter()
            .filter_map(|p| {
                let g = grads.get(p.var.as_tensor())?;
                Some((p.name.clone(), g.flatten_all().unwrap().to_vec1().unwrap()))
            })
            .collect()
    }

    #[test]
    fn fused_attention_gives_the_whole_attention_loss_and_gradients() {
        let (x, y) = batch();
        let mut model = init(&micro(), 6);
        let loss = model.loss(&x, &y).unwrap();
        let fused = by_name(&model, &loss.backward().unwrap());
        let fused_loss = loss.to_scalar::<f32>().unwrap();
        model.set_attention(Attention::Whole);
        let loss = model.loss(&x, &y).unwrap();
        let whole = by_name(&model, &loss.backward().unwrap());
        assert!((loss.to_scalar::<f32>().unwrap() - fused_loss).abs() < 1e-5);
        assert_eq!(fused.len(), whole.len());
        for ((name, a), (_, b)) in fused.iter().zip(&whole) {
            let diff = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{name}: {diff}");
        }
    }

    #[test]
    fn layer_by_layer_backward_gives_the_whole_backward_bit_for_bit() {
        let (x, y) = batch();
        for (tokens, vocab) in [(1, 1), (3, 1), (3, 4)] {
            let chunks = LossChunks { tokens, vocab };
            let mut model = init(&micro(), 6);
            model.set_loss_chunks(chunks);
            for scale in [1.0, 0.25] {
                let loss = model.loss(&x, &y).unwrap();
                let value = loss.to_scalar::<f32>().unwrap();
                let whole = if scale == 1.0 {
                    loss
                } else {
                    (loss * scale).unwrap()
                };
                let whole = by_name(&model, &whole.backward().unwrap());
                let mut parts: Vec<Vec<(String, Vec<f32>)>> = Vec::new();
                let got = model
                    .backward_by_layers(&x, &y, scale, |g| {
                        parts.push(by_name(&model, &g));
                        Ok::<(), Error>(())
                    })
                    .unwrap();
                assert_eq!(got, value);
                // Evaluation gives the training loss: bit for bit through the whole logits, up
                // to the order of the log-sum-exp's terms in chunks.
                let evaluated = model.eval_loss(&x, &y).unwrap();
                if chunks.is_whole() {
                    assert_eq!(evaluated, value);
                } else {
                    assert!((evaluated - value).abs() < 1e-6, "{evaluated} vs {value}");
                }
                // Head and final norm, each layer from the top, then the embeddings.
                assert_eq!(parts.len(), 2 + 2);
                let names =
                    |i: usize| -> Vec<&str> { parts[i].iter().map(|(n, _)| n.as_str()).collect() };
                assert_eq!(names(0), ["model.norm.weight", "lm_head.weight"]);
                assert!(names(1).iter().all(|n| n.starts_with("model.layers.1.")));
                assert_eq!(names(1).len(), 9);
                assert!(names(2).iter().all(|n| n.starts_with("model.layers.0.")));
                assert_eq!(names(3), ["model.embed_tokens.weight"]);
                let mut flat: Vec<(String, Vec<f32>)> = parts.into_iter().flatten().collect();
                flat.sort_by(|a, b| a.0.cmp(&b.0));
                let mut whole = whole;
                whole.sort_by(|a, b| a.0.cmp(&b.0));
                assert_eq!(flat, whole, "{chunks:?}, scale {scale}");
            }
        }
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let model = init(&micro(), 4);
        let path =
            std::env::temp_dir().join(format!("frugal-llama-{}.safetensors", std::process::id()));
        model.save(&path).unwrap();
        let again = Llama::load(&micro(), &path, &Device::Cpu, DType::F32).unwrap();
        let (x, _) = batch();
        let logits = |m: &Llama| {
            m.forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (logits(&model), logits(&again));
        assert_eq!(a, b);
        let mut other = micro();
        other.hidden_size = 32;
        let err = Llama::load(&other, &path, &Device::Cpu, DType::F32)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("shape"), "{err}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn attention_is_causal() {
        // Changing a later token must not change earlier logits.
        let model = init(&micro(), 5);
        let (x, _) = batch();
        let mut ids = x.to_vec2::<u32>().unwrap();
        let a = model.forward(&x).unwrap().to_vec3::<f32>().unwrap();
        ids[0][6] = (ids[0][6] + 1) % 50;
        let x2 = Tensor::new(ids, &Device::Cpu).unwrap();
        let b = model.forward(&x2).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(a[0][..6], b[0][..6]);
        assert_ne!(a[0][6], b[0][6]);
    }
}
