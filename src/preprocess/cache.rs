//! Decoded and tiled attachments, shared by the whole process: the chat's attachment probe
//! (on its own thread, when a file is staged) and the JSONL reader (ahead of the model) fill it,
//! so the engine finds the tiles ready when the question is sent, and a conversation's history
//! is not decoded again on every turn.
//!
//! An entry is keyed by the file's identity (path, size, modification time) and every setting
//! that shapes the tiles; a changed file is a new key. Two threads asking for the same entry
//! decode it once: the second waits for the first. Entries are forgotten least recently used
//! first beyond a budget of tile bytes.
use super::{load_visual, TileConfig, Visual, VisualError};
use crate::media::Attachment;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

type Slot = Arc<Mutex<Option<Arc<Visual>>>>;

struct Cache {
    slots: HashMap<String, (Slot, usize)>,
    order: VecDeque<String>,
    bytes: usize,
    budget: usize,
}

/// Bytes of tiles kept (about 440 tiles of 448x448).
const BUDGET: usize = 256 << 20;

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        Mutex::new(Cache {
            slots: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            budget: BUDGET,
        })
    })
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    // a panic while holding the lock leaves the map consistent: keep using it
    cache().lock().unwrap_or_else(|e| e.into_inner())
}

/// The file's identity and every setting that shapes its tiles; `None` when the file cannot be
/// inspected (the loader then reports why).
fn key(att: &Attachment, cfg: &TileConfig) -> Option<String> {
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
    Some(format!("{att:?}|{}|{mtime}|{cfg:?}", meta.len()))
}

fn visual_bytes(v: &Visual) -> usize {
    v.placeholders
        .iter()
        .flatten()
        .map(|t| t.as_raw().len())
        .sum()
}

/// Forgets every entry (benchmarks measure cold starts).
pub fn clear() {
    let mut c = lock();
    c.slots.clear();
    c.order.clear();
    c.bytes = 0;
}

/// [`load_visual`] through the shared cache.
pub fn load_visual_shared(att: &Attachment, cfg: &TileConfig) -> Result<Arc<Visual>, VisualError> {
    let Some(k) = key(att, cfg) else {
        return load_visual(att, cfg).map(Arc::new);
    };
    let slot = {
        let mut c = lock();
        let slot = c
            .slots
            .entry(k.clone())
            .or_insert_with(|| (Arc::new(Mutex::new(None)), 0))
            .0
            .clone();
        if let Some(i) = c.order.iter().position(|x| *x == k) {
            c.order.remove(i);
        }
        c.order.push_back(k.clone());
        slot
    };
    // only this entry is locked while decoding: other files load in parallel
    let mut entry = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = &*entry {
        return Ok(v.clone());
    }
    let v = Arc::new(load_visual(att, cfg)?);
    *entry = Some(v.clone());
    drop(entry);
    let mut c = lock();
    let size = visual_bytes(&v);
    if let Some(e) = c.slots.get_mut(&k) {
        e.1 = size;
    }
    c.bytes += size;
    while c.bytes > c.budget && c.order.len() > 1 {
        let Some(old) = c.order.pop_front() else {
            break;
        };
        if let Some((_, b)) = c.slots.remove(&old) {
            c.bytes -= b;
        }
    }
    Ok(v)
}

/// Decodes `att` in the background so that a later [`load_visual_shared`] finds it ready.
/// Errors are left for that later call to report.
pub fn prefetch(att: &Attachment, cfg: &TileConfig) {
    let (att, cfg) = (att.clone(), *cfg);
    let _ = std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            let _ = load_visual_shared(&att, &cfg);
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    fn cfg() -> TileConfig {
        TileConfig {
            image_size: 448,
            min_tiles: 1,
            max_tiles: 6,
            use_thumbnail: true,
            tokens_per_tile: 256,
            hf: None,
        }
    }

    /// The same file and settings decode once (one shared `Arc`), even asked from two threads
    /// at once; another
    /// tile limit or a changed file is decoded again.
    #[test]
    fn decodes_each_file_once_per_settings_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pic.jpg");
        std::fs::copy(fixture("media/images/image1.jpg"), &path).unwrap();
        let att = |n| Attachment::Image {
            path: path.clone(),
            max_tiles: Some(n),
        };
        let (a, b) = std::thread::scope(|s| {
            let t = s.spawn(|| load_visual_shared(&att(2), &cfg()).unwrap());
            let a = load_visual_shared(&att(2), &cfg()).unwrap();
            (a, t.join().unwrap())
        });
        assert!(Arc::ptr_eq(&a, &b), "both callers share one decode");
        let direct = load_visual(&att(2), &cfg()).unwrap();
        assert_eq!(a.placeholders, direct.placeholders);
        let again = load_visual_shared(&att(2), &cfg()).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "served from the cache");
        let c = load_visual_shared(&att(1), &cfg()).unwrap();
        assert_eq!(c.tiles(), 1);
        assert!(!Arc::ptr_eq(&a, &c));
        // a new version of the file (other bytes, later mtime) is a new entry
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::copy(fixture("media/images/image2.jpg"), &path).unwrap();
        let d = load_visual_shared(&att(2), &cfg()).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(
            d.placeholders,
            load_visual(&att(2), &cfg()).unwrap().placeholders
        );
        // a missing file is not cached: the loader's error comes back
        std::fs::remove_file(&path).unwrap();
        let e = load_visual_shared(&att(2), &cfg()).unwrap_err().to_string();
        assert!(e.contains("pic.jpg"), "{e}");
    }
}
