//! Image features cached by content: the vision model's output for a tile is a function of the
//! tile's pixels alone (InternViT sees each tile on its own), so a picture attached again, in
//! this conversation or a later one, costs no vision forward pass.
//!
//! Keys are the sha256 of a tile's RGB bytes (after tiling, so the same file at another tile
//! limit is another set of keys). The cache holds at most `budget` bytes of features and forgets
//! the least recently used tiles first.
use image::RgbImage;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use tch::Tensor;

/// sha256 of a tile's size and RGB bytes.
pub type Key = [u8; 32];

pub struct FeatureCache {
    map: HashMap<Key, Tensor>,
    /// Least recently used first.
    order: VecDeque<Key>,
    bytes: usize,
    budget: usize,
    /// Tiles answered from the cache / computed, since load (for tests and the log).
    pub hits: usize,
    pub misses: usize,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
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
    pub fn new(budget: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget,
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn touch(&mut self, k: &Key) {
        if let Some(i) = self.order.iter().position(|x| x == k) {
            self.order.remove(i);
        }
        self.order.push_back(*k);
    }

    fn insert(&mut self, k: Key, t: Tensor) {
        let size = tensor_bytes(&t);
        if size > self.budget {
            return;
        }
        if let Some(old) = self.map.insert(k, t) {
            self.bytes -= tensor_bytes(&old);
        }
        self.bytes += size;
        self.touch(&k);
        while self.bytes > self.budget {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(t) = self.map.remove(&old) {
                self.bytes -= tensor_bytes(&t);
            }
        }
    }

    /// Features [tiles, tokens, hidden] of `tiles` (whose [`key`]s are `keys`), computing only
    /// the tiles not cached with
    /// `compute` (which receives the missing tiles, in order, and returns their features).
    pub fn features(
        &mut self,
        tiles: &[&RgbImage],
        keys: &[Key],
        compute: impl FnOnce(&[&RgbImage]) -> Tensor,
    ) -> Tensor {
        debug_assert_eq!(tiles.len(), keys.len());
        let mut out: Vec<Option<Tensor>> = keys
            .iter()
            .map(|k| self.map.get(k).map(Tensor::shallow_clone))
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
                self.insert(keys[i], f);
            }
        }
        for k in keys {
            if self.map.contains_key(k) {
                self.touch(k);
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
        assert!(cache.bytes <= 48);
    }
}
