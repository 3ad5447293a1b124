//! Decoded and tiled attachments, kept by whoever owns a [`TileCache`] and passes it down: the
//! chat shares one between its attachment probe (which tiles a picture when it is staged) and
//! the engine, so the engine finds the tiles ready when the question is sent; the JSONL reader
//! fills the engine's ahead of the model; and a conversation's history is not decoded again on
//! every turn.
//!
//! An entry is keyed ([`TileKey`]) by the file's identity (path, size, modification time), the
//! attachment's own settings and every setting that shapes the tiles; a changed file is a new
//! key. Two threads asking for the same entry decode it once: the second waits for the first
//! (quick_cache's placeholder guard). Entries are weighted by their tile bytes and forgotten
//! beyond a budget (quick_cache's S3-FIFO, which keeps what is asked for again).
use super::{load_visual, TileConfig, Visual, VisualError};
use crate::media::Attachment;
use std::sync::Arc;

/// Bytes of tiles kept by default (about 440 tiles of 448x448).
pub const BUDGET: u64 = 256 << 20;

/// The one key format: the file's identity and every setting that shapes its tiles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TileKey(String);

impl TileKey {
    /// `None` when the file cannot be inspected (the loader then reports why).
    pub fn of(att: &Attachment, cfg: &TileConfig) -> Option<TileKey> {
        let meta = std::fs::metadata(att.path()).ok()?;
        if !meta.is_file() {
            return None;
        }
        let mtime = meta
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        // the config's tile limit shapes only an image without one of its own (a video's
        // frames take the attachment's): left out otherwise, so that the chat's probe (its
        // config carrying --max-tiles) and the engine agree on the key
        let cfg = match att {
            Attachment::Image {
                max_tiles: None, ..
            } => *cfg,
            _ => TileConfig {
                max_tiles: 0,
                ..*cfg
            },
        };
        // the attachment (path, tile limit, video segments and time range) and the tiling
        // settings, including the -hf processor's (`hf: Some(..)`) or the model card's (`None`)
        Some(TileKey(format!("{att:?}|{}|{mtime}|{cfg:?}", meta.len())))
    }
}

/// The bytes of a decoded attachment's tiles.
pub fn visual_bytes(v: &Visual) -> u64 {
    v.placeholders
        .iter()
        .flatten()
        .map(|t| t.as_raw().len() as u64)
        .sum()
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<TileKey, Arc<Visual>> for ByBytes {
    fn weight(&self, _key: &TileKey, v: &Arc<Visual>) -> u64 {
        // a zero weight would never be evicted
        visual_bytes(v).max(1)
    }
}

/// Decoded attachments within a budget of tile bytes; shared across threads by `Arc`.
pub struct TileCache {
    cache: quick_cache::sync::Cache<TileKey, Arc<Visual>, ByBytes>,
}

impl Default for TileCache {
    fn default() -> Self {
        Self::new(BUDGET)
    }
}

impl std::fmt::Debug for TileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TileCache")
            .field("entries", &self.cache.len())
            .field("bytes", &self.cache.weight())
            .finish()
    }
}

impl TileCache {
    pub fn new(budget: u64) -> Self {
        // one shard: quick_cache divides the budget between shards, and an entry heavier than
        // its shard's part (a video's frames) would never be kept
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(64)
            .weight_capacity(budget)
            .shards(1)
            .build()
            .expect("valid cache options");
        Self {
            cache: quick_cache::sync::Cache::with_options(
                options,
                ByBytes,
                Default::default(),
                Default::default(),
            ),
        }
    }

    /// [`load_visual`] through the cache.
    pub fn load(&self, att: &Attachment, cfg: &TileConfig) -> Result<Arc<Visual>, VisualError> {
        match TileKey::of(att, cfg) {
            Some(key) => self.get_or_load(key, || load_visual(att, cfg)),
            None => load_visual(att, cfg).map(Arc::new),
        }
    }

    /// The entry of `key`, or what `load` makes of it (kept unless it failed). Callers asking
    /// for a key being loaded wait for that load instead of loading it again.
    pub fn get_or_load<E>(
        &self,
        key: TileKey,
        load: impl FnOnce() -> Result<Visual, E>,
    ) -> Result<Arc<Visual>, E> {
        self.cache.get_or_insert_with(&key, || load().map(Arc::new))
    }

    /// Forgets every entry (benchmarks measure cold starts).
    pub fn clear(&self) {
        self.cache.clear();
    }

    /// Bytes of tiles held.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Whether `key` is held (without counting as a use).
    pub fn contains(&self, key: &TileKey) -> bool {
        self.cache.peek(key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;
    use image::RgbImage;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cfg() -> TileConfig {
        TileConfig {
            max_tiles: 6,
            ..TileConfig::internvl_2_5()
        }
    }

    /// A visual of `n` 10x10 tiles (300 bytes each).
    fn visual(n: usize) -> Visual {
        Visual {
            placeholders: vec![vec![RgbImage::new(10, 10); n]],
            grid: (1, 1),
            frame_indices: Vec::new(),
        }
    }

    fn key(s: &str) -> TileKey {
        TileKey(s.into())
    }

    /// The same file and settings decode once (one shared `Arc`), even asked from two threads
    /// at once; another tile limit or a changed file is decoded again.
    #[test]
    fn decodes_each_file_once_per_settings_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pic.jpg");
        std::fs::copy(fixture("media/images/image1.jpg"), &path).unwrap();
        let att = |n| Attachment::Image {
            path: path.clone(),
            max_tiles: Some(n),
        };
        let cache = TileCache::default();
        let (a, b) = std::thread::scope(|s| {
            let t = s.spawn(|| cache.load(&att(2), &cfg()).unwrap());
            let a = cache.load(&att(2), &cfg()).unwrap();
            (a, t.join().unwrap())
        });
        assert!(Arc::ptr_eq(&a, &b), "both callers share one decode");
        let direct = load_visual(&att(2), &cfg()).unwrap();
        assert_eq!(a.placeholders, direct.placeholders);
        let again = cache.load(&att(2), &cfg()).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "served from the cache");
        let c = cache.load(&att(1), &cfg()).unwrap();
        assert_eq!(c.tiles(), 1);
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(cache.bytes(), visual_bytes(&a) + visual_bytes(&c));
        // a new version of the file (other bytes, later mtime) is a new entry
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::copy(fixture("media/images/image2.jpg"), &path).unwrap();
        let d = cache.load(&att(2), &cfg()).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(
            d.placeholders,
            load_visual(&att(2), &cfg()).unwrap().placeholders
        );
        // a missing file is not cached: the loader's error comes back
        std::fs::remove_file(&path).unwrap();
        let e = cache.load(&att(2), &cfg()).unwrap_err().to_string();
        assert!(e.contains("pic.jpg"), "{e}");
        assert_eq!(cache.len(), 3);
    }

    /// The key tells apart what changes the tiles: the file (path, size, mtime), the
    /// attachment's tile limit, a video's sampling, the tiling settings, and the -hf processor
    /// from the model card's pipeline.
    #[test]
    fn the_key_names_everything_that_shapes_the_tiles() {
        let dir = tempfile::tempdir().unwrap();
        let (p, q) = (dir.path().join("p.jpg"), dir.path().join("q.jpg"));
        std::fs::write(&p, b"12345").unwrap();
        std::fs::write(&q, b"12345").unwrap();
        let img = |path: &std::path::Path, n| Attachment::Image {
            path: path.to_path_buf(),
            max_tiles: n,
        };
        let vid = |segments, bound| Attachment::Video {
            path: p.clone(),
            segments,
            bound,
            max_tiles: 1,
        };
        let hf = super::super::hf::HfProcessing {
            mean: [1.0, 2.0, 3.0],
            std: [4.0, 5.0, 6.0],
            video: None,
        };
        let hf_cfg = TileConfig {
            hf: Some(hf),
            ..cfg()
        };
        let no_thumb = TileConfig {
            use_thumbnail: false,
            ..cfg()
        };
        let keys = [
            TileKey::of(&img(&p, None), &cfg()),
            TileKey::of(&img(&q, None), &cfg()),
            TileKey::of(&img(&p, Some(2)), &cfg()),
            TileKey::of(&img(&p, None), &hf_cfg),
            TileKey::of(&img(&p, None), &no_thumb),
            TileKey::of(&vid(8, None), &cfg()),
            TileKey::of(&vid(4, None), &cfg()),
            TileKey::of(
                &vid(8, Some(crate::media::TimeRange::new(0.0, 1.0).unwrap())),
                &cfg(),
            ),
        ]
        .map(Option::unwrap);
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(TileKey::of(&img(&p, None), &cfg()), Some(keys[0].clone()));
        // the config's tile limit counts only where the attachment has none
        let max12 = TileConfig {
            max_tiles: 12,
            ..cfg()
        };
        assert_ne!(TileKey::of(&img(&p, None), &max12), Some(keys[0].clone()));
        assert_eq!(
            TileKey::of(&img(&p, Some(2)), &max12),
            Some(keys[2].clone())
        );
        assert_eq!(TileKey::of(&vid(8, None), &max12), Some(keys[5].clone()));
        // the same path with other contents: another size, or the same size written later
        std::fs::write(&p, b"123456").unwrap();
        let grown = TileKey::of(&img(&p, None), &cfg()).unwrap();
        assert_ne!(grown, keys[0]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, b"654321").unwrap();
        assert_ne!(TileKey::of(&img(&p, None), &cfg()).unwrap(), grown);
        // no key for what is not a regular file: the loader says what is wrong
        assert_eq!(TileKey::of(&img(dir.path(), None), &cfg()), None);
        assert_eq!(
            TileKey::of(&img(&dir.path().join("none"), None), &cfg()),
            None
        );
    }

    /// The weight is the bytes of the entries still held, after evictions and after a key asked
    /// for again (which is not added twice).
    #[test]
    fn bytes_are_the_sum_of_the_live_entries() {
        // room for 10 tiles of 300 bytes
        let cache = TileCache::new(3000);
        let mut sizes = std::collections::HashMap::new();
        for round in 0..3 {
            for i in 0..12usize {
                let n = 1 + i % 4;
                let v = cache
                    .get_or_load(key(&format!("k{i}")), || Ok::<_, ()>(visual(n)))
                    .unwrap();
                assert_eq!(v.tiles(), n, "round {round}");
                sizes.insert(format!("k{i}"), visual_bytes(&v));
            }
            let live: u64 = sizes
                .iter()
                .filter(|(k, _)| cache.contains(&key(k)))
                .map(|(_, b)| b)
                .sum();
            assert!(cache.len() < 12, "some were evicted");
            assert_eq!(cache.bytes(), live, "round {round}");
            assert!(cache.bytes() <= 3000);
        }
        // an entry heavier than the whole budget is returned but not kept
        let big = cache
            .get_or_load(key("big"), || Ok::<_, ()>(visual(11)))
            .unwrap();
        assert_eq!(big.tiles(), 11);
        assert!(!cache.contains(&key("big")));
        cache.clear();
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    /// Two threads asking for the same key at once: one load, one shared result; a failed load
    /// is not kept and the error goes to its caller.
    #[test]
    fn one_load_per_key_when_two_threads_ask_at_once() {
        let cache = TileCache::default();
        let loads = AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(2);
        let load = || {
            loads.fetch_add(1, Ordering::SeqCst);
            // long enough for the other thread to arrive while this one loads
            std::thread::sleep(std::time::Duration::from_millis(200));
            Ok::<_, ()>(visual(2))
        };
        let (a, b) = std::thread::scope(|s| {
            let ask = || {
                barrier.wait();
                cache.get_or_load(key("same"), load).unwrap()
            };
            let t = s.spawn(ask);
            let a = ask();
            (a, t.join().unwrap())
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(cache.bytes(), 600);
        let e = cache.get_or_load(key("bad"), || Err::<Visual, _>("corrupt"));
        assert_eq!(e.unwrap_err(), "corrupt");
        assert!(!cache.contains(&key("bad")));
        assert_eq!(cache.len(), 1);
    }
}
