//! Decoding: the next token's logits after new tokens, with the keys and values of the tokens
//! before them kept, so that each generated token costs one token's forward pass.

use super::Llama;
use crate::error::{Error, Result};
use crate::ops::{attention_after, causal_attention, linear};
use candle_core::Tensor;

/// Tokens of room each layer's keys and values grow by.
const GROW_BY: usize = 256;

/// The keys and values of the tokens a [`Llama`] has read, per layer (batch, kv heads, tokens,
/// head size), after rotation; each layer's grow in place, room for 256 more tokens at a
/// time. (Not `Clone`: a copy would share the storage its tokens are written into; see
/// [`KvCache::repeat`].)
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache: the next tokens start at position 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens read so far (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before any token was read.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The keys and values of every sequence repeated `n` times along the batch (sequence b's
    /// copies at rows b·n to b·n + n − 1): `n` continuations of tokens read once.
    pub fn repeat(&self, n: usize) -> Result<KvCache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            // Room for the tokens read at once, in whole steps of GROW_BY (no regrowing).
            let room = self.len.max(1).next_multiple_of(GROW_BY);
            let mut copy = candle_nn::kv_cache::KvCache::new(2, room);
            if let (Some(k), Some(v)) = (layer.k()?, layer.v()?) {
                let rows = |t: Tensor| -> Result<Tensor> {
                    let (b, heads, len, d) = t.dims4()?;
                    Ok(t.unsqueeze(1)?
                        .broadcast_as((b, n, heads, len, d))?
                        .reshape((b * n, heads, len, d))?)
                };
                copy.append(&rows(k)?, &rows(v)?)?;
            }
            layers.push(copy);
        }
        Ok(KvCache {
            layers,
            len: self.len,
        })
    }

    /// Sequences the cache holds (its batch), 0 before any token was read.
    fn rows(&self) -> Result<usize> {
        match self.layers.first().map(|l| l.k()).transpose()?.flatten() {
            Some(k) => Ok(k.dim(0)?),
            None => Ok(0),
        }
    }

    /// Layer `i`'s keys and values with `k` and `v` (the new tokens') appended.
    fn extend(&mut self, i: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if i == self.layers.len() {
            self.layers
                .push(candle_nn::kv_cache::KvCache::new(2, GROW_BY));
        }
        Ok(self.layers[i].append(&k.contiguous()?, &v.contiguous()?)?)
    }
}

impl Llama {
    /// Fails unless `cache` belongs to this model and has room for `t` (≥ 1) more tokens.
    fn check_cache(&self, cache: &KvCache, t: usize) -> Result<()> {
        let (start, positions) = (cache.len, self.config.max_position_embeddings);
        if t == 0 || start + t > positions {
            return Err(Error::Input(format!(
                "cannot read {t} more tokens after {start}: the model has {positions} positions (max_position_embeddings)"
            )));
        }
        if !cache.layers.is_empty() && cache.layers.len() != self.layers.len() {
            return Err(Error::Input(
                "the key-value cache belongs to another model".into(),
            ));
        }
        Ok(())
    }

    /// The logits (batch, vocab) of the token after `ids` (batch, t), tokens that follow the
    /// ones `cache` holds; their keys and values join it. With an empty cache the tokens are
    /// read as [`Llama::forward`] reads them (the same logits at the last position).
    pub fn next_logits(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let (start, positions) = (cache.len, self.config.max_position_embeddings);
        self.check_cache(cache, t)?;
        let (cos, sin) = self.tables(positions)?;
        let tables = (cos.narrow(0, start, t)?, sin.narrow(0, start, t)?);
        let mut x = self.embed(ids)?;
        for (i, l) in self.layers.iter().enumerate() {
            x = self.layer_attending(l, &x, &tables, |q, k, v, scale| {
                let (k, v) = cache.extend(i, k, v)?;
                Ok(if start == 0 {
                    causal_attention(q, &k, &v, scale)?
                } else {
                    attention_after(q, &k, &v, scale)?
                })
            })?;
        }
        cache.len = start + t;
        let last = self.final_norm(&x.narrow(1, t - 1, 1)?)?;
        Ok(linear(&last, &self.used(&self.head)?)?)
    }

    /// The logits (rows, vocab) after one new token for each sequence: `tokens[r]` follows the
    /// tokens of `caches[r]`, a cache of one sequence, which gets its keys and values. The
    /// caches may hold different numbers of tokens: the rows share each layer's matrix products
    /// (the weights are read once for all of them), and each attends to its own keys at its
    /// own position.
    pub fn next_logits_each(&self, tokens: &[u32], caches: &mut [KvCache]) -> Result<Tensor> {
        let positions = self.config.max_position_embeddings;
        if tokens.is_empty() || tokens.len() != caches.len() {
            return Err(Error::Input(format!(
                "next_logits_each: {} tokens for {} key-value caches; give one token per cache",
                tokens.len(),
                caches.len()
            )));
        }
        let mut at = Vec::with_capacity(caches.len());
        for cache in caches.iter() {
            self.check_cache(cache, 1)?;
            let rows = cache.rows()?;
            if rows > 1 {
                return Err(Error::Input(format!(
                    "next_logits_each reads caches of one sequence; this one holds {rows}: read each sequence into a cache of its own"
                )));
            }
            at.push(cache.len as u32);
        }
        // The new tokens are read as the positions of one sequence, each at its own row of
        // the rotary tables; attention is per sequence.
        let (cos, sin) = self.tables(positions)?;
        let at = Tensor::new(at, self.device())?;
        let tables = (cos.index_select(&at, 0)?, sin.index_select(&at, 0)?);
        let mut x = self.embed(&Tensor::new(tokens, self.device())?.unsqueeze(0)?)?;
        for (i, l) in self.layers.iter().enumerate() {
            x = self.layer_attending(l, &x, &tables, |q, k, v, scale| {
                let mut rows = Vec::with_capacity(caches.len());
                for (r, cache) in caches.iter_mut().enumerate() {
                    let (k, v) = cache.extend(i, &k.narrow(2, r, 1)?, &v.narrow(2, r, 1)?)?;
                    rows.push(attention_after(&q.narrow(2, r, 1)?, &k, &v, scale)?);
                }
                Ok(Tensor::cat(&rows, 1)?)
            })?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        Ok(linear(&self.final_norm(&x)?, &self.used(&self.head)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaConfig;
    use crate::ops::tests::max_diff;
    use candle_core::{DType, Device};

    /// A model with grouped key-value heads (4 query heads read 2).
    fn model() -> Llama {
        let config = LlamaConfig {
            vocab_size: 37,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            max_position_embeddings: 12,
            ..LlamaConfig::builtin("tiny").unwrap()
        };
        Llama::init(&config, 7, &Device::Cpu, DType::F32).unwrap()
    }

    fn ids(tokens: &[u32]) -> Tensor {
        Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    }

    /// Two sequences read once, each continued twice from a repeated cache: every row's logits
    /// are those of its sequence read whole.
    #[test]
    fn a_repeated_cache_continues_each_sequence_as_if_read_again() {
        let model = model();
        let a: Vec<u32> = (0..7).map(|i| (i * 5 + 1) % 37).collect();
        let b: Vec<u32> = (0..7).map(|i| (i * 11 + 2) % 37).collect();
        let prompts = Tensor::new([&a[..5], &b[..5]].concat(), &Device::Cpu)
            .unwrap()
            .reshape((2, 5))
            .unwrap();
        let mut cache = KvCache::new();
        model.next_logits(&prompts, &mut cache).unwrap();
        let mut repeated = cache.repeat(2).unwrap();
        assert_eq!(repeated.len(), 5);
        // Rows: a, a, b, b; the copies of a sequence take different next tokens.
        let rows = [(&a, 5), (&a, 6), (&b, 5), (&b, 6)];
        let next: Vec<u32> = rows.iter().map(|(s, i)| s[*i]).collect();
        let next = Tensor::new(next, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let got = model.next_logits(&next, &mut repeated).unwrap();
        for (row, (s, i)) in rows.iter().enumerate() {
            let mut whole: Vec<u32> = s[..5].to_vec();
            whole.push(s[*i]);
            let expected = model.forward(&ids(&whole)).unwrap().squeeze(0).unwrap();
            let expected = expected.narrow(0, 5, 1).unwrap();
            let diff = max_diff(&got.narrow(0, row, 1).unwrap(), &expected);
            assert!(diff < 1e-5, "row {row}: {diff}");
        }
    }

    /// Sequences read to different lengths (one not at all) decode together, two tokens each:
    /// every row's logits are those of its sequence read whole.
    #[test]
    fn sequences_at_different_positions_decode_together_as_if_read_alone() {
        let model = model();
        let read = [2usize, 5, 0, 3];
        let seqs: Vec<Vec<u32>> = (0..read.len() as u32)
            .map(|s| (0..8).map(|i| (i * (3 + 2 * s) + s) % 37).collect())
            .collect();
        let mut caches: Vec<KvCache> = seqs
            .iter()
            .zip(read)
            .map(|(s, n)| {
                let mut cache = KvCache::new();
                if n > 0 {
                    model.next_logits(&ids(&s[..n]), &mut cache).unwrap();
                }
                cache
            })
            .collect();
        for step in 0..2 {
            let tokens: Vec<u32> = seqs.iter().zip(read).map(|(s, n)| s[n + step]).collect();
            let got = model.next_logits_each(&tokens, &mut caches).unwrap();
            for (r, (s, n)) in seqs.iter().zip(read).enumerate() {
                let at = n + step;
                assert_eq!(caches[r].len(), at + 1);
                let whole = model.forward(&ids(&s[..=at])).unwrap().squeeze(0).unwrap();
                let expected = whole.narrow(0, at, 1).unwrap();
                let diff = max_diff(&got.narrow(0, r, 1).unwrap(), &expected);
                assert!(diff < 1e-5, "row {r} at {at}: {diff}");
            }
        }
        // One token per cache, caches of one sequence, and room for the token.
        let err = model.next_logits_each(&[1], &mut caches).unwrap_err();
        assert!(err.to_string().contains("one token per cache"), "{err}");
        let mut two = KvCache::new();
        let pair = Tensor::new(&[[1u32, 2], [3, 4]], &Device::Cpu).unwrap();
        model.next_logits(&pair, &mut two).unwrap();
        let err = model.next_logits_each(&[1], &mut [two]).unwrap_err();
        assert!(err.to_string().contains("holds 2"), "{err}");
        let mut full = KvCache::new();
        model.next_logits(&ids(&seqs[0][..4]), &mut full).unwrap();
        model.next_logits(&ids(&[1; 8]), &mut full).unwrap();
        let err = model.next_logits_each(&[1], &mut [full]).unwrap_err();
        assert!(err.to_string().contains("12 positions"), "{err}");
    }

    #[test]
    fn decoding_with_kept_keys_gives_the_whole_forward_pass_logits() {
        let model = model();
        let tokens: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % 37).collect();
        let whole = model.forward(&ids(&tokens)).unwrap().squeeze(0).unwrap();
        // A prompt of 5 tokens, then one token at a time, then the last 3 at once.
        let mut cache = KvCache::new();
        let mut got = vec![model.next_logits(&ids(&tokens[..5]), &mut cache).unwrap()];
        for i in 5..9 {
            got.push(
                model
                    .next_logits(&ids(&tokens[i..i + 1]), &mut cache)
                    .unwrap(),
            );
        }
        got.push(model.next_logits(&ids(&tokens[9..]), &mut cache).unwrap());
        assert_eq!(cache.len(), 12);
        for (logits, position) in got.iter().zip([4, 5, 6, 7, 8, 11]) {
            let expected = whole.narrow(0, position, 1).unwrap();
            let diff = max_diff(logits, &expected);
            assert!(diff < 1e-5, "position {position}: {diff}");
        }
        // The cache is full: one more token has no position.
        let err = model.next_logits(&ids(&[1]), &mut cache).unwrap_err();
        assert!(err.to_string().contains("12 positions"), "{err}");
    }
}
