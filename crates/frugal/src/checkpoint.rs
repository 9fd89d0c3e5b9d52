//! Saving and loading the complete optimizer state (moments, subspaces, block cursor, step counts,
//! random-number state) as one safetensors file whose header carries the JSON metadata. A resumed
//! optimizer continues bit-for-bit like an uninterrupted one.

use crate::config::{DensitySchedule, MomentStorage, OptimizerConfig};
use crate::error::{Error, Result};
use crate::fs::{file_error, write_atomically_with};
use crate::labels::{ParamInfo, Role};
use crate::on_device::Engine;
use crate::optimizer::{cut_moments, Frugal, Slot};
use crate::projection::{Axis, Basis, BlockSchedule, Selection, Subspace};
use crate::quant::{self, Code, Packed};
use crate::update_gap::UpdateGap;
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::{SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

const FORMAT: u32 = 1;
const META_KEY: &str = "frugal";

/// How a subspace is described in the metadata (its arrays are tensors of the file).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum SubspaceMeta {
    All,
    Nothing,
    Coords {
        axis: String,
        m: usize,
        n: usize,
    },
    Basis {
        m: usize,
        n: usize,
        left_rank: Option<usize>,
        right_rank: Option<usize>,
    },
}

#[derive(Serialize, Deserialize)]
struct ParamMeta {
    name: String,
    shape: Vec<usize>,
    t: u64,
    subspace: SubspaceMeta,
    /// The norm-growth limiter's record (scaled state-free rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scaled_norm: Option<f32>,
    /// The elements whose state a shard's part holds (absent: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    piece: Option<[usize; 2]>,
}

#[derive(Serialize, Deserialize)]
struct StateMeta {
    format: u32,
    config: OptimizerConfig,
    step: u64,
    rng: ChaCha8Rng,
    schedule: Option<BlockSchedule>,
    /// Absent in states saved before T could grow: T was fixed then.
    #[serde(default)]
    gap: Option<UpdateGap>,
    params: Vec<ParamMeta>,
}

fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Columns => "columns",
        Axis::Rows => "rows",
        Axis::Entries => "entries",
    }
}

/// Values as the file's little-endian bytes: borrowed, not copied, on a little-endian machine.
fn le_bytes<'a, T: bytemuck::Pod + ToLeBytes>(x: Cow<'a, [T]>) -> Cow<'a, [u8]> {
    match x {
        Cow::Borrowed(x) if cfg!(target_endian = "little") => {
            Cow::Borrowed(bytemuck::cast_slice(x))
        }
        x => Cow::Owned(x.iter().flat_map(|v| v.le_bytes()).collect()),
    }
}

/// The little-endian bytes of a 4-byte value.
trait ToLeBytes {
    fn le_bytes(&self) -> [u8; 4];
}

impl ToLeBytes for f32 {
    fn le_bytes(&self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

impl ToLeBytes for u32 {
    fn le_bytes(&self) -> [u8; 4] {
        self.to_le_bytes()
    }
}

/// One array of a state file: its name, dtype, shape and bytes.
type Array<'a> = (String, Dtype, Vec<usize>, Cow<'a, [u8]>);

/// The arrays as safetensors views.
fn views<'a>(arrays: &'a [Array<'_>], path: &Path) -> Result<Vec<(String, TensorView<'a>)>> {
    arrays
        .iter()
        .map(|(n, dt, shape, bytes)| {
            Ok((
                n.clone(),
                TensorView::new(*dt, shape.clone(), bytes).map_err(|e| file_error(path, e))?,
            ))
        })
        .collect()
}

/// The settings that must agree between the saving and the resuming run: all but the learning
/// rate, the finiteness check and the preset's name. The name patterns are left out too: what
/// they decide, each parameter's role, is checked parameter by parameter.
fn structural(c: &OptimizerConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        for volatile in [
            "lr",
            "check_finite",
            "preset",
            "projectable_modules",
            "state_full_modules",
            "state_free_modules",
        ] {
            obj.remove(volatile);
        }
    }
    v
}

/// Checks a saved subspace against the parameter it is restored into, so that a damaged or
/// crafted file gives an error instead of out-of-bounds indexing later.
fn check_subspace(info: &ParamInfo, sub: &Subspace) -> std::result::Result<(), String> {
    let (m, n) = info.matrix_dims();
    if info.role == Role::StateFull && *sub != Subspace::All {
        return Err("it is state-full in this model but projected in the state".into());
    }
    if info.role == Role::StateFree && *sub != Subspace::Nothing {
        return Err("it is state-free in this model but has state in the file".into());
    }
    match sub {
        Subspace::All | Subspace::Nothing => Ok(()),
        Subspace::Coords(sel) => {
            let bound = match sel.axis {
                Axis::Columns => n,
                Axis::Rows => m,
                Axis::Entries => m * n,
            };
            if (sel.m, sel.n) != (m, n) {
                return Err(format!("its selection is for a {}×{} matrix", sel.m, sel.n));
            }
            if !sel.idx.windows(2).all(|w| w[0] < w[1]) {
                return Err("its selected indices are not sorted and distinct".into());
            }
            if sel.idx.last().is_some_and(|&i| i as usize >= bound) {
                return Err(format!("a selected index is ≥ {bound}"));
            }
            Ok(())
        }
        Subspace::Basis(b) => {
            if (b.m, b.n) != (m, n) {
                return Err(format!("its basis is for a {}×{} matrix", b.m, b.n));
            }
            if b.left.is_none() && b.right.is_none() {
                return Err("its basis has no factor".into());
            }
            for (side, part, dim) in [("left", &b.left, m), ("right", &b.right, n)] {
                if let Some((data, r)) = part {
                    if *r == 0 || *r > dim || data.len() != r * dim {
                        return Err(format!(
                            "its {side} factor has rank {r} and {} values for dimension {dim}",
                            data.len()
                        ));
                    }
                }
            }
            Ok(())
        }
    }
}

/// Checks a saved block schedule against the optimizer's.
/// Checks a saved block schedule against ours; `fixed`: the density is constant, so the active
/// counts must agree too (a decaying density changes it between periods).
fn check_schedule(
    saved: &Option<BlockSchedule>,
    ours: &Option<BlockSchedule>,
    fixed: bool,
) -> std::result::Result<(), String> {
    match (saved, ours) {
        (None, None) => Ok(()),
        (Some(s), Some(o)) => {
            let last = s.blocks.saturating_sub(1);
            let counts_differ = if fixed {
                s.active_count != o.active_count
            } else {
                s.active_count > s.blocks
            };
            if s.blocks != o.blocks || counts_differ {
                Err(format!(
                    "the state has {} blocks ({} active), the model {} ({} active)",
                    s.blocks, s.active_count, o.blocks, o.active_count
                ))
            } else if s.front > last || s.back > last {
                Err("the block cursors are out of range".into())
            } else {
                Ok(())
            }
        }
        _ => Err("the block schedule does not match the projection".into()),
    }
}

impl Frugal {
    /// Writes the complete state to `path` atomically (temporary file, fsync, rename). A step
    /// taken in parts must be finished first; a [`Frugal::shard`] must first hold the state of
    /// every parameter (see [`Frugal::absorb_state`]).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        if let Some(s) = self.slots.iter().find(|s| !s.owns() || s.piece().is_some()) {
            return Err(Error::StateMismatch(format!(
                "this optimizer is a shard without the state of `{}`; absorb the other shards' states before saving",
                s.info.name
            )));
        }
        // Streamed to the file from the state itself: no copy of the state in memory.
        let (header, arrays) = self.contents()?;
        let views = views(&arrays, path)?;
        write_atomically_with(path, |tmp| {
            safetensors::serialize_to_file(views, Some(header), tmp)
                .map_err(|e| file_error(path, e))
        })
    }

    /// The state of the parameters this shard owns (see [`Frugal::shard`]), in the format of
    /// [`Frugal::save_state`], for [`Frugal::absorb_state`] of another shard.
    pub fn owned_state(&self) -> Result<Vec<u8>> {
        self.serialize(Path::new("(owned state)"))
    }

    /// The state of the owned parameters, as a safetensors file's bytes.
    fn serialize(&self, path: &Path) -> Result<Vec<u8>> {
        let (header, arrays) = self.contents()?;
        safetensors::serialize(views(&arrays, path)?, Some(header)).map_err(|e| file_error(path, e))
    }

    /// The header and the arrays of the owned parameters' state.
    fn contents(&self) -> Result<(HashMap<String, String>, Vec<Array<'_>>)> {
        if self.step_is_open() {
            return Err(Error::StepInParts(
                "the state cannot be saved in the middle of a step; call finish_step first".into(),
            ));
        }
        let mut arrays: Vec<Array> = Vec::new();
        let mut params = Vec::with_capacity(self.slots.len());
        for s in self.slots.iter().filter(|s| s.owns()) {
            let name = &s.info.name;
            let (m, v) = s.host_moments()?;
            for (suffix, data) in [("m", m), ("v", v)] {
                if !data.is_empty() {
                    arrays.push((
                        format!("{name}::{suffix}"),
                        Dtype::F32,
                        vec![data.len()],
                        le_bytes(data),
                    ));
                }
            }
            if let Some((pm, pv)) = &s.packed {
                for (suffix, p) in [("m", pm), ("v", pv)] {
                    if !p.is_empty() {
                        arrays.push((
                            format!("{name}::{suffix}.codes"),
                            Dtype::U8,
                            vec![p.len()],
                            Cow::Borrowed(&p.codes),
                        ));
                        arrays.push((
                            format!("{name}::{suffix}.scales"),
                            Dtype::F32,
                            vec![p.scales.len()],
                            le_bytes(Cow::Borrowed(&p.scales)),
                        ));
                    }
                }
            }
            let subspace = match &s.subspace {
                Subspace::All => SubspaceMeta::All,
                Subspace::Nothing => SubspaceMeta::Nothing,
                Subspace::Coords(sel) => {
                    arrays.push((
                        format!("{name}::idx"),
                        Dtype::U32,
                        vec![sel.idx.len()],
                        le_bytes(Cow::Borrowed(&sel.idx)),
                    ));
                    SubspaceMeta::Coords {
                        axis: axis_name(sel.axis).into(),
                        m: sel.m,
                        n: sel.n,
                    }
                }
                Subspace::Basis(b) => {
                    for (suffix, part) in [("left", &b.left), ("right", &b.right)] {
                        if let Some((data, _)) = part {
                            arrays.push((
                                format!("{name}::{suffix}"),
                                Dtype::F32,
                                vec![data.len()],
                                le_bytes(Cow::Borrowed(data)),
                            ));
                        }
                    }
                    SubspaceMeta::Basis {
                        m: b.m,
                        n: b.n,
                        left_rank: b.left.as_ref().map(|x| x.1),
                        right_rank: b.right.as_ref().map(|x| x.1),
                    }
                }
            };
            params.push(ParamMeta {
                name: name.clone(),
                shape: s.info.shape.clone(),
                t: s.t,
                subspace,
                scaled_norm: s.scaled_norm,
                piece: s.piece().map(|r| [r.start, r.end]),
            });
        }
        let meta = StateMeta {
            format: FORMAT,
            config: self.config.clone(),
            step: self.step,
            rng: self.rng.clone(),
            schedule: self.schedule.clone(),
            gap: Some(self.gap.clone()),
            params,
        };
        let header = HashMap::from([(
            META_KEY.to_string(),
            serde_json::to_string(&meta).expect("metadata serialises"),
        )]);
        Ok((header, arrays))
    }

    /// Restores the state saved by [`Frugal::save_state`] into an optimizer built over the same
    /// parameters with the same configuration (the learning rate may differ). A shard reads
    /// only its own parameters' part.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
        // Mapped, not read: a shard touches only the pages of its own parameters.
        // SAFETY: checkpoints are replaced by atomic renames, never rewritten in place, so the
        // mapped file does not change while it is read.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(path, e))?;
        self.restore(&bytes, path, true)
    }

    /// Takes over the state of the parameters in `bytes` (another shard's
    /// [`Frugal::owned_state`]), which this shard then owns; a piece of a split tensor joins
    /// the adjoining piece held here. Gathering every shard's state into one, in rank order,
    /// makes a whole optimizer that can be saved.
    pub fn absorb_state(&mut self, bytes: &[u8]) -> Result<()> {
        self.restore(bytes, Path::new("(a shard's state)"), false)
    }

    /// Restores the parameters of the state in `bytes`: every parameter and the optimizer's
    /// own position (step, random state, schedules) when `whole`, else the parameters it holds.
    fn restore(&mut self, bytes: &[u8], path: &Path, whole: bool) -> Result<()> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| file_error(path, format!("not a safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| file_error(path, e))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| file_error(path, "no optimizer metadata in the header"))?;
        let meta: StateMeta = serde_json::from_str(json)
            .map_err(|e| file_error(path, format!("bad metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(file_error(
                path,
                format!(
                    "format {} is not supported (expected {FORMAT})",
                    meta.format
                ),
            ));
        }
        if structural(&meta.config) != structural(&self.config) {
            return Err(Error::StateMismatch(format!(
                "the state was saved with optimizer settings {} but this optimizer has {}",
                structural(&meta.config),
                structural(&self.config)
            )));
        }
        if whole && meta.params.len() != self.slots.len() {
            return Err(Error::StateMismatch(format!(
                "the state has {} parameters, the model {}",
                meta.params.len(),
                self.slots.len()
            )));
        }
        if meta.gap.as_ref().is_some_and(|g| g.gap == 0) {
            return Err(file_error(path, "the saved update gap is 0"));
        }
        let fixed = self.config.density_schedule == DensitySchedule::Constant;
        check_schedule(&meta.schedule, &self.schedule, fixed)
            .map_err(|e| Error::StateMismatch(format!("block schedule: {e}")))?;
        let saved: HashMap<&str, &ParamMeta> =
            meta.params.iter().map(|p| (p.name.as_str(), p)).collect();
        let f32s = |key: &str| -> Result<Option<Vec<f32>>> {
            read_array(&st, key, Dtype::F32, path).map(|o| {
                o.map(|b| {
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
            })
        };
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let p = saved.get(slot.info.name.as_str());
            if p.is_none() && !whole {
                restored.push(None);
                continue;
            }
            let Some(p) = p else {
                let names: Vec<&str> = saved.keys().copied().take(3).collect();
                return Err(Error::StateMismatch(format!(
                    "the model's parameter `{}` {:?} is not in the state (it has e.g. {})",
                    slot.info.name,
                    slot.info.shape,
                    names.join(", ")
                )));
            };
            if slot.info.shape != p.shape {
                return Err(Error::ShapeChanged {
                    name: p.name.clone(),
                    expected: p.shape.clone(),
                    found: slot.info.shape.clone(),
                });
            }
            if whole && !slot.owns() {
                restored.push(None); // another shard's
                continue;
            }
            let range = match p.piece {
                None => 0..slot.info.numel(),
                Some(_) if whole => {
                    return Err(file_error(
                        path,
                        format!(
                            "`{}` holds a shard's part of its state, not all of it",
                            p.name
                        ),
                    ))
                }
                Some([a, b])
                    if a < b
                        && b <= slot.info.numel()
                        && matches!(p.subspace, SubspaceMeta::All) =>
                {
                    a..b
                }
                Some(piece) => {
                    return Err(file_error(
                        path,
                        format!("`{}` has an impossible piece {piece:?}", p.name),
                    ))
                }
            };
            let name = &p.name;
            let subspace = match &p.subspace {
                SubspaceMeta::All => Subspace::All,
                SubspaceMeta::Nothing => Subspace::Nothing,
                SubspaceMeta::Coords { axis, m, n } => {
                    let axis = match axis.as_str() {
                        "columns" => Axis::Columns,
                        "rows" => Axis::Rows,
                        "entries" => Axis::Entries,
                        other => return Err(file_error(path, format!("unknown axis `{other}`"))),
                    };
                    let idx = read_array(&st, &format!("{name}::idx"), Dtype::U32, path)?
                        .ok_or_else(|| file_error(path, format!("missing indices of `{name}`")))?
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    Subspace::Coords(Selection {
                        axis,
                        idx,
                        m: *m,
                        n: *n,
                    })
                }
                SubspaceMeta::Basis {
                    m,
                    n,
                    left_rank,
                    right_rank,
                } => {
                    let part = |suffix: &str,
                                rank: &Option<usize>|
                     -> Result<Option<(Vec<f32>, usize)>> {
                        match rank {
                            None => Ok(None),
                            Some(r) => Ok(Some((
                                f32s(&format!("{name}::{suffix}"))?.ok_or_else(|| {
                                    file_error(path, format!("missing {suffix} basis of `{name}`"))
                                })?,
                                *r,
                            ))),
                        }
                    };
                    Subspace::Basis(Basis {
                        m: *m,
                        n: *n,
                        left: part("left", left_rank)?,
                        right: part("right", right_rank)?,
                    })
                }
            };
            check_subspace(&slot.info, &subspace)
                .map_err(|e| Error::StateMismatch(format!("parameter `{name}`: {e}")))?;
            let expect = match subspace {
                Subspace::All => range.len(),
                _ => subspace.state_len(slot.info.numel()),
            };
            let slots = crate::rules::moment_slots(self.config.state_full);
            let lens = [
                if slots >= 1 { expect } else { 0 },
                if slots >= 2 { expect } else { 0 },
            ];
            let wrong =
                || Error::StateMismatch(format!("moments of `{name}` have the wrong length"));
            let (m, v, packed) = match self.config.moment_storage {
                MomentStorage::F32 => {
                    let m = f32s(&format!("{name}::m"))?.unwrap_or_default();
                    let v = f32s(&format!("{name}::v"))?.unwrap_or_default();
                    if [m.len(), v.len()] != lens {
                        return Err(wrong());
                    }
                    (m, v, None)
                }
                MomentStorage::Bits8 => {
                    let read = |suffix: &str, len: usize, code: Code| -> Result<Packed> {
                        let codes =
                            read_array(&st, &format!("{name}::{suffix}.codes"), Dtype::U8, path)?
                                .unwrap_or_default();
                        let scales = f32s(&format!("{name}::{suffix}.scales"))?.unwrap_or_default();
                        if codes.len() != len || scales.len() != len.div_ceil(quant::BLOCK) {
                            return Err(wrong());
                        }
                        Ok(Packed {
                            codes,
                            scales,
                            code,
                        })
                    };
                    let packed = (
                        read("m", lens[0], Code::Signed)?,
                        read("v", lens[1], Code::Unsigned)?,
                    );
                    (Vec::new(), Vec::new(), Some(packed))
                }
            };
            let state = Restored {
                subspace,
                m,
                v,
                packed,
                range,
                t: p.t,
                scaled_norm: p.scaled_norm,
            };
            restored.push(Some(match slot.piece() {
                Some(piece) if whole => state.cut(&piece),
                _ => state,
            }));
        }
        if !whole && restored.iter().flatten().count() != meta.params.len() {
            return Err(Error::StateMismatch(
                "the state names a parameter twice or one the model lacks".into(),
            ));
        }
        for (slot, restored) in self.slots.iter_mut().zip(restored) {
            let Some(state) = restored else {
                continue;
            };
            if self.engine == Engine::Tensors {
                slot.pull()?;
            }
            let state = match slot.owned.clone() {
                Some(held) if !whole && state.range != held && held.len() != slot.info.numel() => {
                    state.join(slot, &held)?
                }
                _ => state,
            };
            let Slot {
                subspace: s,
                m: sm,
                v: sv,
                packed: sp,
                t: st,
                scaled_norm: sn,
                owned,
                ..
            } = slot;
            (*s, *sm, *sv, *sp, *st, *sn) = (
                state.subspace,
                state.m,
                state.v,
                state.packed,
                state.t,
                state.scaled_norm,
            );
            *owned = Some(state.range);
            if self.engine == Engine::Tensors {
                slot.device = Default::default();
                if whole {
                    slot.push()?;
                } else {
                    // Gathered to be saved: the device keeps only this shard's own state.
                    slot.device.on_host = true;
                }
            }
        }
        if !whole {
            return Ok(());
        }
        self.step = meta.step;
        self.rng = meta.rng;
        self.schedule = meta.schedule;
        self.gap = meta
            .gap
            .unwrap_or_else(|| UpdateGap::fixed_at(&self.config, meta.step));
        Ok(())
    }
}

/// One parameter's state read from a file, for the elements in `range`.
struct Restored {
    subspace: Subspace,
    m: Vec<f32>,
    v: Vec<f32>,
    packed: Option<(Packed, Packed)>,
    range: Range<usize>,
    t: u64,
    scaled_norm: Option<f32>,
}

impl Restored {
    /// The state of the elements in `piece` (within `self.range`; a whole tensor's state).
    fn cut(mut self, piece: &Range<usize>) -> Restored {
        if self.subspace != Subspace::All {
            return self;
        }
        let local = piece.start - self.range.start..piece.end - self.range.start;
        cut_moments((&mut self.m, &mut self.v, &mut self.packed), &local);
        self.range = piece.clone();
        self
    }

    /// This piece joined to the adjacent piece `held` that `slot` holds (its moments on the
    /// host), in element order.
    fn join(mut self, slot: &mut Slot, held: &Range<usize>) -> Result<Restored> {
        let mine = (
            std::mem::take(&mut self.m),
            std::mem::take(&mut self.v),
            self.packed.take(),
        );
        let (first, second, range) = if held.end == self.range.start {
            (take_moments(slot), mine, held.start..self.range.end)
        } else if self.range.end == held.start {
            (mine, take_moments(slot), self.range.start..held.end)
        } else {
            return Err(Error::StateMismatch(format!(
                "the piece {:?} of `{}` does not adjoin the piece {held:?} held",
                self.range, slot.info.name
            )));
        };
        let ((mut m, mut v, mut packed), (m2, v2, packed2)) = (first, second);
        m.extend(m2);
        v.extend(v2);
        if let (Some((pm, pv)), Some((pm2, pv2))) = (&mut packed, &packed2) {
            pm.append(pm2);
            pv.append(pv2);
        }
        Ok(Restored {
            m,
            v,
            packed,
            range,
            ..self
        })
    }
}

/// f32 moments and 8-bit moments.
type Moments = (Vec<f32>, Vec<f32>, Option<(Packed, Packed)>);

/// The moments `slot` holds on the host, taken out of it.
fn take_moments(slot: &mut Slot) -> Moments {
    (
        std::mem::take(&mut slot.m),
        std::mem::take(&mut slot.v),
        slot.packed.take(),
    )
}

fn read_array(
    st: &SafeTensors<'_>,
    key: &str,
    dtype: Dtype,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    match st.tensor(key) {
        Ok(view) if view.dtype() == dtype => Ok(Some(view.data().to_vec())),
        Ok(view) => Err(file_error(
            path,
            format!("`{key}` has dtype {:?}, expected {dtype:?}", view.dtype()),
        )),
        Err(SafeTensorError::TensorNotFound(_)) => Ok(None),
        Err(e) => Err(file_error(path, format!("`{key}`: {e}"))),
    }
}
