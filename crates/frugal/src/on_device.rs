//! Parameters stepped by tensor operations ([`Engine::Tensors`]): their moments and subspace
//! tensors live on the parameter's device between steps. The host copy of the moments is the
//! one that subspace changes and checkpoints read and write: they are brought to the host for
//! those ([`Slot::pull`]) and sent back after ([`Slot::push`]).

use crate::config::OptimizerConfig;
use crate::error::{Error, Result};
use crate::kernels::tensor::{self, DeviceSubspace, Rules};
use crate::optimizer::{Frugal, Slot};
use crate::projection::Subspace;
use crate::rules::scaled::Scaled;
use crate::rules::Full;
use candle_core::{Device, Tensor, Var};
use std::borrow::Cow;

/// How the optimizer's element-wise work runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Fused passes over f32 storage on the CPU, state in host memory (CPU parameters).
    Fused,
    /// Candle tensor operations on each parameter's device, state there too (the default for
    /// parameters on a GPU; on the CPU, a check of the device path against the fused one).
    Tensors,
}

/// A parameter's moments and subspace tensors on its device, between steps.
#[derive(Default)]
pub(crate) struct OnDevice {
    pub m: Option<Tensor>,
    pub v: Option<Tensor>,
    pub subspace: Option<DeviceSubspace>,
}

impl OnDevice {
    /// Bytes of the moments held.
    pub fn moment_bytes(&self) -> usize {
        [&self.m, &self.v]
            .into_iter()
            .flatten()
            .map(|t| 4 * t.elem_count())
            .sum()
    }
}

/// `data` as a flat tensor on `device`, or none when empty.
fn upload(data: &[f32], device: &Device) -> candle_core::Result<Option<Tensor>> {
    if data.is_empty() {
        return Ok(None);
    }
    Tensor::from_slice(data, data.len(), device).map(Some)
}

fn download(t: Option<Tensor>) -> candle_core::Result<Vec<f32>> {
    t.map_or(Ok(Vec::new()), |t| t.to_vec1())
}

/// First and second moments on the host (borrowed, or copied from a device).
pub(crate) type HostMoments<'a> = (Cow<'a, [f32]>, Cow<'a, [f32]>);

/// `dev` copied to the host when present, else `host`.
fn host_or_device<'a>(host: &'a [f32], dev: &Option<Tensor>) -> Result<Cow<'a, [f32]>> {
    Ok(match dev {
        Some(t) => Cow::Owned(t.to_vec1()?),
        None => Cow::Borrowed(host),
    })
}

impl Slot {
    /// Moves the moments to the parameter's device and builds the subspace's device tensors.
    /// 8-bit moments stay packed on the host.
    pub(crate) fn push(&mut self) -> Result<()> {
        let device = self.var.device().clone();
        let on = &mut self.device;
        if let Some(m) = upload(&self.m, &device)? {
            on.m = Some(m);
        }
        if let Some(v) = upload(&self.v, &device)? {
            on.v = Some(v);
        }
        (self.m, self.v) = (Vec::new(), Vec::new());
        on.subspace = DeviceSubspace::of(&self.subspace, &device)?;
        Ok(())
    }

    /// Brings the moments back to the host (the subspace's device tensors are dropped).
    pub(crate) fn pull(&mut self) -> Result<()> {
        let on = std::mem::take(&mut self.device);
        if on.m.is_some() {
            self.m = download(on.m)?;
        }
        if on.v.is_some() {
            self.v = download(on.v)?;
        }
        Ok(())
    }

    /// The moments, wherever they are (a host copy of device ones).
    pub(crate) fn host_moments(&self) -> Result<HostMoments<'_>> {
        Ok((
            host_or_device(&self.m, &self.device.m)?,
            host_or_device(&self.v, &self.device.v)?,
        ))
    }
}

impl Frugal {
    /// The engine in force: [`Engine::Fused`] when every parameter is on the CPU, else
    /// [`Engine::Tensors`].
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Switches the engine, moving the state. [`Engine::Fused`] needs every parameter on the
    /// CPU; [`Engine::Tensors`] runs anywhere (on the CPU it checks the device path).
    pub fn set_engine(&mut self, engine: Engine) -> Result<()> {
        if engine == self.engine {
            return Ok(());
        }
        if engine == Engine::Fused {
            if let Some(s) = self.slots.iter().find(|s| !s.var.device().is_cpu()) {
                return Err(Error::UnsupportedTensor {
                    name: s.info.name.clone(),
                    reason: "the fused engine steps CPU tensors; this one is on a GPU".into(),
                });
            }
            let all = vec![true; self.slots.len()];
            self.pull(&all)?;
            self.engine = engine;
        } else {
            self.engine = engine;
            self.push(&vec![true; self.slots.len()])?;
        }
        Ok(())
    }

    /// Brings the device-held state of the marked slots to the host (no-op for the fused
    /// engine).
    pub(crate) fn pull(&mut self, marked: &[bool]) -> Result<()> {
        if self.engine == Engine::Tensors {
            for (slot, _) in self.slots.iter_mut().zip(marked).filter(|(_, m)| **m) {
                slot.pull()?;
            }
        }
        Ok(())
    }

    /// Sends the host state of the marked slots (those this shard owns) back to their devices
    /// (no-op for the fused engine).
    pub(crate) fn push(&mut self, marked: &[bool]) -> Result<()> {
        if self.engine == Engine::Tensors {
            for (slot, _) in self
                .slots
                .iter_mut()
                .zip(marked)
                .filter(|(s, m)| **m && s.owns())
            {
                slot.push()?;
            }
        }
        Ok(())
    }
}

/// One parameter's step by tensor operations with this step's `rules`, or with the scaled
/// rule's settings where it applies (a matrix subspace).
pub(crate) fn step_slot(
    config: &OptimizerConfig,
    slot: &mut Slot,
    g: &Tensor,
    rules: Rules,
    scaled: Option<Scaled>,
) -> Result<()> {
    let piece = slot.piece();
    let Slot {
        info,
        var: whole,
        subspace,
        scaled_norm,
        t,
        packed,
        device,
        ..
    } = slot;
    let failed = |e: candle_core::Error| Error::UnsupportedTensor {
        name: info.name.clone(),
        reason: format!("the step on {:?} failed: {e}", whole.device().location()),
    };
    // A piece of a state-full tensor is stepped as a tensor of its own, then written back.
    let (var, g) = match &piece {
        Some(r) => {
            let piece = whole
                .flatten_all()
                .and_then(|w| w.narrow(0, r.start, r.len()));
            let g = g.flatten_all().and_then(|g| g.narrow(0, r.start, r.len()));
            (
                Var::from_tensor(&piece.map_err(failed)?).map_err(failed)?,
                g.map_err(failed)?,
            )
        }
        None => (whole.clone(), g.clone()),
    };
    let (var, g) = (&var, &g);
    if let Some((pm, pv)) = packed.as_ref() {
        // 8-bit moments are unpacked onto the device for the step and packed again after.
        let (mut m, mut v) = (Vec::new(), Vec::new());
        pm.unpack_into(&mut m);
        pv.unpack_into(&mut v);
        device.m = upload(&m, var.device())?;
        device.v = upload(&v, var.device())?;
    }
    let moments = (&mut device.m, &mut device.v);
    let stepped = match (scaled, &*subspace) {
        (Some(settings), Subspace::Basis(basis)) => tensor::scaled_step(
            settings,
            (var, g),
            (basis, device.subspace.as_ref()),
            moments,
            Full::new(config, 1.0, *t),
            scaled_norm,
        ),
        _ => tensor::step(
            (var, g),
            (subspace, device.subspace.as_ref()),
            moments,
            rules,
        ),
    };
    stepped.map_err(failed)?;
    if let Some(r) = &piece {
        let flat = whole.flatten_all().map_err(failed)?;
        flat.slice_set(var.as_tensor(), 0, r.start)
            .map_err(failed)?;
    }
    if let Some((pm, pv)) = packed {
        pm.pack_from(&download(device.m.take())?);
        pv.pack_from(&download(device.v.take())?);
    }
    Ok(())
}
