//! Image features cached by content: the vision model's output for a tile is a function of the
//! tile's pixels alone (InternViT sees each tile on its own), so a picture attached again, in
//! this conversation or a later one, costs no vision forward pass.
//!
//! Keys are the sha256 of a tile's RGB bytes (after tiling, so the same file at another tile
//! limit is another set of keys). The cache (quick_cache's, weighted by bytes) holds at most
//! `budget` bytes of features; beyond it, tiles seen once go before tiles asked for again
//! (S3-FIFO).
use image::RgbImage;
use sha2::{Digest, Sha256};
use tch::Tensor;

/// sha256 of a tile's size and RGB bytes.
pub type Key = [u8; 32];

/// A tile's features; cloning shares the tensor's storage.
struct Features(Tensor);

impl Clone for Features {
    fn clone(&self) -> Self {
        Features(self.0.shallow_clone())
    }
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<Key, Features> for ByBytes {
    fn weight(&self, _key: &Key, f: &Features) -> u64 {
        // a zero weight would never be evicted
        tensor_bytes(&f.0).max(1)
    }
}

pub struct FeatureCache {
    cache: quick_cache::unsync::Cache<Key, Features, ByBytes>,
    /// Tiles answered from the cache / computed, since load (for tests and the log).
    pub hits: usize,
    pub misses: usize,
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// The key of a tile: sha256 of its size and RGB bytes.
pub fn key(tile: &RgbImage) -> Key {
    let mut h = Sha256::new();
    h.update(tile.width().to_le_bytes());
    h.update(tile.height().to_le_bytes());
    h.update(tile.as_raw());
    h.finalize().into()
}

impl FeatureCache {
    /// At most `budget` bytes of features.
    pub fn new(budget: u64) -> Self {
        Self {
            cache: quick_cache::unsync::Cache::with_weighter(256, budget, ByBytes),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes of features held.
    pub fn bytes(&self) -> u64 {
        self.cache.weight()
    }

    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Features [tiles, tokens, hidden] of `tiles` (whose [`key`]s are `keys`), computing only
    /// the tiles not cached with `compute` (which receives the missing tiles, each distinct one
    /// once, in order, and returns their features: one vision forward pass for all of them).
    pub fn features(
        &mut self,
        tiles: &[&RgbImage],
        keys: &[Key],
        compute: impl FnOnce(&[&RgbImage]) -> Tensor,
    ) -> Tensor {
        debug_assert_eq!(tiles.len(), keys.len());
        let mut out: Vec<Option<Tensor>> = keys
            .iter()
            .map(|k| self.cache.get(k).map(|f| f.0.shallow_clone()))
            .collect();
        // each distinct missing tile once
        let mut missing: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if out[i].is_none() && !missing.iter().any(|&j| keys[j] == *k) {
                missing.push(i);
            }
        }
        self.hits += tiles.len() - missing.len();
        self.misses += missing.len();
        if !missing.is_empty() {
            let todo: Vec<&RgbImage> = missing.iter().map(|&i| tiles[i]).collect();
            let feats = compute(&todo);
            for (j, &i) in missing.iter().enumerate() {
                let f = feats.get(j as i64);
                for (slot, k) in out.iter_mut().zip(keys) {
                    if slot.is_none() && *k == keys[i] {
                        *slot = Some(f.shallow_clone());
                    }
                }
                // one heavier than the whole budget is not kept
                self.cache.insert(keys[i], Features(f));
            }
        }
        let out: Vec<Tensor> = out
            .into_iter()
            .map(|t| t.expect("every tile has features"))
            .collect();
        Tensor::stack(&out, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tile(v: u8) -> RgbImage {
        RgbImage::from_pixel(4, 4, image::Rgb([v, v, v]))
    }

    /// A fake vision model: features are the tile's first byte, and it counts the tiles it saw.
    fn fake(seen: &mut Vec<u8>) -> impl FnOnce(&[&RgbImage]) -> Tensor + '_ {
        move |tiles| {
            seen.extend(tiles.iter().map(|t| t.as_raw()[0]));
            let v: Vec<f32> = tiles.iter().map(|t| f32::from(t.as_raw()[0])).collect();
            Tensor::from_slice(&v)
                .view([-1, 1, 1])
                .expand([-1, 2, 3], false)
                .contiguous()
        }
    }

    fn keys(tiles: &[&RgbImage]) -> Vec<Key> {
        tiles.iter().map(|t| key(t)).collect()
    }

    fn get(cache: &mut FeatureCache, tiles: &[&RgbImage], seen: &mut Vec<u8>) -> Tensor {
        cache.features(tiles, &keys(tiles), fake(seen))
    }

    fn values(t: &Tensor) -> Vec<f32> {
        let t = t.select(2, 0).select(1, 0).to_kind(Kind::Float);
        Vec::<f32>::try_from(&t).unwrap()
    }

    #[test]
    fn computes_each_distinct_tile_once_and_reuses_it() {
        let (a, b, c) = (tile(1), tile(2), tile(3));
        let mut cache = FeatureCache::new(1 << 20);
        let mut seen = Vec::new();
        let f = cache.features(&[&a, &b, &a], &keys(&[&a, &b, &a]), fake(&mut seen));
        assert_eq!(values(&f), [1.0, 2.0, 1.0]);
        assert_eq!(f.size(), [3, 2, 3]);
        assert_eq!(seen, [1, 2]);
        let mut seen = Vec::new();
        let f = cache.features(&[&c, &b, &a], &keys(&[&c, &b, &a]), fake(&mut seen));
        assert_eq!(values(&f), [3.0, 2.0, 1.0]);
        assert_eq!(seen, [3], "only the new tile goes through the model");
        assert_eq!((cache.hits, cache.misses), (3, 3));
        assert_eq!(f.device(), Device::Cpu);
    }

    #[test]
    fn forgets_the_least_recently_used_within_its_budget() {
        let tiles: Vec<RgbImage> = (0..4).map(tile).collect();
        // room for two tiles' features (2 x 3 f32 = 24 bytes each)
        let mut cache = FeatureCache::new(48);
        let mut seen = Vec::new();
        let _ = get(&mut cache, &[&tiles[0], &tiles[1]], &mut seen);
        let _ = get(&mut cache, &[&tiles[0]], &mut seen); // 0 is now the most recent
        let _ = get(&mut cache, &[&tiles[2]], &mut seen); // evicts 1
        assert_eq!(cache.len(), 2);
        let mut seen = Vec::new();
        let _ = get(&mut cache, &[&tiles[0], &tiles[1], &tiles[2]], &mut seen);
        assert_eq!(seen, [1]);
        // a request larger than the budget still gets all its features
        let mut seen = Vec::new();
        let f = get(
            &mut cache,
            &[&tiles[3], &tiles[0], &tiles[1], &tiles[2]],
            &mut seen,
        );
        assert_eq!(values(&f), [3.0, 0.0, 1.0, 2.0]);
        assert!(cache.bytes() <= 48);
    }

    /// The weight is the bytes of the features still held: after evictions, and after a tile
    /// asked for twice in one request or again later (kept once).
    #[test]
    fn bytes_are_the_sum_of_the_live_entries() {
        let tiles: Vec<RgbImage> = (0..10).map(tile).collect();
        // room for four tiles' features (24 bytes each)
        let mut cache = FeatureCache::new(96);
        let mut seen = Vec::new();
        for round in 0..3 {
            for w in tiles.windows(3) {
                let _ = get(&mut cache, &[&w[0], &w[1], &w[0], &w[2]], &mut seen);
                let live = tiles
                    .iter()
                    .filter(|t| cache.cache.peek(&key(t)).is_some())
                    .count() as u64;
                assert_eq!(cache.bytes(), 24 * live, "round {round}");
                assert_eq!(cache.len() as u64, live);
                assert!(cache.bytes() <= 96);
            }
        }
        // a tile inserted again replaces its entry instead of adding its bytes twice
        cache.clear();
        let _ = get(&mut cache, &[&tiles[0]], &mut seen);
        cache.cache.insert(
            key(&tiles[0]),
            Features(Tensor::zeros([2, 3], tch::kind::FLOAT_CPU)),
        );
        assert_eq!((cache.len(), cache.bytes()), (1, 24));
    }
}
