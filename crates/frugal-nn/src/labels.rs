//! Labels of well-known parameter names: which tensors FRUGAL may project, which keep full
//! state, their layer (the block of BAdam-style layer blocks) and whether weight decay applies
//! under `decay_mask = labels` (not on embeddings, norms and biases).

use frugal::labels::layer_in_name;
use frugal::Label;

/// The linears of a LLaMA layer, as Hugging Face (and PEFT's `target_modules`) name them.
pub(crate) const LLAMA_LINEARS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

const BERT_LINEARS: &[&str] = &[
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

fn is_norm_or_bias(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.contains("norm") || lower.ends_with(".bias") || lower.ends_with(".beta")
}

/// A layer's linear weight is projectable; everything else keeps full state.
fn label(name: &str, linears: &[&str]) -> Label {
    let layer = layer_in_name(name);
    let linear = layer.is_some()
        && linears
            .iter()
            .any(|m| name.strip_suffix(".weight").is_some_and(|n| n.ends_with(m)));
    if linear {
        Label::projectable(layer)
    } else {
        let decay = !(is_norm_or_bias(name) || name.contains("embed"));
        Label::state_full(layer).with_weight_decay(decay)
    }
}

/// Label of a Hugging Face LLaMA parameter (`model.layers.N.self_attn.q_proj.weight`, …): the
/// attention and MLP linears are projectable; embeddings, norms and the LM head are state-full.
pub fn llama(name: &str) -> Label {
    label(name, LLAMA_LINEARS)
}

/// Label of a Hugging Face BERT or RoBERTa parameter (`encoder.layer.N.attention.self.query.weight`,
/// `roberta.encoder.layer.N.intermediate.dense.weight`, …): the attention and feed-forward linear
/// weights are projectable; embeddings, LayerNorms, biases, the pooler and classifier heads are
/// state-full.
pub fn bert(name: &str) -> Label {
    label(name, BERT_LINEARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use frugal::Role;

    fn role(l: Label) -> Role {
        l.role
    }

    #[test]
    fn llama_names() {
        let q = llama("model.layers.3.self_attn.q_proj.weight");
        assert_eq!(
            (q.role, q.block, q.weight_decay),
            (Role::Projectable, Some(3), true)
        );
        assert_eq!(
            role(llama("model.layers.0.mlp.down_proj.weight")),
            Role::Projectable
        );
        let norm = llama("model.layers.0.input_layernorm.weight");
        assert_eq!(
            (norm.role, norm.block, norm.weight_decay),
            (Role::StateFull, Some(0), false)
        );
        assert_eq!(role(llama("model.embed_tokens.weight")), Role::StateFull);
        assert!(!llama("model.embed_tokens.weight").weight_decay);
        let head = llama("lm_head.weight");
        assert_eq!(
            (head.role, head.block, head.weight_decay),
            (Role::StateFull, None, true)
        );
    }

    #[test]
    fn bert_and_roberta_names() {
        for prefix in ["", "bert.", "roberta."] {
            for m in BERT_LINEARS {
                let l = bert(&format!("{prefix}encoder.layer.5.{m}.weight"));
                assert_eq!(
                    (l.role, l.block),
                    (Role::Projectable, Some(5)),
                    "{prefix}{m}"
                );
                let b = bert(&format!("{prefix}encoder.layer.5.{m}.bias"));
                assert_eq!((b.role, b.weight_decay), (Role::StateFull, false));
            }
            for n in [
                "embeddings.word_embeddings.weight",
                "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight",
                "embeddings.LayerNorm.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight",
                "encoder.layer.0.output.LayerNorm.bias",
            ] {
                let l = bert(&format!("{prefix}{n}"));
                assert_eq!((l.role, l.weight_decay), (Role::StateFull, false), "{n}");
            }
        }
        assert_eq!(role(bert("pooler.dense.weight")), Role::StateFull);
        assert_eq!(role(bert("classifier.out_proj.weight")), Role::StateFull);
        assert!(bert("classifier.weight").weight_decay);
    }
}
