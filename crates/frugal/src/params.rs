//! Parameter classification: which tensors keep full state and which are projected, in model order.

use crate::config::{OptimizerConfig, ProjectionKind};
use crate::error::{Error, Result};
use regex::Regex;
use serde::Serialize;

/// How the optimizer treats one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ParamClass {
    /// Matches the always-state-full pattern: the state-full rule on the whole tensor.
    StateFull,
    /// Matches the projectable pattern: gradient split into subspace and residual.
    Projectable,
    /// Matches neither pattern: treated as state-full.
    Other,
}

/// One classified parameter.
#[derive(Clone, Debug, Serialize)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub class: ParamClass,
    /// Layer index parsed from `layers.N.` (or `layer.N.` / `h.N.` / `blocks.N.`), if any.
    pub layer: Option<usize>,
}

impl ParamInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor seen as an m×n matrix (rows = first dim, columns = the rest; 1-D is 1×n).
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [m, rest @ ..] => (*m, rest.iter().product()),
        }
    }
}

/// Counts of parameters by class, for reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ClassCounts {
    pub state_full: usize,
    pub projectable: usize,
    pub other: usize,
}

const MODULE_ORDER: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "h" | "blocks")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// Sort key of the model's parameter order: layer by layer, then q, k, v, o, gate, up, down;
/// parameters outside layers keep their name order before (embeddings) or after (head) them.
fn order_key(name: &str) -> (usize, usize, usize, String) {
    let group = if name.contains("embed") {
        0
    } else if layer_of(name).is_some() {
        1
    } else {
        2
    };
    let layer = layer_of(name).unwrap_or(0);
    let module = MODULE_ORDER
        .iter()
        .position(|m| name.contains(m))
        .unwrap_or(MODULE_ORDER.len());
    (group, layer, module, name.to_string())
}

fn compile(which: &'static str, pattern: &str) -> Result<Option<Regex>> {
    if pattern.is_empty() {
        return Ok(None);
    }
    Regex::new(pattern)
        .map(Some)
        .map_err(|e| Error::BadPattern {
            which,
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })
}

/// Classifies `(name, shape)` pairs and returns them sorted in model order. With a matrix
/// projection (svd, random, randperm) only tensors of two or more dimensions are projectable.
///
/// Fails when a non-empty pattern matches no parameter, so a typo cannot silently turn
/// FRUGAL into AdamW.
pub fn classify(
    params: &[(String, Vec<usize>)],
    config: &OptimizerConfig,
) -> Result<Vec<ParamInfo>> {
    let full = compile("state-full", &config.state_full_modules)?;
    let proj = compile("projectable", &config.projectable_modules)?;
    let example = params.first().map(|p| p.0.clone()).unwrap_or_default();
    for (which, re) in [("state-full", &full), ("projectable", &proj)] {
        if let Some(re) = re {
            if !params.is_empty() && !params.iter().any(|(n, _)| re.is_match(n)) {
                return Err(Error::PatternMatchesNothing {
                    which,
                    pattern: re.as_str().to_string(),
                    example,
                });
            }
        }
    }
    let mut infos: Vec<ParamInfo> = params
        .iter()
        .map(|(name, shape)| {
            let class = if full.as_ref().is_some_and(|r| r.is_match(name)) {
                ParamClass::StateFull
            } else if proj.as_ref().is_some_and(|r| r.is_match(name)) {
                ParamClass::Projectable
            } else {
                ParamClass::Other
            };
            ParamInfo {
                name: name.clone(),
                shape: shape.clone(),
                class,
                layer: layer_of(name),
            }
        })
        .collect();
    // Matrix projections need matrices: 1-D projectable tensors keep full state.
    let matrix_only = matches!(
        config.projection,
        ProjectionKind::Svd | ProjectionKind::Random | ProjectionKind::RandPerm
    );
    for info in infos.iter_mut() {
        if matrix_only && info.class == ParamClass::Projectable && info.shape.len() < 2 {
            info.class = ParamClass::Other;
        }
    }
    infos.sort_by_key(|p| order_key(&p.name));
    Ok(infos)
}

/// Number of parameters (elements) in each class.
pub fn class_counts(infos: &[ParamInfo]) -> ClassCounts {
    let mut c = ClassCounts::default();
    for p in infos {
        let n = p.numel();
        match p.class {
            ParamClass::StateFull => c.state_full += n,
            ParamClass::Projectable => c.projectable += n,
            ParamClass::Other => c.other += n,
        }
    }
    c
}

/// Names and shapes of a Hugging Face LLaMA model's parameters (untied head), for planning memory
/// without building the model.
pub fn llama_shapes(
    vocab: usize,
    hidden: usize,
    intermediate: usize,
    layers: usize,
) -> Vec<(String, Vec<usize>)> {
    let mut p = vec![("model.embed_tokens.weight".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            p.push((
                format!("model.layers.{l}.self_attn.{m}.weight"),
                vec![hidden, hidden],
            ));
        }
        p.push((
            format!("model.layers.{l}.mlp.gate_proj.weight"),
            vec![intermediate, hidden],
        ));
        p.push((
            format!("model.layers.{l}.mlp.up_proj.weight"),
            vec![intermediate, hidden],
        ));
        p.push((
            format!("model.layers.{l}.mlp.down_proj.weight"),
            vec![hidden, intermediate],
        ));
        p.push((
            format!("model.layers.{l}.input_layernorm.weight"),
            vec![hidden],
        ));
        p.push((
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            vec![hidden],
        ));
    }
    p.push(("model.norm.weight".to_string(), vec![hidden]));
    p.push(("lm_head.weight".to_string(), vec![vocab, hidden]));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> Vec<(String, Vec<usize>)> {
        names.iter().map(|n| (n.to_string(), vec![4, 4])).collect()
    }

    #[test]
    fn model_order_is_layer_then_module() {
        let params = named(&[
            "lm_head.weight",
            "model.layers.10.self_attn.q_proj.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.2.self_attn.k_proj.weight",
            "model.embed_tokens.weight",
            "model.layers.2.mlp.gate_proj.weight",
            "model.norm.weight",
        ]);
        let c = OptimizerConfig::preset("frugal").unwrap();
        let names: Vec<String> = classify(&params, &c)
            .unwrap()
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.self_attn.k_proj.weight",
                "model.layers.2.mlp.gate_proj.weight",
                "model.layers.2.mlp.down_proj.weight",
                "model.layers.10.self_attn.q_proj.weight",
                "lm_head.weight",
                "model.norm.weight",
            ]
        );
    }

    #[test]
    fn classes_and_unmatched_patterns() {
        let params = named(&[
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "classifier.weight",
        ]);
        let c = OptimizerConfig::preset("frugal").unwrap();
        let infos = classify(&params, &c).unwrap();
        let class = |n: &str| infos.iter().find(|p| p.name.contains(n)).unwrap().class;
        assert_eq!(class("embed"), ParamClass::StateFull);
        assert_eq!(class("q_proj"), ParamClass::Projectable);
        assert_eq!(class("layernorm"), ParamClass::StateFull);
        assert_eq!(class("classifier"), ParamClass::Other);
        assert_eq!(infos[1].layer, Some(0));

        let mut bad = c.clone();
        bad.projectable_modules = "qproj".into();
        assert!(matches!(
            classify(&params, &bad),
            Err(Error::PatternMatchesNothing { .. })
        ));
        bad.projectable_modules = "(".into();
        assert!(matches!(
            classify(&params, &bad),
            Err(Error::BadPattern { .. })
        ));
    }
}
