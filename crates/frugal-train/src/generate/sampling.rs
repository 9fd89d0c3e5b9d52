//! How the next token is drawn from a model's logits: greedy, or tempered and truncated
//! (top-k, nucleus) draws, after a penalty on tokens already in the text.

use anyhow::{bail, Result};
use rand::Rng;

/// How the next token is drawn from the model's logits.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Sampling {
    /// Temperature the logits are divided by; 0 takes the most likely token (greedy).
    #[cfg_attr(feature = "cli", arg(long, value_parser = crate::settings::non_negative, default_value_t = 0.8))]
    pub temperature: f64,
    /// Draw among the K most likely tokens only (0: all of them).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 50))]
    pub top_k: usize,
    /// Draw among the most likely tokens whose probabilities sum to at least P (nucleus
    /// sampling; 1: all of them).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.95))]
    pub top_p: f64,
    /// Penalty on tokens already in the prompt or the continuation: their logits are divided
    /// by it where positive and multiplied where negative (1: none; 1.1–1.3 curb loops).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub repetition_penalty: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.0,
        }
    }
}

impl Sampling {
    /// Greedy decoding: always the most likely token.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    };

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature {} must be a number ≥ 0 (0 takes the most likely token)",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(
                "--top-p {} must be in (0, 1] (1 keeps every token)",
                self.top_p
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "--repetition-penalty {} must be a number > 0 (1: no penalty)",
                self.repetition_penalty
            );
        }
        Ok(())
    }

    /// True when tokens already seen are penalized.
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
    }

    /// Applies the repetition penalty to the logits of the `seen` tokens (each once).
    pub fn penalize(&self, logits: &mut [f32], seen: &[u32]) {
        let p = self.repetition_penalty as f32;
        for &id in seen {
            if let Some(l) = logits.get_mut(id as usize) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }

    /// A token id drawn from `logits` (one per vocabulary entry) with `rng`. Greedy decoding
    /// draws nothing from `rng`; ties go to the lowest id.
    pub fn draw(&self, logits: &[f32], rng: &mut impl Rng) -> u32 {
        let better = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.temperature == 0.0 {
            let best = logits.iter().copied().enumerate().min_by(better);
            return best.map_or(0, |(i, _)| i as u32);
        }
        let mut ranked: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
        let k = match self.top_k {
            0 => ranked.len(),
            k => k.min(ranked.len()),
        };
        if k < ranked.len() {
            ranked.select_nth_unstable_by(k - 1, better);
            ranked.truncate(k);
        }
        ranked.sort_unstable_by(better);
        let top = ranked.first().map_or(0.0, |&(_, l)| l as f64);
        let weights: Vec<f64> = ranked
            .iter()
            .map(|&(_, l)| ((l as f64 - top) / self.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        // The nucleus: the fewest most likely tokens whose share reaches top_p.
        let mut kept = 0.0;
        let mut n = 0;
        while n < weights.len() && (n == 0 || kept < self.top_p * total) {
            kept += weights[n];
            n += 1;
        }
        let mut u = rng.random::<f64>() * kept;
        for (&(id, _), w) in ranked.iter().zip(&weights[..n]) {
            if u < *w {
                return id as u32;
            }
            u -= w;
        }
        ranked[n - 1].0 as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn greedy_and_a_single_candidate_take_the_most_likely_token() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
        assert_eq!(Sampling::GREEDY.draw(&logits, &mut rng()), 1);
        for sampling in [
            Sampling {
                top_k: 1,
                ..Sampling::default()
            },
            Sampling {
                top_p: 1e-6,
                temperature: 5.0,
                top_k: 0,
                repetition_penalty: 1.0,
            },
        ] {
            let mut r = rng();
            assert!((0..50).all(|_| sampling.draw(&logits, &mut r) == 1));
        }
    }

    /// Frequencies of 20 000 draws.
    fn frequencies(sampling: Sampling, logits: &[f32]) -> Vec<f64> {
        let mut counts = vec![0usize; logits.len()];
        let mut r = rng();
        for _ in 0..20_000 {
            counts[sampling.draw(logits, &mut r) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / 20_000.0).collect()
    }

    #[test]
    fn draws_follow_the_tempered_and_truncated_distribution() {
        // Probabilities 0.1, 0.2, 0.3, 0.4 at temperature 1.
        let p = [0.1f32, 0.2, 0.3, 0.4];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let all = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        };
        let close = |got: Vec<f64>, want: [f64; 4]| {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 0.015, "{got:?} against {want:?}");
            }
        };
        close(frequencies(all, &logits), [0.1, 0.2, 0.3, 0.4]);
        // Temperature 0.5 squares the probabilities: 1, 4, 9, 16 over 30.
        let half = Sampling {
            temperature: 0.5,
            ..all
        };
        close(
            frequencies(half, &logits),
            [1.0 / 30.0, 4.0 / 30.0, 9.0 / 30.0, 16.0 / 30.0],
        );
        // Top 2: 0.3 and 0.4 renormalised.
        let top2 = Sampling { top_k: 2, ..all };
        close(frequencies(top2, &logits), [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
        // Nucleus 0.65: 0.4 + 0.3 reach it, 0.4 alone does not.
        let nucleus = Sampling { top_p: 0.65, ..all };
        close(
            frequencies(nucleus, &logits),
            [0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0],
        );
        // The same seed draws the same tokens.
        assert_eq!(frequencies(all, &logits), frequencies(all, &logits));
    }

    #[test]
    fn the_repetition_penalty_shrinks_seen_logits_toward_less_likely() {
        let penalized = |p: f64, seen: &[u32]| {
            let sampling = Sampling {
                repetition_penalty: p,
                ..Sampling::GREEDY
            };
            let mut logits = vec![3.0f32, -2.0, 1.0, 0.0];
            sampling.penalize(&mut logits, seen);
            (logits, sampling.penalizes())
        };
        assert_eq!(
            penalized(2.0, &[0, 1, 9]),
            (vec![1.5, -4.0, 1.0, 0.0], true)
        );
        assert_eq!(penalized(1.0, &[0, 1]), (vec![3.0, -2.0, 1.0, 0.0], false));
        // Greedy then takes the best token not yet seen.
        let (logits, _) = penalized(4.0, &[0]);
        assert_eq!(Sampling::GREEDY.draw(&logits, &mut rng()), 2);
    }

    #[test]
    fn bad_sampling_settings_are_named() {
        for (sampling, named) in [
            (
                Sampling {
                    temperature: -1.0,
                    ..Sampling::default()
                },
                "--temperature",
            ),
            (
                Sampling {
                    top_p: 0.0,
                    ..Sampling::default()
                },
                "--top-p",
            ),
            (
                Sampling {
                    top_p: 1.5,
                    ..Sampling::default()
                },
                "--top-p",
            ),
            (
                Sampling {
                    repetition_penalty: 0.0,
                    ..Sampling::default()
                },
                "--repetition-penalty",
            ),
        ] {
            let err = sampling.validate().unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        assert!(Sampling::default().validate().is_ok());
    }
}
