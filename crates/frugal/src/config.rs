//! Optimizer configuration: every option of FRUGAL, the paper's presets, and `key=value` overrides.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Declares a plain enum with lower-case names, parsing, display and serde in one place.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// All accepted names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name used on the command line and in files.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                match s.to_ascii_lowercase().replace('_', "-").as_str() {
                    $($text => Ok($name::$variant),)+
                    _ => Err(Error::UnknownName {
                        kind: $kind,
                        name: s.to_string(),
                        expected: Self::NAMES.join(", "),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum!(
    /// How the gradient of a projectable weight is split.
    ProjectionKind, "projection", {
        /// Top singular subspace of the current gradient (GaLore).
        Svd => "svd",
        /// Random semi-orthogonal matrix (QR of a Gaussian).
        Random => "random",
        /// Random rows or columns: a slice of a permutation matrix.
        RandPerm => "randperm",
        /// Coordinate subsets: columns, rows or random entries (see [`CoordinateAxis`]).
        Coordinates => "coordinates",
        /// Whole tensors (or layers) as blocks, a share of them state-full at a time (BAdam-style).
        Blocks => "blocks",
    }
);

named_enum!(
    /// Which side of an m×n matrix a matrix projection acts on.
    ProjSide, "projection side", {
        /// Right if m ≥ n, else left (GaLore's default): the smaller dimension is reduced.
        Std => "std",
        /// The opposite of `std`.
        ReverseStd => "reverse-std",
        /// Always left: down(G) = Aᵀ·G.
        Left => "left",
        /// Always right: down(G) = G·Bᵀ.
        Right => "right",
        /// Both sides: down(G) = Aᵀ·G·Bᵀ.
        Full => "full",
    }
);

named_enum!(
    /// Which coordinates a coordinate projection keeps.
    CoordinateAxis, "coordinate axis", {
        /// int(n·ρ) whole columns.
        Columns => "columns",
        /// int(m·ρ) whole rows.
        Rows => "rows",
        /// int(m·n·ρ) random individual entries.
        RandK => "randk",
    }
);

named_enum!(
    /// The order in which blocks become active.
    BlockOrder, "block order", {
        /// A fresh random set each time.
        Random => "random",
        /// From the first block onwards, wrapping around.
        Ascending => "ascending",
        /// From the last block backwards, wrapping around (the paper's default).
        Descending => "descending",
        /// Half from each end, moving towards the middle.
        Mirror => "mirror",
    }
);

named_enum!(
    /// What one block is.
    BlockUnit, "block unit", {
        /// Each projectable tensor is its own block.
        Tensor => "tensor",
        /// All projectable tensors of one layer (`layers.N.`) form a block (BAdam).
        Layer => "layer",
    }
);

named_enum!(
    /// The optimizer that keeps state, used inside the subspace and for always-state-full parameters.
    StateFullRule, "state-full rule", {
        /// Adam with bias correction and decoupled weight decay.
        AdamW => "adamw",
        /// SGD with momentum, EMA form m = βm + (1−β)g (the form used in FRUGAL's analysis).
        Sgdm => "sgdm",
        /// Lion: sign of an interpolated momentum.
        Lion => "lion",
        /// Plain SGD (no state; useful for checks).
        Sgd => "sgd",
    }
);

named_enum!(
    /// The optimizer without state, used on the residual outside the subspace.
    StateFreeRule, "state-free rule", {
        /// signSGD: −lr·sign(R), with sign(0) = 0.
        SignSgd => "signsgd",
        /// SGD: −lr·R.
        Sgd => "sgd",
        /// No update of the residual (GaLore, BAdam).
        None => "none",
    }
);

/// Every setting of the optimizer. Build one from a preset with [`OptimizerConfig::preset`] and
/// change fields with [`OptimizerConfig::set`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Preset this configuration started from (informational).
    pub preset: String,
    /// Base learning rate (the trainer overwrites it every step when scheduling).
    pub lr: f64,
    /// Decoupled weight decay, applied as W ← W·(1 − lr·wd).
    pub weight_decay: f64,
    /// Adam β1 / Lion interpolation β.
    pub beta1: f64,
    /// Adam β2 / Lion momentum β.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Momentum β of the `sgdm` rule.
    pub momentum: f64,
    /// Nesterov look-ahead for the `sgdm` rule.
    pub nesterov: bool,
    /// How projectable gradients are split.
    pub projection: ProjectionKind,
    /// Side of matrix projections (svd, random, randperm).
    pub proj_side: ProjSide,
    /// Axis of coordinate projections.
    pub coordinates: CoordinateAxis,
    /// Order of blocks for the blockwise projection.
    pub block_order: BlockOrder,
    /// What one block is for the blockwise projection.
    pub block_unit: BlockUnit,
    /// Density ρ ∈ [0, 1]: the share of each projectable weight (or of blocks) that keeps state.
    pub density: f64,
    /// Update gap T: the subspace is re-chosen every T steps.
    pub update_gap: usize,
    /// Zero the state-full statistics (and restart bias correction) when the subspace changes.
    pub reset: bool,
    /// Rule inside the subspace and for always-state-full parameters.
    pub state_full: StateFullRule,
    /// Rule on the residual.
    pub state_free: StateFreeRule,
    /// Learning-rate scale of the projectable part (GaLore's `scale`).
    pub proj_lr_scale: f64,
    /// Additional learning-rate scale of the state-free part (1.0 pre-training, 0.1 fine-tuning).
    pub state_free_lr_scale: f64,
    /// Regex: parameters that may be projected (2-D linears by default).
    pub projectable_modules: String,
    /// Regex: parameters that always keep full state; empty for none. Takes precedence.
    pub state_full_modules: String,
    /// Seed of the optimizer's random choices (random subspaces, coordinates, block orders).
    pub seed: u64,
    /// Check every gradient for NaN/Inf before updating anything.
    pub check_finite: bool,
}

/// Names of the presets, in the order of the paper's tables.
pub const PRESETS: &[&str] = &[
    "adamw",
    "frugal",
    "frugal-svd",
    "galore",
    "badam",
    "signsgd",
    "sgd",
];

/// Default pattern of projectable parameters: attention and MLP linears.
pub const DEFAULT_PROJECTABLE: &str = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)";
/// Default pattern of always-state-full parameters: embeddings, norms, logits layer.
pub const DEFAULT_STATE_FULL: &str = r"(embed|norm|lm_head)";

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::preset("frugal").expect("built-in preset")
    }
}

impl OptimizerConfig {
    /// The configuration of a named preset with the paper's published defaults.
    pub fn preset(name: &str) -> Result<Self> {
        let mut c = OptimizerConfig {
            preset: name.to_string(),
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.9,
            nesterov: false,
            projection: ProjectionKind::Blocks,
            proj_side: ProjSide::Std,
            coordinates: CoordinateAxis::Columns,
            block_order: BlockOrder::Descending,
            block_unit: BlockUnit::Tensor,
            density: 0.25,
            update_gap: 200,
            reset: true,
            state_full: StateFullRule::AdamW,
            state_free: StateFreeRule::SignSgd,
            proj_lr_scale: 1.0,
            state_free_lr_scale: 1.0,
            projectable_modules: DEFAULT_PROJECTABLE.to_string(),
            state_full_modules: DEFAULT_STATE_FULL.to_string(),
            seed: 0,
            check_finite: true,
        };
        match name {
            "frugal" => {}
            "adamw" => {
                // Every block active forever: the active set never changes, so nothing is reset.
                c.density = 1.0;
            }
            "frugal-svd" => c.projection = ProjectionKind::Svd,
            "galore" => {
                c.projection = ProjectionKind::Svd;
                c.reset = false;
                c.state_free = StateFreeRule::None;
                c.proj_lr_scale = 0.25;
                c.lr = 1e-2;
            }
            "badam" => {
                c.block_unit = BlockUnit::Layer;
                c.state_free = StateFreeRule::None;
            }
            "signsgd" | "sgd" => {
                // Every parameter is a block and no block is ever active.
                c.density = 0.0;
                c.projectable_modules = ".".to_string();
                c.state_full_modules = String::new();
                if name == "sgd" {
                    c.state_free = StateFreeRule::Sgd;
                    c.lr = 1e-2;
                }
            }
            _ => {
                return Err(Error::UnknownName {
                    kind: "optimizer preset",
                    name: name.to_string(),
                    expected: PRESETS.join(", "),
                })
            }
        }
        Ok(c)
    }

    /// Parses `preset` or `preset:key=value,key=value` (the form used by comparison lists).
    pub fn parse_spec(spec: &str) -> Result<Self> {
        let (name, overrides) = spec.split_once(':').unwrap_or((spec, ""));
        let mut c = Self::preset(name.trim())?;
        for kv in overrides.split(',').filter(|s| !s.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::setting(kv, "expected key=value (e.g. density=0.125)"))?;
            c.set(k.trim(), v.trim())?;
        }
        Ok(c)
    }

    /// Sets one field from its textual form; `key` uses the field name with `-` or `_`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        fn num<T: FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| Error::setting(key, format!("`{v}` is not a valid number")))
        }
        fn flag(key: &str, v: &str) -> Result<bool> {
            match v {
                "true" | "on" | "yes" | "1" => Ok(true),
                "false" | "off" | "no" | "0" => Ok(false),
                _ => Err(Error::setting(key, format!("`{v}` is not true/false"))),
            }
        }
        let canonical = key.replace('-', "_");
        match canonical.as_str() {
            "lr" => self.lr = num(key, value)?,
            "weight_decay" | "wd" => self.weight_decay = num(key, value)?,
            "beta1" => self.beta1 = num(key, value)?,
            "beta2" => self.beta2 = num(key, value)?,
            "eps" => self.eps = num(key, value)?,
            "momentum" => self.momentum = num(key, value)?,
            "nesterov" => self.nesterov = flag(key, value)?,
            "projection" => match value {
                // Coordinate axes are accepted directly as projection names.
                "columns" | "rows" | "randk" => {
                    self.projection = ProjectionKind::Coordinates;
                    self.coordinates = value.parse()?;
                }
                _ => self.projection = value.parse()?,
            },
            "proj_side" | "side" => self.proj_side = value.parse()?,
            "coordinates" => self.coordinates = value.parse()?,
            "block_order" | "order" => self.block_order = value.parse()?,
            "block_unit" => self.block_unit = value.parse()?,
            "density" | "rho" => self.density = num(key, value)?,
            "update_gap" | "gap" | "t" => self.update_gap = num(key, value)?,
            "reset" => self.reset = flag(key, value)?,
            "state_full" => self.state_full = value.parse()?,
            "state_free" => self.state_free = value.parse()?,
            "proj_lr_scale" => self.proj_lr_scale = num(key, value)?,
            "state_free_lr_scale" => self.state_free_lr_scale = num(key, value)?,
            "projectable_modules" => self.projectable_modules = value.to_string(),
            "state_full_modules" => self.state_full_modules = value.to_string(),
            "seed" => self.seed = num(key, value)?,
            "check_finite" => self.check_finite = flag(key, value)?,
            _ => {
                return Err(Error::UnknownName {
                    kind: "optimizer setting",
                    name: key.to_string(),
                    expected: "lr, weight_decay, beta1, beta2, eps, momentum, nesterov, projection, \
                               proj_side, coordinates, block_order, block_unit, density, update_gap, \
                               reset, state_full, state_free, proj_lr_scale, state_free_lr_scale, \
                               projectable_modules, state_full_modules, seed, check_finite"
                        .to_string(),
                })
            }
        }
        Ok(())
    }

    /// Checks ranges; called by the optimizer constructor.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.density) || self.density.is_nan() {
            return Err(Error::setting(
                "density",
                format!("{} is outside [0, 1]", self.density),
            ));
        }
        if self.update_gap == 0 {
            return Err(Error::setting("update_gap", "must be at least 1"));
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::setting(field, format!("{b} is outside [0, 1)")));
            }
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::setting(
                "momentum",
                format!("{} is outside [0, 1)", self.momentum),
            ));
        }
        for (field, x) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
            ("proj_lr_scale", self.proj_lr_scale),
            ("state_free_lr_scale", self.state_free_lr_scale),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(Error::setting(
                    field,
                    format!("{x} must be a finite number ≥ 0"),
                ));
            }
        }
        Ok(())
    }
}

/// Python's `round`: to nearest, ties to even (14·0.25 = 3.5 → 4, 2.5 → 2).
pub fn round_half_even(x: f64) -> usize {
    let r = x.round_ties_even();
    if r < 0.0 {
        0
    } else {
        r as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(14.0 * 0.25), 4);
        assert_eq!(round_half_even(128.0 * 0.3), 38);
    }

    #[test]
    fn specs_parse_and_reject() {
        let c = OptimizerConfig::parse_spec("frugal:density=0.125,projection=svd").unwrap();
        assert_eq!(c.density, 0.125);
        assert_eq!(c.projection, ProjectionKind::Svd);
        let c = OptimizerConfig::parse_spec("galore").unwrap();
        assert!(!c.reset && c.state_free == StateFreeRule::None && c.proj_lr_scale == 0.25);
        assert!(matches!(
            OptimizerConfig::parse_spec("adam"),
            Err(Error::UnknownName { .. })
        ));
        assert!(matches!(
            OptimizerConfig::parse_spec("frugal:projection=pca"),
            Err(Error::UnknownName { .. })
        ));
        let mut c = OptimizerConfig::preset("frugal").unwrap();
        c.density = 1.5;
        assert!(matches!(c.validate(), Err(Error::InvalidSetting { .. })));
    }
}
