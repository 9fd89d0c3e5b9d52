//! Token shards: tokenized text cached on disk as a small header plus little-endian u32 ids,
//! memory-mapped for reading, written atomically.

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"FRGTOK01";
const HEADER: usize = 16;

/// A shard written as its tokens come (under a temporary name, renamed when finished).
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    len: u64,
}

impl ShardWriter {
    /// Starts the shard that will be `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let tmp = frugal::fs::temp_path(path);
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        file.write_all(MAGIC)?;
        file.write_all(&0u64.to_le_bytes())?; // the length, written when finished
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            file,
            len: 0,
        })
    }

    /// Appends `tokens`.
    pub fn append(&mut self, tokens: &[u32]) -> Result<()> {
        for t in tokens {
            self.file.write_all(&t.to_le_bytes())?;
        }
        self.len += tokens.len() as u64;
        Ok(())
    }

    /// Writes the length, syncs and renames the shard into place.
    pub fn finish(mut self) -> Result<()> {
        self.file.flush()?;
        let file = self.file.get_mut();
        file.seek(SeekFrom::Start(MAGIC.len() as u64))?;
        file.write_all(&self.len.to_le_bytes())?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

impl Drop for ShardWriter {
    /// An unfinished shard leaves no temporary file behind (after `finish` there is none).
    fn drop(&mut self) {
        std::fs::remove_file(&self.tmp).ok();
    }
}

/// A read-only, memory-mapped sequence of token ids.
pub struct TokenShard {
    map: Mmap,
    len: usize,
}

impl TokenShard {
    /// Writes `tokens` to `path` (temporary file + rename).
    pub fn write(path: &Path, tokens: &[u32]) -> Result<()> {
        let mut w = ShardWriter::create(path)?;
        w.append(tokens)?;
        w.finish()
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
