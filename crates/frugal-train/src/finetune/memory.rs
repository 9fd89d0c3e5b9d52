//! Fine-tuning memory by method, without loading weights: the model's weights, what the
//! optimizer trains (adapters included), its exact state (and each data-parallel rank's share),
//! the trained weights' gradients, and with a batch shape each memory mode's planned step and
//! peak.

use super::run::{method, Method};
use crate::memory_report::ModePlan;
use anyhow::Result;
use frugal::labels::ParamShape;
use frugal::sharding::state_per_rank;
use frugal::StateBytes;
use frugal_nn::encoder::EncoderConfig;
use frugal_nn::{Attention, StepMode};
use serde::Serialize;

/// The memory of one fine-tuning method.
#[derive(Clone, Debug, Serialize)]
pub struct MethodMemory {
    pub method: String,
    /// Weights of the model (the encoder, the head and any adapters).
    pub parameters: usize,
    /// Weights the optimizer trains.
    pub trainable: usize,
    /// Of those, LoRA adapter weights.
    pub adapters: usize,
    pub state: StateBytes,
    pub state_bytes: usize,
    /// The state each of `world` data-parallel ranks holds, in rank order (none for one
    /// process).
    pub state_per_rank: Vec<usize>,
    /// Gradients of the trained weights (f32).
    pub gradient_bytes: usize,
    /// With a batch shape: the planned step and peak (weights, the largest rank's state, the
    /// step) of each memory mode.
    pub steps: Vec<ModePlan>,
}

/// The shape and backward pass of the fine-tuning steps to plan.
#[derive(Clone, Copy, Debug)]
pub struct StepShape {
    /// Inputs per micro-batch.
    pub batch: usize,
    /// Tokens per input (padded).
    pub seq: usize,
    /// The run's backward pass: the selected mode.
    pub mode: StepMode,
}

/// The memory modes of fine-tuning, by name: each technique alone, and both, with
/// `grad_accum` micro-batches and attention as `attention` asks.
pub fn modes(grad_accum: usize, attention: Attention) -> Vec<(&'static str, StepMode)> {
    let mode = |checkpointing, per_layer_updates| StepMode {
        checkpointing,
        per_layer_updates,
        grad_accum,
        attention,
        ..StepMode::default()
    };
    vec![
        ("normal", mode(false, false)),
        ("checkpointing", mode(true, false)),
        ("per-layer updates", mode(false, true)),
        ("low", mode(true, true)),
    ]
}

/// Plans each method's memory for a classifier of `labels` classes on an encoder of `config`,
/// trained by `world` data-parallel ranks, and with `step` each memory mode's step.
pub fn plan(
    config: &EncoderConfig,
    labels: usize,
    methods: &[String],
    world: usize,
    step: Option<StepShape>,
) -> Result<Vec<MethodMemory>> {
    methods
        .iter()
        .map(|m| {
            let trained = method(m, config.hidden_size, 0, None, &[])?;
            method_memory(config, labels, m, &trained, world, step)
        })
        .collect()
}

/// The memory of fine-tuning as `trained` sets out (its optimizer and any adapters), named
/// `name`; the rest as in [`plan`].
pub fn method_memory(
    config: &EncoderConfig,
    labels: usize,
    name: &str,
    trained: &Method,
    world: usize,
    step: Option<StepShape>,
) -> Result<MethodMemory> {
    let prefix = format!("{}.", config.model_type);
    let shape = |name: String, shape: Vec<usize>| ParamShape {
        label: frugal_nn::labels::bert(&name),
        name,
        shape,
    };
    let head = [
        shape("classifier.weight".into(), vec![labels, config.hidden_size]),
        shape("classifier.bias".into(), vec![labels]),
    ];
    let encoder: Vec<ParamShape> = config
        .parameter_shapes()
        .into_iter()
        .map(|(n, s)| shape(format!("{prefix}{n}"), s))
        .collect();
    let count = |s: &[ParamShape]| {
        s.iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum::<usize>()
    };
    let Method { optimizer, lora } = trained;
    let adapters: Vec<ParamShape> = lora
        .map(|l| {
            l.adapter_shapes(config.parameter_shapes())
                .into_iter()
                .map(|(n, s)| shape(format!("{prefix}{n}"), s))
                .collect()
        })
        .unwrap_or_default();
    let trained: Vec<ParamShape> = if lora.is_some() {
        adapters.iter().chain(&head).cloned().collect()
    } else {
        encoder.iter().chain(&head).cloned().collect()
    };
    let state = frugal::memory::plan(optimizer, &trained)?.iter().fold(
        StateBytes::default(),
        |mut acc, (_, b)| {
            acc += *b;
            acc
        },
    );
    let trainable = count(&trained);
    let shares: Vec<usize> = match world {
        1 => Vec::new(),
        _ => state_per_rank(optimizer, &trained, world)?
            .iter()
            .map(StateBytes::total)
            .collect(),
    };
    let parameters = count(&encoder) + count(&head) + count(&adapters);
    let fixed = 4 * parameters + shares.iter().copied().max().unwrap_or(state.total());
    let steps = step
        .map(|shape| mode_plans(config, labels, lora.as_ref(), shape, fixed))
        .unwrap_or_default();
    Ok(MethodMemory {
        method: name.to_string(),
        parameters,
        trainable,
        adapters: count(&adapters),
        state,
        state_bytes: state.total(),
        state_per_rank: shares,
        gradient_bytes: 4 * trainable,
        steps,
    })
}

/// Every memory mode's step of `shape` (its own mode too, where it is not one of them), with
/// `fixed` bytes of weights and state beside it.
fn mode_plans(
    config: &EncoderConfig,
    labels: usize,
    lora: Option<&frugal_nn::encoder::LoraConfig>,
    shape: StepShape,
    fixed: usize,
) -> Vec<ModePlan> {
    let all = modes(shape.mode.grad_accum, shape.mode.attention);
    ModePlan::of_modes(all, shape.mode, fixed, |mode| {
        config.step_memory(shape.batch, shape.seq, labels, lora, mode)
    })
}

/// The plans as a table (MiB), with each rank's state where there are several; with steps, a
/// second table of each method's peak by memory mode (* marks the selected mode).
pub fn table(plans: &[MethodMemory]) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let width = plans
        .iter()
        .map(|p| p.method.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let ranks = plans.iter().any(|p| !p.state_per_rank.is_empty());
    let mut out = format!(
        "{:<width$} {:>12} {:>12} {:>10} {:>10} {:>10}{}\n",
        "method",
        "parameters",
        "trainable",
        "adapters",
        "state",
        "gradients",
        if ranks { "  state per rank" } else { "" }
    );
    for p in plans {
        let shares: Vec<String> = p
            .state_per_rank
            .iter()
            .map(|&b| format!("{:.2}", mib(b)))
            .collect();
        out += &format!(
            "{:<width$} {:>12} {:>12} {:>10} {:>10.2} {:>10.2}{}\n",
            p.method,
            p.parameters,
            p.trainable,
            p.adapters,
            mib(p.state_bytes),
            mib(p.gradient_bytes),
            match ranks {
                true => format!("  {}", shares.join(" + ")),
                false => String::new(),
            }
        );
    }
    let Some(first) = plans.first().filter(|p| !p.steps.is_empty()) else {
        return out;
    };
    out += &format!("\n{:<width$}", "peak");
    for m in &first.steps {
        out += &format!(" {:>19}", m.mode);
    }
    out += "\n";
    for p in plans {
        out += &format!("{:<width$}", p.method);
        for m in &p.steps {
            let mark = if m.selected { "*" } else { " " };
            out += &format!(" {:>18.1}{mark}", mib(m.peak_bytes));
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// all-MiniLM-L6-v2's shapes.
    fn minilm() -> EncoderConfig {
        serde_json::from_str(
            r#"{"hidden_size": 384, "intermediate_size": 1536, "max_position_embeddings": 512,
                "num_attention_heads": 12, "num_hidden_layers": 6, "vocab_size": 30522}"#,
        )
        .unwrap()
    }

    #[test]
    fn minilm_methods_by_hand() {
        let c = minilm();
        let methods: Vec<String> = [
            "adamw",
            "lora",
            "frugal-ft",
            "frugal-ft:rank=0",
            "frugal-ft:embeddings=state-free",
        ]
        .map(String::from)
        .into();
        let p = plan(&c, 2, &methods, 1, None).unwrap();
        let encoder = 22_565_376;
        let head = 2 * 384 + 2;
        // AdamW: two moments of every weight.
        assert_eq!(p[0].trainable, encoder + head);
        assert_eq!(p[0].state_bytes, 8 * (encoder + head));
        // LoRA rank 8 on query and value of 6 layers: A 8×384 and B 384×8 each.
        let adapters = 6 * 2 * 2 * 8 * 384;
        assert_eq!((p[1].adapters, p[1].trainable), (adapters, adapters + head));
        assert_eq!(p[1].state_bytes, 8 * (adapters + head));
        assert_eq!(p[1].parameters, encoder + head + adapters);
        // FRUGAL: 8 of 384 columns of query and value (moments and column indices), nothing for
        // the other linears, full state for embeddings, norms, biases and the head.
        let linears = 6 * (4 * 384 * 384 + 2 * 384 * 1536);
        let full = encoder + head - linears;
        let columns = 6 * 2 * 8 * 384;
        assert_eq!(p[2].state_bytes, 8 * (full + columns) + 4 * 6 * 2 * 8);
        assert_eq!(p[3].state_bytes, 8 * full);
        // State-free embedding tables leave the norms, biases and head.
        let embeddings = (30522 + 512 + 2) * 384;
        assert_eq!(
            p[4].state_bytes,
            8 * (full - embeddings + columns) + 4 * 6 * 2 * 8
        );
    }

    #[test]
    fn ranks_share_each_methods_state_and_the_table_lists_their_shares() {
        let c = minilm();
        let methods: Vec<String> = ["adamw", "frugal-ft"].map(String::from).into();
        let one = plan(&c, 5, &methods, 1, None).unwrap();
        let two = plan(&c, 5, &methods, 2, None).unwrap();
        let words = 8 * 30522 * 384;
        for (a, b) in one.iter().zip(&two) {
            assert!(a.state_per_rank.is_empty());
            assert_eq!(b.state_per_rank.len(), 2);
            assert_eq!(b.state_per_rank.iter().sum::<usize>(), a.state_bytes);
            // No rank holds more than an even share plus the largest tensor's state.
            let most = *b.state_per_rank.iter().max().unwrap();
            assert!(most <= a.state_bytes / 2 + words, "{}", a.method);
        }
        // FRUGAL's state is mostly the word embeddings' moments: the ranks hold a piece each,
        // within one piece unit of an even share.
        let unit = 8 * frugal::sharding::PIECE;
        let (frugal, shares) = (&one[1], &two[1].state_per_rank);
        assert!(
            shares
                .iter()
                .all(|&s| s.abs_diff(frugal.state_bytes / 2) <= unit),
            "{shares:?}"
        );
        let table = table(&two);
        assert!(
            table.lines().next().unwrap().ends_with("state per rank"),
            "{table}"
        );
        let adamw = table.lines().nth(1).unwrap();
        assert_eq!(adamw.matches(" + ").count(), 1, "{table}");
        assert!(!super::table(&one).contains("per rank"));
    }

    #[test]
    fn each_methods_peak_is_weights_state_and_the_planned_step_in_every_mode() {
        let c = minilm();
        let methods: Vec<String> = ["adamw", "lora", "frugal-ft"].map(String::from).into();
        let selected = StepMode {
            checkpointing: true,
            grad_accum: 1,
            ..StepMode::default()
        };
        let shape = StepShape {
            batch: 32,
            seq: 128,
            mode: selected,
        };
        let p = plan(&c, 2, &methods, 1, Some(shape)).unwrap();
        for m in &p {
            let names: Vec<&str> = m.steps.iter().map(|s| s.mode.as_str()).collect();
            assert_eq!(
                names,
                ["normal", "checkpointing", "per-layer updates", "low"]
            );
            let lora = (m.method == "lora").then(|| method("lora", 384, 0, None, &[]).unwrap());
            let lora = lora.and_then(|l| l.lora);
            for s in &m.steps {
                let step = c.step_memory(32, 128, 2, lora.as_ref(), s.settings);
                assert_eq!(s.step, step);
                assert_eq!(s.peak_bytes, 4 * m.parameters + m.state_bytes + step.peak);
                assert_eq!(s.selected, s.mode == "checkpointing");
            }
            // Recomputing layers saves most of the activations' memory.
            assert!(
                m.steps[1].peak_bytes < m.steps[0].peak_bytes / 2,
                "{}",
                m.method
            );
        }
        // Every full fine-tuning method holds the same activations; LoRA's adapters keep more,
        // but its gradients and state are small.
        assert_eq!(
            p[0].steps[0].step.activations,
            p[2].steps[0].step.activations
        );
        assert!(p[1].steps[0].step.activations > p[0].steps[0].step.activations);
        assert!(p[1].steps[0].step.gradients < p[0].steps[0].step.gradients / 50);
        let table = table(&p);
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("peak"))
            .collect();
        assert_eq!(rows.len(), 4, "{table}");
        assert!(
            rows[1..].iter().all(|r| r.matches('*').count() == 1),
            "{table}"
        );
        // Without a batch shape there is no peak table.
        assert!(!super::table(&plan(&c, 2, &methods, 1, None).unwrap()).contains("peak"));
    }
}
