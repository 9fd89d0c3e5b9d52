//! Saving and loading the complete optimizer state (moments, subspaces, block cursor, step counts,
//! random-number state) as one safetensors file whose header carries the JSON metadata, or as
//! one such file per shard. A resumed optimizer continues bit-for-bit like an uninterrupted one,
//! however its state was sharded when saved and is sharded when loaded.

use crate::config::{DensitySchedule, MomentStorage, OptimizerConfig};
use crate::error::{Error, Result};
use crate::fs::{file_error, write_atomically_with};
use crate::labels::{ParamInfo, Role};
use crate::on_device::Engine;
use crate::optimizer::{Frugal, Slot};
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
    /// taken in parts must be finished first. A shard (see [`Frugal::shard`]) writes its part
    /// with [`Frugal::save_state_part`] instead.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        if let Some(s) = self.slots.iter().find(|s| !s.owns() || s.piece().is_some()) {
            return Err(Error::StateMismatch(format!(
                "this optimizer is a shard without the state of all of `{}`; save each shard's part with save_state_part and load them together with load_state_parts",
                s.info.name
            )));
        }
        self.save_state_part(path)
    }

    /// Writes the state of what this optimizer owns to `path` atomically: the whole state, or
    /// one shard's part of it. The parts of every shard load together with
    /// [`Frugal::load_state_parts`].
    pub fn save_state_part(&self, path: &Path) -> Result<()> {
        // Streamed to the file from the state itself: no copy of the state in memory.
        let (header, arrays) = self.contents()?;
        let views = views(&arrays, path)?;
        write_atomically_with(path, |tmp| {
            safetensors::serialize_to_file(views, Some(header), tmp)
                .map_err(|e| file_error(path, e))
        })
    }

    /// The bytes [`Frugal::save_state_part`] writes, for another process to write them.
    pub fn owned_state(&self) -> Result<Vec<u8>> {
        let path = Path::new("(owned state)");
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
    /// only its own part.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        self.load_state_parts(&[path])
    }

    /// Restores a state saved in parts, one per shard ([`Frugal::save_state_part`]), given in
    /// any order: together they hold every parameter's state once, all of one step. The
    /// loading optimizer need not be sharded like the saving ones: whole, or a shard of any
    /// plan, it reads only the elements it owns, cutting and joining the saved pieces.
    pub fn load_state_parts<P: AsRef<Path>>(&mut self, paths: &[P]) -> Result<()> {
        // Mapped, not read: a shard touches only the pages of what it owns.
        let maps = paths
            .iter()
            .map(|p| map_file(p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let files = maps
            .iter()
            .zip(paths)
            .map(|(bytes, p)| self.parse(bytes, p.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = files.first() else {
            return Err(Error::StateMismatch("no state file was given".into()));
        };
        for f in &files[1..] {
            if f.position() != first.position() {
                return Err(Error::StateMismatch(format!(
                    "{} (step {}) and {} (step {}) are parts of different states; load the parts of one checkpoint",
                    first.path.display(),
                    first.meta.step,
                    f.path.display(),
                    f.meta.step
                )));
            }
        }
        let located = self.locate(&files)?;
        let mut restored = Vec::with_capacity(self.slots.len());
        for (slot, pieces) in self.slots.iter().zip(&located) {
            let Some(need) = slot.owned.clone() else {
                restored.push(None); // another shard's
                continue;
            };
            let mut state: Option<Restored> = None;
            for (f, p, range) in pieces {
                let want = range.start.max(need.start)..range.end.min(need.end);
                if want.is_empty() {
                    continue;
                }
                let file = &files[*f];
                let piece =
                    file.read(&file.meta.params[*p], range, &slot.info, &self.config, want)?;
                state = Some(match state {
                    None => piece,
                    Some(s) => s.append(piece),
                });
            }
            restored.push(state);
        }
        for (slot, state) in self.slots.iter_mut().zip(restored) {
            let Some(state) = state else {
                continue;
            };
            let Slot {
                subspace: s,
                m: sm,
                v: sv,
                packed: sp,
                t: st,
                scaled_norm: sn,
                owned,
                device,
                ..
            } = slot;
            (*s, *sm, *sv, *sp, *st, *sn, *owned, *device) = (
                state.subspace,
                state.m,
                state.v,
                state.packed,
                state.t,
                state.scaled_norm,
                Some(state.range),
                Default::default(),
            );
            if self.engine == Engine::Tensors {
                slot.push()?;
            }
        }
        let meta = &first.meta;
        self.step = meta.step;
        self.rng = meta.rng.clone();
        self.schedule = meta.schedule.clone();
        self.gap = meta
            .gap
            .clone()
            .unwrap_or_else(|| UpdateGap::fixed_at(&self.config, meta.step));
        Ok(())
    }

    /// Reads the header of a state file and checks it against this optimizer's settings.
    fn parse<'a>(&self, bytes: &'a [u8], path: &'a Path) -> Result<StateFile<'a>> {
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
        if meta.gap.as_ref().is_some_and(|g| g.gap == 0) {
            return Err(file_error(path, "the saved update gap is 0"));
        }
        let fixed = self.config.density_schedule == DensitySchedule::Constant;
        check_schedule(&meta.schedule, &self.schedule, fixed)
            .map_err(|e| Error::StateMismatch(format!("block schedule: {e}")))?;
        Ok(StateFile { meta, st, path })
    }

    /// Where `files` hold each parameter's state, in element order, covering every parameter
    /// exactly once.
    fn locate(&self, files: &[StateFile<'_>]) -> Result<Vec<Vec<Held>>> {
        let index: HashMap<&str, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(k, s)| (s.info.name.as_str(), k))
            .collect();
        let mut located = vec![Vec::new(); self.slots.len()];
        for (f, file) in files.iter().enumerate() {
            for (p, saved) in file.meta.params.iter().enumerate() {
                let Some(&k) = index.get(saved.name.as_str()) else {
                    return Err(Error::StateMismatch(format!(
                        "{} holds the state of `{}` {:?}, a parameter the model lacks",
                        file.path.display(),
                        saved.name,
                        saved.shape
                    )));
                };
                let info = &self.slots[k].info;
                if info.shape != saved.shape {
                    return Err(Error::ShapeChanged {
                        name: saved.name.clone(),
                        expected: saved.shape.clone(),
                        found: info.shape.clone(),
                    });
                }
                located[k].push((f, p, file.range(saved, info.numel())?));
            }
        }
        for (slot, pieces) in self.slots.iter().zip(&mut located) {
            let name = &slot.info.name;
            if pieces.is_empty() {
                let names: Vec<&str> = files[0]
                    .meta
                    .params
                    .iter()
                    .map(|p| p.name.as_str())
                    .take(3)
                    .collect();
                return Err(Error::StateMismatch(format!(
                    "the model's parameter `{name}` {:?} is not in the state (it has e.g. {})",
                    slot.info.shape,
                    names.join(", ")
                )));
            }
            pieces.sort_by_key(|(_, _, r)| r.start);
            let mut end = 0;
            for (_, _, r) in pieces.iter() {
                if r.start != end {
                    let problem = if r.start < end {
                        "holds some of its elements twice"
                    } else {
                        "lacks some of its elements: a shard's part is missing"
                    };
                    return Err(Error::StateMismatch(format!(
                        "the state of `{name}` {problem} (load every part of one state together)"
                    )));
                }
                end = r.end;
            }
            if end != slot.info.numel() {
                return Err(Error::StateMismatch(format!(
                    "the state of `{name}` lacks its elements from {end} on: a shard's part is missing (load every part of one state together)"
                )));
            }
        }
        Ok(located)
    }
}

/// Where a file holds some of a parameter's state: the file, the parameter of the file, and the
/// elements.
type Held = (usize, usize, Range<usize>);

/// The bytes of the file at `path`, mapped.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    // SAFETY: checkpoints are replaced by atomic renames, never rewritten in place, so the
    // mapped file does not change while it is read.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_error(path, e))
}

/// One state file (a whole state or a shard's part), its header checked.
struct StateFile<'a> {
    meta: StateMeta,
    st: SafeTensors<'a>,
    path: &'a Path,
}

impl<'a> StateFile<'a> {
    /// The optimizer's own position (step, random state, schedules), equal in every part of
    /// one state.
    fn position(&self) -> serde_json::Value {
        let m = &self.meta;
        serde_json::json!([m.step, m.rng, m.schedule, m.gap])
    }

    /// The elements whose state `p` holds, of a parameter of `numel` elements.
    fn range(&self, p: &ParamMeta, numel: usize) -> Result<Range<usize>> {
        match p.piece {
            None => Ok(0..numel),
            Some([a, b])
                if a < b
                    && b <= numel
                    && a.is_multiple_of(quant::BLOCK)
                    && matches!(p.subspace, SubspaceMeta::All) =>
            {
                Ok(a..b)
            }
            Some(piece) => Err(file_error(
                self.path,
                format!("`{}` has an impossible piece {piece:?}", p.name),
            )),
        }
    }

    /// The bytes of array `key`, checked to be of `dtype`; none when absent.
    fn bytes(&self, key: &str, dtype: Dtype) -> Result<Option<&'a [u8]>> {
        match self.st.tensor(key) {
            Ok(view) if view.dtype() == dtype => Ok(Some(view.data())),
            Ok(view) => Err(file_error(
                self.path,
                format!("`{key}` has dtype {:?}, expected {dtype:?}", view.dtype()),
            )),
            Err(SafeTensorError::TensorNotFound(_)) => Ok(None),
            Err(e) => Err(file_error(self.path, format!("`{key}`: {e}"))),
        }
    }

    /// The f32 values of array `key`; none when absent.
    fn f32s(&self, key: &str) -> Result<Option<Vec<f32>>> {
        Ok(self.bytes(key, Dtype::F32)?.map(f32_values))
    }

    /// The state of `p`, which holds the elements `range` of its parameter `info`, for the
    /// elements `want` (within `range`; a projected parameter's state is read whole).
    fn read(
        &self,
        p: &ParamMeta,
        range: &Range<usize>,
        info: &ParamInfo,
        config: &OptimizerConfig,
        want: Range<usize>,
    ) -> Result<Restored> {
        let (name, path) = (&p.name, self.path);
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
                let idx = self
                    .bytes(&format!("{name}::idx"), Dtype::U32)?
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
                let part =
                    |suffix: &str, rank: &Option<usize>| -> Result<Option<(Vec<f32>, usize)>> {
                        match rank {
                            None => Ok(None),
                            Some(r) => Ok(Some((
                                self.f32s(&format!("{name}::{suffix}"))?.ok_or_else(|| {
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
        check_subspace(info, &subspace)
            .map_err(|e| Error::StateMismatch(format!("parameter `{name}`: {e}")))?;
        // The saved moments' length, and the values of them to keep.
        let (expect, keep) = match subspace {
            Subspace::All => (
                range.len(),
                want.start - range.start..want.end - range.start,
            ),
            _ => {
                let len = subspace.state_len(info.numel());
                (len, 0..len)
            }
        };
        let slots = crate::rules::moment_slots(config.state_full);
        let lens = [
            if slots >= 1 { expect } else { 0 },
            if slots >= 2 { expect } else { 0 },
        ];
        let wrong = || Error::StateMismatch(format!("moments of `{name}` have the wrong length"));
        let kept = |len: usize| if len == 0 { 0..0 } else { keep.clone() };
        let (m, v, packed) = match config.moment_storage {
            MomentStorage::F32 => {
                let mut moments = [Vec::new(), Vec::new()];
                for ((suffix, len), out) in ["m", "v"].into_iter().zip(lens).zip(&mut moments) {
                    let bytes = self
                        .bytes(&format!("{name}::{suffix}"), Dtype::F32)?
                        .unwrap_or_default();
                    if bytes.len() != 4 * len {
                        return Err(wrong());
                    }
                    let r = kept(len);
                    *out = f32_values(&bytes[4 * r.start..4 * r.end]);
                }
                let [m, v] = moments;
                (m, v, None)
            }
            MomentStorage::Bits8 => {
                let read = |suffix: &str, len: usize, code: Code| -> Result<Packed> {
                    let codes = self
                        .bytes(&format!("{name}::{suffix}.codes"), Dtype::U8)?
                        .unwrap_or_default();
                    let scales = self
                        .bytes(&format!("{name}::{suffix}.scales"), Dtype::F32)?
                        .unwrap_or_default();
                    if codes.len() != len || scales.len() != 4 * len.div_ceil(quant::BLOCK) {
                        return Err(wrong());
                    }
                    let r = kept(len);
                    let blocks = r.start / quant::BLOCK..r.end.div_ceil(quant::BLOCK);
                    Ok(Packed {
                        codes: codes[r].to_vec(),
                        scales: f32_values(&scales[4 * blocks.start..4 * blocks.end]),
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
        let range = match subspace {
            Subspace::All => want,
            _ => range.clone(),
        };
        Ok(Restored {
            subspace,
            m,
            v,
            packed,
            range,
            t: p.t,
            scaled_norm: p.scaled_norm,
        })
    }
}

/// Little-endian f32 values.
fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
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
    /// This state followed by `next`'s, of the elements after this one's.
    fn append(mut self, next: Restored) -> Restored {
        self.m.extend(next.m);
        self.v.extend(next.v);
        if let (Some((pm, pv)), Some((nm, nv))) = (&mut self.packed, &next.packed) {
            pm.append(nm);
            pv.append(nv);
        }
        self.range.end = next.range.end;
        self
    }
}
