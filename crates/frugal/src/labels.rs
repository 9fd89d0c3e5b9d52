//! Parameter labels: how the optimizer treats each tensor.
//!
//! The caller, who knows the model, hands the optimizer its parameters in model order, each with
//! a [`Label`]: its [`Role`] (projectable, always state-full, or always state-free), the block it belongs to (for the
//! blockwise projection) and whether weight decay applies. Without labels, [`Label::default_for`]
//! makes 2-D (and larger) weights projectable and everything else state-full. Regular expressions
//! on names ([`Patterns`]) are a convenience that overrides the roles.

use crate::config::OptimizerConfig;
use crate::error::{Error, Result};
use candle_core::Var;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// How the optimizer treats one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The gradient is split into a subspace (state-full rule) and a residual (state-free rule).
    Projectable,
    /// The state-full rule on the whole tensor (embeddings, norms, heads, biases).
    StateFull,
    /// The state-free rule on the whole gradient and no state: density 0 for this tensor alone
    /// (the other linears of the fine-tuning recipe).
    StateFree,
}

/// The caller's description of one parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// Projectable or always state-full.
    pub role: Role,
    /// The layer (or any group) the tensor belongs to: with `block_unit = layer` the projectable
    /// tensors of one group form one block; `None` makes the tensor a block of its own.
    pub block: Option<usize>,
    /// Whether weight decay applies (used with `decay_mask = labels`; `all` decays every tensor).
    pub weight_decay: bool,
}

impl Label {
    /// A projectable tensor of group `block`, with weight decay.
    pub fn projectable(block: Option<usize>) -> Self {
        Label {
            role: Role::Projectable,
            block,
            weight_decay: true,
        }
    }

    /// An always-state-full tensor of group `block`, with weight decay.
    pub fn state_full(block: Option<usize>) -> Self {
        Label {
            role: Role::StateFull,
            block,
            weight_decay: true,
        }
    }

    /// The same label with weight decay on or off.
    pub fn with_weight_decay(self, on: bool) -> Self {
        Label {
            weight_decay: on,
            ..self
        }
    }

    /// The label of a parameter nothing is known about but its name and shape: weights of two or
    /// more dimensions are projectable, the rest (biases, norms) state-full without weight decay;
    /// the group is the layer number in the name (`layers.N.`, `layer.N.`, `h.N.`, `blocks.N.`).
    pub fn default_for(name: &str, shape: &[usize]) -> Self {
        let block = layer_in_name(name);
        if shape.len() >= 2 {
            Label::projectable(block)
        } else {
            Label::state_full(block).with_weight_decay(false)
        }
    }
}

/// The layer number of a conventional parameter name (`layers.N.`, `layer.N.`, `h.N.`, `blocks.N.`).
pub fn layer_in_name(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        matches!(w[0], "layers" | "layer" | "h" | "blocks")
            .then(|| w[1].parse().ok())
            .flatten()
    })
}

/// A labelled parameter, as handed to [`crate::Frugal::from_params`].
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub label: Label,
}

impl Param {
    /// A parameter with an explicit label.
    pub fn new(name: impl Into<String>, var: Var, label: Label) -> Self {
        Param {
            name: name.into(),
            var,
            label,
        }
    }

    /// A parameter labelled by [`Label::default_for`].
    pub fn with_default_label(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let label = Label::default_for(&name, var.dims());
        Param { name, var, label }
    }
}

/// A parameter known by shape only, for planning memory without allocating it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamShape {
    pub name: String,
    pub shape: Vec<usize>,
    pub label: Label,
}

/// One parameter as the optimizer treats it, after patterns and projection constraints apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: Role,
    pub block: Option<usize>,
    pub weight_decay: bool,
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

/// Number of parameters (elements) by role, for reports.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RoleCounts {
    pub state_full: usize,
    pub projectable: usize,
    #[serde(default)]
    pub state_free: usize,
}

impl RoleCounts {
    /// Counts the elements of `infos` by role.
    pub fn of(infos: &[ParamInfo]) -> Self {
        let mut c = RoleCounts::default();
        for p in infos {
            match p.role {
                Role::StateFull => c.state_full += p.numel(),
                Role::Projectable => c.projectable += p.numel(),
                Role::StateFree => c.state_free += p.numel(),
            }
        }
        c
    }
}

/// Roles by regular expressions on names: a name matching `state_full` is state-full, else one
/// matching `state_free` is state-free, else one matching `projectable` is projectable, else
/// state-full.
#[derive(Clone, Debug)]
pub struct Patterns {
    state_full: Option<Regex>,
    state_free: Option<Regex>,
    projectable: Option<Regex>,
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

impl Patterns {
    /// Compiles the two patterns; an empty pattern matches nothing.
    pub fn new(state_full: &str, projectable: &str) -> Result<Self> {
        Self::with_state_free(state_full, "", projectable)
    }

    /// Compiles the three patterns; an empty pattern matches nothing.
    pub fn with_state_free(state_full: &str, state_free: &str, projectable: &str) -> Result<Self> {
        Ok(Patterns {
            state_full: compile("state-full", state_full)?,
            state_free: compile("state-free", state_free)?,
            projectable: compile("projectable", projectable)?,
        })
    }

    /// The patterns of a configuration (`state_full_modules`, `state_free_modules`,
    /// `projectable_modules`); `None` when all are empty, so the caller's labels decide.
    pub fn of(config: &OptimizerConfig) -> Result<Option<Self>> {
        let c = config;
        if c.state_full_modules.is_empty()
            && c.state_free_modules.is_empty()
            && c.projectable_modules.is_empty()
        {
            return Ok(None);
        }
        Self::with_state_free(
            &c.state_full_modules,
            &c.state_free_modules,
            &c.projectable_modules,
        )
        .map(Some)
    }

    /// The role of a parameter called `name`.
    pub fn role(&self, name: &str) -> Role {
        let matches = |re: &Option<Regex>| re.as_ref().is_some_and(|r| r.is_match(name));
        if matches(&self.state_full) {
            Role::StateFull
        } else if matches(&self.state_free) {
            Role::StateFree
        } else if self.projectable.as_ref().is_some_and(|r| r.is_match(name)) {
            Role::Projectable
        } else {
            Role::StateFull
        }
    }

    /// Fails when a pattern matches none of `names`, so a typo cannot silently turn FRUGAL into
    /// AdamW.
    pub fn check_matches<'a>(&self, names: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
        let example = names.clone().next().unwrap_or_default().to_string();
        for (which, re) in [
            ("state-full", &self.state_full),
            ("state-free", &self.state_free),
            ("projectable", &self.projectable),
        ] {
            if let Some(re) = re {
                if !example.is_empty() && !names.clone().any(|n| re.is_match(n)) {
                    return Err(Error::PatternMatchesNothing {
                        which,
                        pattern: re.as_str().to_string(),
                        example,
                    });
                }
            }
        }
        Ok(())
    }
}

/// How the optimizer treats each parameter, in the caller's order: the labels, with roles
/// overridden by the configuration's patterns (if any), and 1-D tensors kept state-full under
/// matrix projections (svd, random, randperm), which need matrices.
pub fn resolve<'a>(
    params: impl Iterator<Item = (&'a str, &'a [usize], Label)> + Clone,
    config: &OptimizerConfig,
) -> Result<Vec<ParamInfo>> {
    let patterns = Patterns::of(config)?;
    if let Some(p) = &patterns {
        p.check_matches(params.clone().map(|(n, _, _)| n))?;
    }
    let matrix_only = config.projection.is_matrix();
    Ok(params
        .map(|(name, shape, label)| {
            let mut role = patterns.as_ref().map_or(label.role, |p| p.role(name));
            if matrix_only && shape.len() < 2 {
                role = Role::StateFull;
            }
            ParamInfo {
                name: name.to_string(),
                shape: shape.to_vec(),
                role,
                block: label.block,
                weight_decay: label.weight_decay,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(names: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>, Label)> {
        names
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec(), Label::default_for(n, s)))
            .collect()
    }

    fn infos(specs: &[(String, Vec<usize>, Label)], c: &OptimizerConfig) -> Result<Vec<ParamInfo>> {
        resolve(
            specs.iter().map(|(n, s, l)| (n.as_str(), s.as_slice(), *l)),
            c,
        )
    }

    #[test]
    fn default_labels_make_matrices_projectable_and_keep_order() {
        let s = specs(&[
            ("mlp.fc2.weight", &[4, 8]),
            ("mlp.fc1.bias", &[8]),
            ("mlp.fc1.weight", &[8, 4]),
            ("encoder.layer.3.dense.weight", &[4, 4]),
        ]);
        let c = OptimizerConfig::preset("frugal").unwrap();
        let out = infos(&s, &c).unwrap();
        let names: Vec<&str> = out.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "mlp.fc2.weight",
                "mlp.fc1.bias",
                "mlp.fc1.weight",
                "encoder.layer.3.dense.weight"
            ]
        );
        let roles: Vec<Role> = out.iter().map(|p| p.role).collect();
        assert_eq!(
            roles,
            [
                Role::Projectable,
                Role::StateFull,
                Role::Projectable,
                Role::Projectable
            ]
        );
        assert_eq!(out[3].block, Some(3));
        assert!(!out[1].weight_decay && out[0].weight_decay);
        let counts = RoleCounts::of(&out);
        assert_eq!((counts.projectable, counts.state_full), (32 + 32 + 16, 8));
    }

    #[test]
    fn patterns_override_roles_and_must_match() {
        let s = specs(&[
            ("model.embed_tokens.weight", &[8, 4]),
            ("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
            ("model.layers.0.input_layernorm.weight", &[4]),
            ("classifier.weight", &[2, 4]),
        ]);
        let mut c = OptimizerConfig::preset("frugal").unwrap();
        c.state_full_modules = "(embed|norm)".into();
        c.projectable_modules = "q_proj".into();
        let out = infos(&s, &c).unwrap();
        let role = |n: &str| out.iter().find(|p| p.name.contains(n)).unwrap().role;
        assert_eq!(role("embed"), Role::StateFull);
        assert_eq!(role("q_proj"), Role::Projectable);
        assert_eq!(role("layernorm"), Role::StateFull);
        assert_eq!(role("classifier"), Role::StateFull);
        assert_eq!(out[1].block, Some(0));

        c.projectable_modules = "qproj".into();
        assert!(matches!(
            infos(&s, &c),
            Err(Error::PatternMatchesNothing { .. })
        ));
        c.projectable_modules = "(".into();
        assert!(matches!(infos(&s, &c), Err(Error::BadPattern { .. })));
    }

    #[test]
    fn matrix_projections_keep_vectors_state_full() {
        let s = vec![("scale".to_string(), vec![6], Label::projectable(None))];
        let blocks = OptimizerConfig::preset("frugal").unwrap();
        assert_eq!(infos(&s, &blocks).unwrap()[0].role, Role::Projectable);
        let svd = OptimizerConfig::preset("frugal-svd").unwrap();
        assert_eq!(infos(&s, &svd).unwrap()[0].role, Role::StateFull);
    }
}
