//! Token shards: tokenized text cached on disk as a small header plus little-endian u32 ids,
//! memory-mapped for reading, written atomically.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::io::Write;
use std::path::Path;

const MAGIC: &[u8; 8] = b"FRGTOK01";
const HEADER: usize = 16;

/// A read-only, memory-mapped sequence of token ids.
pub struct TokenShard {
    map: Mmap,
    len: usize,
}

impl TokenShard {
    /// Writes `tokens` to `path` (temporary file + rename).
    pub fn write(path: &Path, tokens: &[u32]) -> Result<()> {
        let tmp = frugal::fs::temp_path(path);
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        f.write_all(MAGIC)?;
        f.write_all(&(tokens.len() as u64).to_le_bytes())?;
        for t in tokens {
            f.write_all(&t.to_le_bytes())?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Opens a shard, checking its header and size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open token shard {}", path.display()))?;
        // SAFETY: shards are written once under a temporary name and renamed; nothing modifies them
        // in place while mapped.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            bail!(
                "{} is not a token shard; delete it to rebuild the cache",
                path.display()
            );
        }
        let len = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes")) as usize;
        if map.len() != HEADER + 4 * len {
            bail!(
                "token shard {} is truncated; delete it to rebuild the cache",
                path.display()
            );
        }
        Ok(TokenShard { map, len })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the shard holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Token `i`.
    #[inline]
    pub fn get(&self, i: usize) -> u32 {
        let at = HEADER + 4 * i;
        u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Tokens `start..start + n`.
    pub fn range(&self, start: usize, n: usize) -> Vec<u32> {
        (start..start + n).map(|i| self.get(i)).collect()
    }
}

/// FNV-1a 64-bit: a small stable hash for cache keys.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// Initial FNV-1a state.
pub const FNV_OFFSET: u64 = 0xcbf29ce484222325;
