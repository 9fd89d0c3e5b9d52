//! LLaMA decoder in candle, built from differentiable operations only: token embedding,
//! N × (RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU MLP), final RMSNorm, untied head.
//! Parameter names follow Hugging Face's `LlamaForCausalLM`.

use super::config::LlamaConfig;
use super::ops::{causal_softmax, cross_entropy, rms_norm};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// Weights of one decoder layer.
struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A LLaMA model whose parameters live in a `VarMap`.
pub struct Llama {
    pub config: LlamaConfig,
    pub varmap: VarMap,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Tensor,
    /// Rotary tables (cos, sin) per sequence length.
    tables: std::sync::Mutex<HashMap<usize, (Tensor, Tensor)>>,
}

/// x·Wᵀ for x of shape (..., in) and W of shape (out, in).
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("non-scalar");
    let rows: usize = lead.iter().product();
    let y = x.reshape((rows, *last))?.matmul(&w.t()?)?;
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    Ok(y.reshape(out)?)
}

/// Rotary embedding in Hugging Face's rotate-half convention: x·cos + rotate_half(x)·sin.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random::<f32>().max(f32::MIN_POSITIVE), rng.random());
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

impl Llama {
    /// A freshly initialised model: N(0, 0.02²) weights, unit norms, from `seed`.
    pub fn init(config: &LlamaConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let n = shape.iter().product();
            let data = if name.contains("norm") {
                vec![1.0; n]
            } else {
                normal(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors)
    }

    /// Loads `model.safetensors` (Hugging Face names) for the given configuration.
    pub fn load(config: &LlamaConfig, path: &Path) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read model weights {}", path.display()))?;
        Self::from_tensors(config, tensors)
    }

    fn from_tensors(config: &LlamaConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        let varmap = VarMap::new();
        let mut vars = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let t = tensors
                .remove(&name)
                .with_context(|| format!("the weights have no tensor `{name}`"))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor `{name}` has shape {:?}, the configuration needs {shape:?}",
                    t.dims()
                );
            }
            let var = Var::from_tensor(&t.to_dtype(DType::F32)?)?;
            vars.insert(name.clone(), var.as_tensor().clone());
            varmap.data().lock().expect("fresh lock").insert(name, var);
        }
        let get = |n: &str| vars[n].clone();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = |s: &str| get(&format!("model.layers.{i}.{s}.weight"));
                Layer {
                    input_norm: p("input_layernorm"),
                    q: p("self_attn.q_proj"),
                    k: p("self_attn.k_proj"),
                    v: p("self_attn.v_proj"),
                    o: p("self_attn.o_proj"),
                    post_norm: p("post_attention_layernorm"),
                    gate: p("mlp.gate_proj"),
                    up: p("mlp.up_proj"),
                    down: p("mlp.down_proj"),
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
            tables: Default::default(),
        })
    }

    /// Writes the weights as `model.safetensors` with Hugging Face names.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.varmap
            .save(path)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn tables(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let mut cache = self.tables.lock().expect("tables lock");
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
        let dev = &Device::Cpu;
        let entry = (
            Tensor::from_vec(cos, (t, d), dev)?,
            Tensor::from_vec(sin, (t, d), dev)?,
        );
        cache.insert(t, entry.clone());
        Ok(entry)
    }

    /// Logits of shape (batch, seq, vocab) for token ids of shape (batch, seq).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            bail!(
                "sequence length {t} exceeds the model's max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let c = &self.config;
        let (heads, kv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let (cos, sin) = self.tables(t)?;
        let scale = 1.0 / (d as f64).sqrt();
        let mut x = self
            .embed
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, c.hidden_size))?;
        for l in &self.layers {
            let h = rms_norm(&x, &l.input_norm, c.rms_norm_eps)?;
            let split = |w: &Tensor, n: usize| -> Result<Tensor> {
                Ok(linear(&h, w)?
                    .reshape((b, t, n, d))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = rope(&split(&l.q, heads)?, &cos, &sin)?;
            let k = rope(&split(&l.k, kv)?, &cos, &sin)?;
            let v = split(&l.v, kv)?;
            let (k, v) = if kv == heads {
                (k, v)
            } else {
                let rep = heads / kv;
                let expand = |x: Tensor| -> Result<Tensor> {
                    Ok(x.unsqueeze(2)?
                        .expand((b, kv, rep, t, d))?
                        .reshape((b, heads, t, d))?)
                };
                (expand(k)?, expand(v)?)
            };
            let probs = causal_softmax(&q.matmul(&k.t()?)?, scale)?;
            let att = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, t, c.hidden_size))?;
            x = (x + linear(&att, &l.o)?)?;
            let h = rms_norm(&x, &l.post_norm, c.rms_norm_eps)?;
            let mlp = (linear(&h, &l.gate)?.silu()? * linear(&h, &l.up)?)?;
            x = (x + linear(&mlp, &l.down)?)?;
        }
        linear(&rms_norm(&x, &self.norm, c.rms_norm_eps)?, &self.head)
    }

    /// Mean next-token cross-entropy of `targets` (batch, seq) under the logits of `ids`.
    pub fn loss(&self, ids: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let logits = self.forward(ids)?;
        let v = self.config.vocab_size;
        Ok(cross_entropy(
            &logits.reshape(((), v))?,
            &targets.flatten_all()?,
        )?)
    }

    /// Named variables in Hugging Face's names.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut v: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micro() -> LlamaConfig {
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

    fn batch() -> (Tensor, Tensor) {
        let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % 50).collect();
        let x = Tensor::from_vec(ids[..16].to_vec(), (2, 8), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(ids[2..].to_vec(), (2, 8), &Device::Cpu).unwrap();
        (x, y)
    }

    #[test]
    fn every_parameter_gets_a_gradient_that_matches_finite_differences() {
        let model = Llama::init(&micro(), 3).unwrap();
        let (x, y) = batch();
        let loss = model.loss(&x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let vars = model.named_vars();
        assert_eq!(vars.len(), 2 + 2 * 9 + 1);
        for (name, var) in &vars {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            assert!(norm > 0.0, "{name}: zero gradient");
            // Directional derivative along the normalised gradient equals its norm. The step is
            // large enough for the loss change to stand well above f32 rounding.
            let eps = (2e-3 / norm as f64).clamp(1e-2, 1.0);
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
    }

    #[test]
    fn weights_round_trip_through_safetensors() {
        let model = Llama::init(&micro(), 4).unwrap();
        let path =
            std::env::temp_dir().join(format!("frugal-llama-{}.safetensors", std::process::id()));
        model.save(&path).unwrap();
        let again = Llama::load(&micro(), &path).unwrap();
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
        let err = format!("{:#}", Llama::load(&other, &path).err().unwrap());
        assert!(err.contains("shape"), "{err}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn attention_is_causal() {
        // Changing a later token must not change earlier logits.
        let model = Llama::init(&micro(), 5).unwrap();
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
