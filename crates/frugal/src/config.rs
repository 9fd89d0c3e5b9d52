//! Optimizer configuration: every option of FRUGAL, the paper's presets, and `key=value` overrides.
//!
//! [`OptimizerConfig`] is the one source of truth: its serde form names every setting, and
//! [`OptimizerConfig::apply`] sets any of them from text by that name, so no list of keys is kept
//! by hand anywhere. Settings that belong to one projection live in its [`Projection`] variant.

use crate::error::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// Declares a plain enum with lower-case names: parsing (case- and `_`/`-`-insensitive),
/// display, a default, and serde as those names.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, default = $default:ident, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// All accepted names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The name used on the command line and in files.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
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

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_enum!(
    /// Which side of an m×n matrix a matrix projection acts on.
    ProjSide, "projection side", default = Std, {
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
    /// The side of a one-sided projection (randperm selects rows or columns, never both).
    OneSide, "one-sided projection side", default = Std, {
        /// Columns if m ≥ n, else rows.
        Std => "std",
        /// The opposite of `std`.
        ReverseStd => "reverse-std",
        /// Rows.
        Left => "left",
        /// Columns.
        Right => "right",
    }
);

named_enum!(
    /// Which coordinates a coordinate projection keeps.
    CoordinateAxis, "coordinate axis", default = Columns, {
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
    BlockOrder, "block order", default = Descending, {
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
    BlockUnit, "block unit", default = Tensor, {
        /// Each projectable tensor is its own block.
        Tensor => "tensor",
        /// The projectable tensors of one labelled group (a layer) form a block (BAdam).
        Layer => "layer",
    }
);

named_enum!(
    /// The optimizer that keeps state, used inside the subspace and for always-state-full parameters.
    StateFullRule, "state-full rule", default = AdamW, {
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
    StateFreeRule, "state-free rule", default = SignSgd, {
        /// signSGD: −lr·sign(R), with sign(0) = 0.
        SignSgd => "signsgd",
        /// SGD: −lr·R.
        Sgd => "sgd",
        /// No update of the residual (GaLore, BAdam).
        None => "none",
        /// The residual scaled by ‖D‖/‖down(G)‖, D the state-full rule's direction in the
        /// subspace, per channel or tensor, with the norm-growth limiter (Fira).
        ScaledResidual => "scaled-residual",
        /// The whole gradient scaled the same way; the subspace's update is not applied, its
        /// moments only measure the scale (APOLLO, APOLLO-Mini).
        ScaledGradient => "scaled-gradient",
    }
);

named_enum!(
    /// How the SVD projection finds its subspace.
    SvdSolver, "SVD solver", default = Exact, {
        /// A full thin SVD of the gradient.
        Exact => "exact",
        /// A range finder with oversampling and power iterations started from the previous
        /// basis, then a small exact SVD: far fewer operations, nearly the same subspace.
        Randomized => "randomized",
    }
);

named_enum!(
    /// What the random projection's matrix is.
    RandomBasis, "random basis", default = Orthonormal, {
        /// Semi-orthogonal (thin Q of a Gaussian matrix): a true projection.
        Orthonormal => "orthonormal",
        /// Gaussian entries scaled by 1/√r (APOLLO's sketch). Not a projection: only for the
        /// `scaled-gradient` rule, which uses the sketch to measure scales.
        Gaussian => "gaussian",
    }
);

named_enum!(
    /// Over what the norm-ratio scales of the scaled state-free rules are measured.
    ScaleGranularity, "scale granularity", default = Channel, {
        /// One scale per channel: per row when the columns are projected, per column when the
        /// rows are (Fira, APOLLO).
        Channel => "channel",
        /// One scale for the whole tensor (APOLLO-Mini).
        Tensor => "tensor",
    }
);

named_enum!(
    /// How kept moments (reset off) follow a new matrix basis. An SVD's vectors have arbitrary
    /// signs, so without a transfer the kept moments meet vectors that may have flipped.
    MomentTransfer, "moment transfer", default = Keep, {
        /// Keep the moments' coordinates as they are (GaLore's behaviour).
        Keep => "keep",
        /// Flip each new basis vector to agree in sign with the old one.
        Align => "align",
        /// Carry the moments into the new basis: m ← C·m with C the old-to-new change of basis,
        /// v ← (C∘C)·v.
        Project => "project",
    }
);

named_enum!(
    /// How the state-full moments are stored.
    MomentStorage, "moment storage", default = F32, {
        /// 32-bit floats.
        F32 => "f32",
        /// 8 bits per value with a scale per block of 256 (see [`crate::quant`]): about a
        /// quarter of the bytes.
        Bits8 => "8bit",
    }
);

named_enum!(
    /// How the density ρ changes over training (at subspace changes, every T steps).
    DensitySchedule, "density schedule", default = Constant, {
        /// ρ stays at `density`.
        Constant => "constant",
        /// ρ falls linearly from `density` to `density_min` over `density_steps`.
        Linear => "linear",
        /// ρ follows a half cosine from `density` to `density_min` over `density_steps`.
        Cosine => "cosine",
    }
);

named_enum!(
    /// Which tensors weight decay applies to.
    DecayMask, "weight-decay mask", default = All, {
        /// Every tensor (as in the paper's code).
        All => "all",
        /// Only tensors whose label asks for it (e.g. no decay on norms and biases).
        Labels => "labels",
    }
);

/// How the gradient of a projectable weight is split, with the settings of that projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "projection")]
pub enum Projection {
    /// Top singular subspace of the current gradient (GaLore).
    #[serde(rename = "svd")]
    Svd {
        #[serde(default)]
        proj_side: ProjSide,
        #[serde(default)]
        svd_solver: SvdSolver,
        /// Randomized solver: sketch columns beyond the rank.
        #[serde(default = "default_oversample")]
        oversample: usize,
        /// Randomized solver: power iterations.
        #[serde(default = "default_power_iters")]
        power_iters: usize,
    },
    /// Random matrix (QR of a Gaussian, or the Gaussian itself).
    #[serde(rename = "random")]
    Random {
        #[serde(default)]
        proj_side: ProjSide,
        #[serde(default)]
        random_basis: RandomBasis,
    },
    /// Random rows or columns: a slice of a permutation matrix.
    #[serde(rename = "randperm")]
    RandPerm {
        #[serde(default)]
        proj_side: OneSide,
    },
    /// Coordinate subsets: columns, rows or random entries.
    #[serde(rename = "coordinates")]
    Coordinates {
        #[serde(default)]
        coordinates: CoordinateAxis,
    },
    /// Whole tensors (or layers) as blocks, a share of them state-full at a time (BAdam-style).
    #[serde(rename = "blocks")]
    Blocks {
        #[serde(default)]
        block_order: BlockOrder,
        #[serde(default)]
        block_unit: BlockUnit,
    },
}

/// Sketch columns beyond the rank of the randomized SVD.
const OVERSAMPLE: usize = 8;
/// Power iterations of the randomized SVD. Each refresh also starts from the previous basis, so
/// the subspace iteration continues across refreshes; one more sweep per refresh keeps training
/// as good as with the exact SVD (without it, `tiny` ends 3.6% worse in perplexity).
const POWER_ITERS: usize = 1;

fn default_oversample() -> usize {
    OVERSAMPLE
}

fn default_power_iters() -> usize {
    POWER_ITERS
}

impl Projection {
    /// The SVD projection with its default settings (exact solver).
    pub const SVD: Projection = Projection::Svd {
        proj_side: ProjSide::Std,
        svd_solver: SvdSolver::Exact,
        oversample: OVERSAMPLE,
        power_iters: POWER_ITERS,
    };

    /// Every projection with its default settings.
    pub const ALL: [Projection; 5] = [
        Projection::SVD,
        Projection::Random {
            proj_side: ProjSide::Std,
            random_basis: RandomBasis::Orthonormal,
        },
        Projection::RandPerm {
            proj_side: OneSide::Std,
        },
        Projection::Coordinates {
            coordinates: CoordinateAxis::Columns,
        },
        Projection::Blocks {
            block_order: BlockOrder::Descending,
            block_unit: BlockUnit::Tensor,
        },
    ];

    /// The projection's name (`svd`, `random`, `randperm`, `coordinates`, `blocks`).
    pub fn name(&self) -> &'static str {
        match self {
            Projection::Svd { .. } => "svd",
            Projection::Random { .. } => "random",
            Projection::RandPerm { .. } => "randperm",
            Projection::Coordinates { .. } => "coordinates",
            Projection::Blocks { .. } => "blocks",
        }
    }

    /// True for projections that need matrices (svd, random, randperm).
    pub fn is_matrix(&self) -> bool {
        matches!(
            self,
            Projection::Svd { .. } | Projection::Random { .. } | Projection::RandPerm { .. }
        )
    }

    /// True for the blockwise projection, whose subspaces are scheduled for all tensors at once.
    pub fn is_blocks(&self) -> bool {
        matches!(self, Projection::Blocks { .. })
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Projection::Coordinates { coordinates } => f.write_str(coordinates.as_str()),
            p => f.write_str(p.name()),
        }
    }
}

/// Every setting of the optimizer. Build one from a preset with [`OptimizerConfig::preset`] and
/// change settings with [`OptimizerConfig::apply`] (or assign fields).
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
    /// How projectable gradients are split, with that projection's settings.
    #[serde(flatten)]
    pub projection: Projection,
    /// Density ρ ∈ [0, 1]: the share of each projectable weight (or of blocks) that keeps state.
    pub density: f64,
    /// Matrix projections (svd, random): a fixed rank r (at most the side's dimension) instead of
    /// round(ρ·dimension); 0 uses the density.
    #[serde(default)]
    pub rank: usize,
    /// How ρ changes over training: constant, or decaying to `density_min`.
    #[serde(default)]
    pub density_schedule: DensitySchedule,
    /// The final ρ of a decaying density schedule.
    #[serde(default)]
    pub density_min: f64,
    /// Steps over which a decaying ρ reaches `density_min` (a training run sets its length).
    #[serde(default)]
    pub density_steps: usize,
    /// Update gap T: the subspace is re-chosen every T steps (the first T, with `gap_growth`).
    pub update_gap: usize,
    /// Factor by which T grows at a subspace change when the training loss has plateaued (the
    /// mean loss of the period just ended improved on the one before by less than
    /// `plateau_tolerance`, relatively); 1 keeps T fixed. Needs the losses
    /// ([`crate::Frugal::observe_loss`]).
    #[serde(default = "one")]
    pub gap_growth: f64,
    /// Largest T that growth may reach; 0: no limit.
    #[serde(default)]
    pub gap_max: usize,
    /// Relative improvement of the mean training loss below which it counts as plateaued.
    #[serde(default = "default_plateau_tolerance")]
    pub plateau_tolerance: f64,
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
    /// Scaled state-free rules: one scale per channel or per tensor.
    #[serde(default)]
    pub scale_granularity: ScaleGranularity,
    /// Scaled state-free rules: the norm-growth limiter γ. The scaled update's norm may grow by at
    /// most this factor per step; 0 turns the limiter off.
    #[serde(default = "default_norm_growth_limit")]
    pub norm_growth_limit: f64,
    /// Regex of parameters that may be projected; with `state_full_modules`, overrides the roles
    /// of the caller's labels. Empty: the labels decide.
    #[serde(default)]
    pub projectable_modules: String,
    /// Regex of parameters that always keep full state; takes precedence over
    /// `projectable_modules`. Empty: the labels decide.
    #[serde(default)]
    pub state_full_modules: String,
    /// Regex of parameters that are state-free as a whole (density 0 for them alone: no state,
    /// the state-free rule on the whole gradient); between `state_full_modules` and
    /// `projectable_modules` in precedence. Empty: the labels decide.
    #[serde(default)]
    pub state_free_modules: String,
    /// Which tensors weight decay applies to.
    #[serde(default)]
    pub decay_mask: DecayMask,
    /// How kept moments follow a new matrix basis (with `reset` off).
    #[serde(default)]
    pub moment_transfer: MomentTransfer,
    /// How the state-full moments are stored.
    #[serde(default)]
    pub moment_storage: MomentStorage,
    /// Seed of the optimizer's random choices (random subspaces, coordinates, block orders).
    pub seed: u64,
    /// Check every gradient for NaN/Inf before updating anything.
    pub check_finite: bool,
}

/// Names of the presets: the paper's tables, then the relatives of the state-free idea.
pub const PRESETS: &[&str] = &[
    "adamw",
    "frugal",
    "frugal-svd",
    "galore",
    "badam",
    "signsgd",
    "sgd",
    "fira",
    "apollo",
    "apollo-mini",
];

/// Fira's norm-growth limiter γ: the scaled update's norm grows by at most 1% per step.
const NORM_GROWTH_LIMIT: f64 = 1.01;

fn default_norm_growth_limit() -> f64 {
    NORM_GROWTH_LIMIT
}

fn one() -> f64 {
    1.0
}

fn default_plateau_tolerance() -> f64 {
    0.01
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self::preset("frugal").expect("built-in preset")
    }
}

/// The settings as a JSON object (the form every name and value comes from).
fn object(c: &OptimizerConfig) -> Map<String, Value> {
    match serde_json::to_value(c) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// Every settable key with an example value of its type: the default configuration under each
/// projection, so that projection-specific settings are included.
fn samples() -> Map<String, Value> {
    let mut all = Map::new();
    for projection in Projection::ALL {
        let c = OptimizerConfig {
            projection,
            ..OptimizerConfig::default()
        };
        for (k, v) in object(&c) {
            all.entry(k).or_insert(v);
        }
    }
    all.remove("preset");
    all
}

fn parse_value(key: &str, text: &str, sample: &Value) -> Result<Value> {
    let bad = |what: &str| Error::setting(key, format!("`{text}` is not {what}"));
    match sample {
        Value::Bool(_) => match text {
            "true" | "on" | "yes" | "1" => Ok(Value::Bool(true)),
            "false" | "off" | "no" | "0" => Ok(Value::Bool(false)),
            _ => Err(bad("true or false")),
        },
        Value::Number(n) if n.is_u64() => text
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| bad("a whole number ≥ 0")),
        Value::Number(_) => {
            let x: f64 = text.parse().map_err(|_| bad("a number"))?;
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .ok_or_else(|| bad("a finite number"))
        }
        _ => Ok(Value::String(text.to_string())),
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
            projection: Projection::Blocks {
                block_order: BlockOrder::Descending,
                block_unit: BlockUnit::Tensor,
            },
            density: 0.25,
            rank: 0,
            density_schedule: DensitySchedule::Constant,
            density_min: 0.0,
            density_steps: 0,
            update_gap: 200,
            gap_growth: 1.0,
            gap_max: 0,
            plateau_tolerance: default_plateau_tolerance(),
            reset: true,
            state_full: StateFullRule::AdamW,
            state_free: StateFreeRule::SignSgd,
            proj_lr_scale: 1.0,
            state_free_lr_scale: 1.0,
            scale_granularity: ScaleGranularity::Channel,
            norm_growth_limit: NORM_GROWTH_LIMIT,
            projectable_modules: String::new(),
            state_full_modules: String::new(),
            state_free_modules: String::new(),
            decay_mask: DecayMask::All,
            moment_transfer: MomentTransfer::Keep,
            moment_storage: MomentStorage::F32,
            seed: 0,
            check_finite: true,
        };
        let svd = Projection::SVD;
        let gaussian = Projection::Random {
            proj_side: ProjSide::Std,
            random_basis: RandomBasis::Gaussian,
        };
        match name {
            "frugal" => {}
            "adamw" => {
                // Every block active forever: the active set never changes, so nothing is reset.
                c.density = 1.0;
            }
            "frugal-svd" => c.projection = svd,
            "galore" => {
                c.projection = svd;
                c.reset = false;
                c.state_free = StateFreeRule::None;
                c.proj_lr_scale = 0.25;
                c.lr = 1e-2;
            }
            "fira" => {
                // GaLore with the residual scaled instead of dropped. GaLore's scale α = 0.25
                // applies to the subspace's update only: the residual's rate is lr·α·(1/α).
                c.projection = svd;
                c.reset = false;
                c.state_free = StateFreeRule::ScaledResidual;
                c.proj_lr_scale = 0.25;
                c.state_free_lr_scale = 4.0;
                c.lr = 1e-2;
            }
            "apollo" | "apollo-mini" => {
                // The gradient scaled channel-wise by a rank-ρ·n Gaussian sketch's Adam ratio;
                // Mini: rank 1, one scale per tensor, scale 128 (its step is lr·√128).
                c.projection = gaussian;
                c.reset = false;
                c.state_free = StateFreeRule::ScaledGradient;
                c.lr = 1e-2;
                if name == "apollo-mini" {
                    c.rank = 1;
                    c.scale_granularity = ScaleGranularity::Tensor;
                    c.state_free_lr_scale = 128f64.sqrt();
                }
            }
            "badam" => {
                c.projection = Projection::Blocks {
                    block_order: BlockOrder::Descending,
                    block_unit: BlockUnit::Layer,
                };
                c.state_free = StateFreeRule::None;
            }
            "signsgd" | "sgd" => {
                // Every parameter is a block and no block is ever active.
                c.density = 0.0;
                c.projectable_modules = ".".to_string();
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
        let pairs = overrides
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|kv| {
                kv.split_once('=')
                    .ok_or_else(|| Error::setting(kv, "expected key=value (e.g. density=0.125)"))
            })
            .collect::<Result<Vec<_>>>()?;
        c.apply(pairs)?;
        Ok(c)
    }

    /// The name of every setting [`OptimizerConfig::apply`] accepts, in alphabetical order.
    pub fn keys() -> Vec<String> {
        samples().keys().cloned().collect()
    }

    /// The values `projection` takes: each projection's name and the coordinate axes.
    fn projection_names() -> Vec<&'static str> {
        let mut names: Vec<&str> = Projection::ALL.iter().map(|p| p.name()).collect();
        names.extend(CoordinateAxis::NAMES);
        names
    }

    /// Sets one setting from its textual form (see [`OptimizerConfig::apply`]).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        self.apply([(key, value)])
    }

    /// Sets settings from `key=value` text, all at once (so their order does not matter). Keys
    /// are the field names, with `-` or `_`; `projection` also takes `columns`, `rows` and
    /// `randk` for the coordinate projections. Unknown keys, values of the wrong type,
    /// non-finite numbers and settings of another projection are errors; nothing changes then.
    pub fn apply<'a>(&mut self, pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<()> {
        let samples = samples();
        let mut settings = object(self);
        let mut given = Vec::new();
        for (key, text) in pairs {
            let (key, text) = (key.trim().replace('-', "_"), text.trim());
            let Some(sample) = samples.get(&key) else {
                return Err(Error::UnknownName {
                    kind: "optimizer setting",
                    name: key,
                    expected: Self::keys().join(", "),
                });
            };
            if key == "projection" && !Self::projection_names().contains(&text) {
                return Err(Error::UnknownName {
                    kind: "projection",
                    name: text.to_string(),
                    expected: Self::projection_names().join(", "),
                });
            }
            if key == "projection" && CoordinateAxis::from_str(text).is_ok() {
                settings.insert(key.clone(), Value::from("coordinates"));
                settings.insert("coordinates".into(), Value::from(text));
            } else {
                settings.insert(key.clone(), parse_value(&key, text, sample)?);
            }
            given.push(key);
        }
        let new: OptimizerConfig = serde_json::from_value(Value::Object(settings))
            .map_err(|e| Error::setting(&given.join(", "), e.to_string()))?;
        let in_effect = object(&new);
        if let Some(stray) = given.iter().find(|k| !in_effect.contains_key(*k)) {
            return Err(Error::setting(
                stray,
                format!("does not apply to projection `{}`", new.projection.name()),
            ));
        }
        *self = new;
        Ok(())
    }

    /// How many vectors the matrix projections keep at a subspace change at `step` (density or
    /// fixed rank).
    pub fn rank_rule(&self, step: u64) -> crate::projection::RankRule {
        crate::projection::RankRule {
            density: self.density_at(step),
            rank: self.rank,
        }
    }

    /// The density ρ in force from a subspace change at `step` (see [`DensitySchedule`]).
    pub fn density_at(&self, step: u64) -> f64 {
        let x = (step as f64 / self.density_steps.max(1) as f64).min(1.0);
        let kept = match self.density_schedule {
            DensitySchedule::Constant => return self.density,
            DensitySchedule::Linear => 1.0 - x,
            DensitySchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
        };
        self.density_min + (self.density - self.density_min) * kept
    }

    /// The blockwise projection's order and unit, if that is the projection.
    pub fn blocks(&self) -> Option<(BlockOrder, BlockUnit)> {
        match self.projection {
            Projection::Blocks {
                block_order,
                block_unit,
            } => Some((block_order, block_unit)),
            _ => None,
        }
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
        for (field, b) in [
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("momentum", self.momentum),
        ] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::setting(field, format!("{b} is outside [0, 1)")));
            }
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
        if self.density_schedule != DensitySchedule::Constant {
            if !(0.0..=self.density).contains(&self.density_min) {
                return Err(Error::setting(
                    "density_min",
                    format!(
                        "{} must lie in [0, density = {}]",
                        self.density_min, self.density
                    ),
                ));
            }
            if self.density_steps == 0 {
                return Err(Error::setting(
                    "density_steps",
                    "a decaying density needs the steps over which it decays (e.g. the run's length)",
                ));
            }
            if self.rank > 0 {
                return Err(Error::setting(
                    "density_schedule",
                    "a fixed rank does not follow the density; set rank=0 to let ρ decay",
                ));
            }
        }
        if !(self.gap_growth.is_finite() && self.gap_growth >= 1.0) {
            return Err(Error::setting(
                "gap_growth",
                format!(
                    "{} must be a finite number ≥ 1 (1: T stays fixed)",
                    self.gap_growth
                ),
            ));
        }
        if self.gap_max != 0 && self.gap_max < self.update_gap {
            return Err(Error::setting(
                "gap_max",
                format!(
                    "{} is below update_gap = {} (0: no limit)",
                    self.gap_max, self.update_gap
                ),
            ));
        }
        if !(self.plateau_tolerance.is_finite() && self.plateau_tolerance >= 0.0) {
            return Err(Error::setting(
                "plateau_tolerance",
                format!("{} must be a finite number ≥ 0", self.plateau_tolerance),
            ));
        }
        let limit = self.norm_growth_limit;
        if !(limit == 0.0 || (limit.is_finite() && limit >= 1.0)) {
            return Err(Error::setting(
                "norm_growth_limit",
                format!("{limit} must be 0 (off) or a finite number ≥ 1"),
            ));
        }
        let matrix = matches!(
            self.projection,
            Projection::Svd { .. } | Projection::Random { .. }
        );
        if self.rank > 0 && !matrix {
            return Err(Error::setting(
                "rank",
                format!(
                    "a fixed rank needs projection svd or random, not `{}` (set density instead)",
                    self.projection.name()
                ),
            ));
        }
        let scaled = matches!(
            self.state_free,
            StateFreeRule::ScaledResidual | StateFreeRule::ScaledGradient
        );
        if scaled && !matrix {
            return Err(Error::setting(
                "state_free",
                format!(
                    "`{}` measures its scales in a matrix subspace: use projection svd or random",
                    self.state_free
                ),
            ));
        }
        if let Projection::Random {
            random_basis: RandomBasis::Gaussian,
            ..
        } = self.projection
        {
            if self.state_free != StateFreeRule::ScaledGradient {
                return Err(Error::setting(
                    "random_basis",
                    "a Gaussian sketch is not a projection, so it has no residual: use it with \
                     state_free=scaled-gradient, or random_basis=orthonormal",
                ));
            }
        }
        let full_side = matches!(
            self.projection,
            Projection::Svd {
                proj_side: ProjSide::Full,
                ..
            } | Projection::Random {
                proj_side: ProjSide::Full,
                ..
            }
        );
        if scaled && full_side && self.scale_granularity == ScaleGranularity::Channel {
            return Err(Error::setting(
                "scale_granularity",
                "with proj_side=full both sides are projected, so there are no channels: use \
                 scale_granularity=tensor or another side",
            ));
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
        assert_eq!(c.projection, Projection::SVD);
        let c = OptimizerConfig::parse_spec("galore").unwrap();
        assert!(!c.reset && c.state_free == StateFreeRule::None && c.proj_lr_scale == 0.25);
        assert!(matches!(
            OptimizerConfig::parse_spec("adam"),
            Err(Error::UnknownName { .. })
        ));
        let err = OptimizerConfig::parse_spec("frugal:projection=pca").unwrap_err();
        assert!(matches!(err, Error::UnknownName { .. }), "{err}");
        assert!(err.to_string().contains("pca") && err.to_string().contains("randk"));
        let mut c = OptimizerConfig::preset("frugal").unwrap();
        c.density = 1.5;
        assert!(matches!(c.validate(), Err(Error::InvalidSetting { .. })));
    }

    #[test]
    fn every_setting_is_reachable_by_name_in_any_order() {
        let keys = OptimizerConfig::keys();
        for k in [
            "coordinates",
            "block_unit",
            "block_order",
            "proj_side",
            "nesterov",
            "check_finite",
            "decay_mask",
        ] {
            assert!(keys.iter().any(|x| x == k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k == "preset"));
        let mut c = OptimizerConfig::preset("frugal").unwrap();
        c.apply([
            ("proj-side", "left"),
            ("projection", "random"),
            ("nesterov", "on"),
            ("check_finite", "false"),
            ("seed", "7"),
            ("decay_mask", "labels"),
        ])
        .unwrap();
        assert_eq!(
            c.projection,
            Projection::Random {
                proj_side: ProjSide::Left,
                random_basis: RandomBasis::Orthonormal,
            }
        );
        assert!(c.nesterov && !c.check_finite && c.seed == 7);
        assert_eq!(c.decay_mask, DecayMask::Labels);
        c.set("projection", "rows").unwrap();
        assert_eq!(
            c.projection,
            Projection::Coordinates {
                coordinates: CoordinateAxis::Rows
            }
        );
        c.apply([("block_unit", "layer"), ("projection", "blocks")])
            .unwrap();
        assert_eq!(c.blocks(), Some((BlockOrder::Descending, BlockUnit::Layer)));
    }

    #[test]
    fn bad_settings_name_the_problem_and_change_nothing() {
        let before = OptimizerConfig::preset("frugal").unwrap();
        let mut c = before.clone();
        let cases = [
            ("learning_rate", "1", "block_unit, check_finite"),
            ("lr", "nan", "finite"),
            ("lr", "inf", "finite"),
            ("update_gap", "-3", "whole number"),
            ("nesterov", "maybe", "true or false"),
            ("proj_side", "left", "does not apply to projection `blocks`"),
            ("block_order", "sideways", "sideways"),
        ];
        for (k, v, expect) in cases {
            let err = c.set(k, v).unwrap_err().to_string();
            assert!(err.contains(expect), "{k}={v}: {err}");
            assert_eq!(c, before, "{k}={v} changed the configuration");
        }
        let err = OptimizerConfig::parse_spec("frugal:projection=randperm,proj_side=full")
            .unwrap_err()
            .to_string();
        assert!(err.contains("full"), "{err}");
    }

    #[test]
    fn old_flat_settings_still_parse() {
        // The form written before settings were grouped by projection: every field flat.
        let old = r#"{"preset":"frugal","lr":0.001,"weight_decay":0.0,"beta1":0.9,"beta2":0.999,
            "eps":1e-8,"momentum":0.9,"nesterov":false,"projection":"randperm","proj_side":"left",
            "coordinates":"columns","block_order":"descending","block_unit":"tensor","density":0.25,
            "update_gap":200,"reset":true,"state_full":"adamw","state_free":"signsgd",
            "proj_lr_scale":1.0,"state_free_lr_scale":1.0,
            "projectable_modules":"(q_proj|k_proj)","state_full_modules":"(embed|norm|lm_head)",
            "seed":0,"check_finite":true}"#;
        let c: OptimizerConfig = serde_json::from_str(old).unwrap();
        assert_eq!(
            c.projection,
            Projection::RandPerm {
                proj_side: OneSide::Left
            }
        );
        assert_eq!(c.decay_mask, DecayMask::All);
        assert_eq!(c.state_full_modules, "(embed|norm|lm_head)");
    }

    #[test]
    fn density_schedules_follow_their_curves_and_bad_ones_are_refused() {
        let spec = |sched: &str| {
            OptimizerConfig::parse_spec(&format!(
                "frugal:density=0.5,density_min=0.1,density_steps=100,density_schedule={sched}"
            ))
            .unwrap()
        };
        let (constant, linear, cosine) = (spec("constant"), spec("linear"), spec("cosine"));
        for step in [0, 25, 50, 100, 400] {
            assert_eq!(constant.density_at(step), 0.5);
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        // Linear: 0.5 − 0.4·x; cosine: 0.1 + 0.4·(1 + cos πx)/2; both hold ρ_min after the end.
        for (step, lin, cos) in [
            (0, 0.5, 0.5),
            (25, 0.4, 0.1 + 0.2 * (1.0 + std::f64::consts::FRAC_1_SQRT_2)),
            (50, 0.3, 0.3),
            (100, 0.1, 0.1),
            (400, 0.1, 0.1),
        ] {
            assert!(close(linear.density_at(step), lin), "linear at {step}");
            assert!(close(cosine.density_at(step), cos), "cosine at {step}");
        }
        assert_eq!(linear.rank_rule(50).density, linear.density_at(50));
        linear.validate().unwrap();
        let refused = [
            (
                "frugal:density_schedule=linear,density_min=0.1",
                "density_steps",
            ),
            (
                "frugal:density_schedule=linear,density_steps=9,density_min=0.5",
                "density_min",
            ),
            (
                "frugal-svd:density_schedule=cosine,density_steps=9,rank=4",
                "fixed rank",
            ),
            ("frugal:gap_growth=0.5", "gap_growth"),
            ("frugal:update_gap=100,gap_max=50", "gap_max"),
            ("frugal:plateau_tolerance=-1", "plateau_tolerance"),
        ];
        for (spec, expect) in refused {
            let err = OptimizerConfig::parse_spec(spec)
                .and_then(|c| c.validate())
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{spec}: {err}");
        }
    }
}
