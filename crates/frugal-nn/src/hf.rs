//! Reading Hugging Face model folders: `config.json`, and weights in `model.safetensors` or in
//! the shards that `model.safetensors.index.json` lists.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Reads `dir/config.json` as `T`.
pub fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::file(
            &path,
            format!("cannot read the model configuration ({e}); a Hugging Face model folder has config.json"),
        )
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::file(&path, format!("not a valid model configuration: {e}")))
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// Every tensor of the folder's weights, on the CPU: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json` (each tensor must be in the shard the index names).
pub fn read_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return read_file(&single);
    }
    if !index.exists() {
        return Err(Error::file(
            dir,
            "no model.safetensors and no model.safetensors.index.json: not a Hugging Face model folder with safetensors weights",
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::file(&index, e))?;
    let index_map: ShardIndex = serde_json::from_str(&text)
        .map_err(|e| Error::file(&index, format!("not a safetensors shard index: {e}")))?;
    let mut shards: Vec<&String> = index_map.weight_map.values().collect();
    shards.sort();
    shards.dedup();
    let mut tensors = HashMap::new();
    for shard in shards {
        tensors.extend(read_file(&dir.join(shard))?);
    }
    if let Some(missing) = index_map
        .weight_map
        .iter()
        .find(|(name, _)| !tensors.contains_key(*name))
    {
        return Err(Error::file(
            &dir.join(missing.1),
            format!(
                "the shard index places `{}` here, but the shard has no such tensor",
                missing.0
            ),
        ));
    }
    Ok(tensors)
}

fn read_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::file(path, format!("cannot read model weights: {e}")))
}
