//! Saving and loading the complete optimizer state (moments, subspaces, block cursor, step counts,
//! random-number state) as one safetensors file whose header carries the JSON metadata. A resumed
//! optimizer continues bit-for-bit like an uninterrupted one.

use crate::config::OptimizerConfig;
use crate::error::{Error, Result};
use crate::optimizer::{Frugal, Slot};
use crate::projection::{Axis, Basis, BlockSchedule, Selection, Subspace};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
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
}

#[derive(Serialize, Deserialize)]
struct StateMeta {
    format: u32,
    config: OptimizerConfig,
    step: u64,
    rng: ChaCha8Rng,
    schedule: Option<BlockSchedule>,
    params: Vec<ParamMeta>,
}

fn axis_name(a: Axis) -> &'static str {
    match a {
        Axis::Columns => "columns",
        Axis::Rows => "rows",
        Axis::Entries => "entries",
    }
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn u32_bytes(x: &[u32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn file_err(path: &Path, reason: impl ToString) -> Error {
    Error::StateFile {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Settings that may differ between the saving and the resuming run.
fn structural(c: &OptimizerConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(c).expect("config serialises");
    let obj = v.as_object_mut().expect("config is an object");
    for volatile in ["lr", "check_finite", "preset"] {
        obj.remove(volatile);
    }
    v
}

impl Frugal {
    /// Writes the complete state to `path` atomically (temporary file, fsync, rename).
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut arrays: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut params = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let name = &s.info.name;
            for (suffix, data) in [("m", &s.m), ("v", &s.v)] {
                if !data.is_empty() {
                    arrays.push((
                        format!("{name}::{suffix}"),
                        Dtype::F32,
                        vec![data.len()],
                        f32_bytes(data),
                    ));
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
                        u32_bytes(&sel.idx),
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
                                f32_bytes(data),
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
            });
        }
        let meta = StateMeta {
            format: FORMAT,
            config: self.config.clone(),
            step: self.step,
            rng: self.rng.clone(),
            schedule: self.schedule.clone(),
            params,
        };
        let header = HashMap::from([(
            META_KEY.to_string(),
            serde_json::to_string(&meta).expect("metadata serialises"),
        )]);
        let views = arrays
            .iter()
            .map(|(n, dt, shape, bytes)| {
                Ok((
                    n.clone(),
                    TensorView::new(*dt, shape.clone(), bytes).map_err(|e| file_err(path, e))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, Some(header)).map_err(|e| file_err(path, e))?;
        write_atomically(path, &bytes)
    }

    /// Restores the state saved by [`Frugal::save_state`] into an optimizer built over the same
    /// parameters with the same configuration (the learning rate may differ).
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(path, format!("not a safetensors file ({e})")))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, e))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| file_err(path, "no optimizer metadata in the header"))?;
        let meta: StateMeta =
            serde_json::from_str(json).map_err(|e| file_err(path, format!("bad metadata: {e}")))?;
        if meta.format != FORMAT {
            return Err(file_err(
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
        if meta.params.len() != self.slots.len() {
            return Err(Error::StateMismatch(format!(
                "the state has {} parameters, the model {}",
                meta.params.len(),
                self.slots.len()
            )));
        }
        let f32s = |key: &str| -> Result<Option<Vec<f32>>> {
            read_array(&st, key, Dtype::F32, path).map(|o| {
                o.map(|b| {
                    b.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect()
                })
            })
        };
        let mut restored = Vec::with_capacity(self.slots.len());
        for (slot, p) in self.slots.iter().zip(&meta.params) {
            if slot.info.name == p.name && slot.info.shape != p.shape {
                return Err(Error::ShapeChanged {
                    name: p.name.clone(),
                    expected: p.shape.clone(),
                    found: slot.info.shape.clone(),
                });
            }
            if slot.info.name != p.name {
                return Err(Error::StateMismatch(format!(
                    "parameter `{}` {:?} in the state, `{}` {:?} in the model",
                    p.name, p.shape, slot.info.name, slot.info.shape
                )));
            }
            let name = &p.name;
            let subspace = match &p.subspace {
                SubspaceMeta::All => Subspace::All,
                SubspaceMeta::Nothing => Subspace::Nothing,
                SubspaceMeta::Coords { axis, m, n } => {
                    let axis = match axis.as_str() {
                        "columns" => Axis::Columns,
                        "rows" => Axis::Rows,
                        "entries" => Axis::Entries,
                        other => return Err(file_err(path, format!("unknown axis `{other}`"))),
                    };
                    let idx = read_array(&st, &format!("{name}::idx"), Dtype::U32, path)?
                        .ok_or_else(|| file_err(path, format!("missing indices of `{name}`")))?
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
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
                                    file_err(path, format!("missing {suffix} basis of `{name}`"))
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
            let m = f32s(&format!("{name}::m"))?.unwrap_or_default();
            let v = f32s(&format!("{name}::v"))?.unwrap_or_default();
            let expect = subspace.state_len(slot.info.numel());
            let slots = crate::rules::moment_slots(self.config.state_full);
            if m.len() != if slots >= 1 { expect } else { 0 }
                || v.len() != if slots >= 2 { expect } else { 0 }
            {
                return Err(Error::StateMismatch(format!(
                    "moments of `{name}` have the wrong length"
                )));
            }
            restored.push((subspace, m, v, p.t));
        }
        for (slot, (subspace, m, v, t)) in self.slots.iter_mut().zip(restored) {
            let Slot {
                subspace: s,
                m: sm,
                v: sv,
                t: st,
                ..
            } = slot;
            (*s, *sm, *sv, *st) = (subspace, m, v, t);
        }
        self.step = meta.step;
        self.rng = meta.rng;
        self.schedule = meta.schedule;
        Ok(())
    }
}

fn read_array(
    st: &SafeTensors<'_>,
    key: &str,
    dtype: Dtype,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    match st.tensor(key) {
        Ok(view) if view.dtype() == dtype => Ok(Some(view.data().to_vec())),
        Ok(view) => Err(file_err(
            path,
            format!("`{key}` has dtype {:?}, expected {dtype:?}", view.dtype()),
        )),
        Err(_) => Ok(None),
    }
}

/// Writes `bytes` to a temporary file next to `path`, syncs it and renames it over `path`, so a
/// crash leaves either the old file or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| file_err(path, e))
}
