//! Safetensors checkpoints: a single `model.safetensors` or shards listed by
//! `model.safetensors.index.json`, memory-mapped, each tensor copied once to its destination.
//!
//! Every tensor is looked up by its checkpoint key. Missing keys, shape mismatches and keys no
//! module asked for are collected and reported together by [`Weights::finish`].
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{dir}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)")]
    NoWeights { dir: PathBuf },
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid shard index: {what}")]
    Index { path: PathBuf, what: String },
    #[error("{path}: truncated or corrupt safetensors file ({what})")]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "{path}: tensor {name} has unsupported dtype {dtype} (bf16, f16 and f32 are supported)"
    )]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{dir}: checkpoint does not match the config: {}", .problems.join("; "))]
    Mismatch { dir: PathBuf, problems: Vec<String> },
}

struct Entry {
    file: usize,
    kind: Kind,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// Bytes [`Weights::own`] copies before giving their mapped pages back: the copy raises the
/// resident memory by at most this much over the mapped original (an output head is 272 MB).
const OWN_CHUNK: usize = 32 << 20;

/// Gives the pages of bytes `start..end` of `map` back to the kernel (MADV_DONTNEED).
fn dont_need(map: &Mmap, start: usize, end: usize) {
    // SAFETY: the map is a read-only private file mapping that is never written, so dropping
    // its pages loses nothing; zero-copy tensors on the same pages read the file again.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
    };
}

/// Byte ranges of memory-mapped checkpoint files (one part of a model's weights).
#[derive(Default)]
pub struct MappedPages {
    ranges: Vec<(Arc<Mmap>, usize, usize)>,
}

impl MappedPages {
    /// Gives these pages back to the kernel (MADV_DONTNEED), as [`Weights::release`] does: they
    /// no longer count in the process's resident memory, stay in the page cache, and the
    /// zero-copy tensors viewing them fault them in again, from the file, when next read.
    pub fn release(&self) {
        for (map, start, end) in &self.ranges {
            dont_need(map, *start, *end);
        }
    }

    /// Bytes in these ranges.
    pub fn bytes(&self) -> usize {
        self.ranges.iter().map(|(_, s, e)| e - s).sum()
    }
}

/// An opened checkpoint. Create tensors with [`Weights::get`]; call [`Weights::finish`] at the end.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    taken: BTreeSet<String>,
    problems: Vec<String>,
    /// Recording mode: every requested (name, shape), nothing loaded.
    record: Option<Vec<(String, Vec<i64>)>>,
    /// A transformers-native (-hf) checkpoint: the names loaders ask for are translated to its
    /// keys ([`hf_native`]), so every message names the key as the checkpoint spells it.
    hf: Option<HfNames>,
}

/// Which generation of transformers-native names a -hf checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfNames {
    /// `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
    /// `language_model.lm_head.*` (transformers 4.52-4.55 `save_pretrained`).
    Old,
    /// `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
    /// `lm_head.*` (newer conversions).
    New,
}

/// The transformers-native key of the remote-code name `name` (reference:
/// `convert_internvl_weights_to_hf.py`, run backwards): InternViT's `attn.{q,k,v}_proj` (the
/// vision loader asks for split projections in this layout), `attn.proj` ->
/// `attention.projection_layer`, `ls1`/`ls2` -> `lambda_1`/`lambda_2`, `norm1`/`norm2` ->
/// `layernorm_before`/`layernorm_after`; `mlp1.{0,1,3}` -> `multi_modal_projector.{layer_norm,
/// linear_1,linear_2}`. Works on key prefixes too (`vision_model.encoder.layers.3.`).
pub fn hf_native(name: &str, gen: HfNames) -> String {
    let model = if gen == HfNames::New { "model." } else { "" };
    if let Some(r) = name.strip_prefix("vision_model.") {
        let r = if let Some(e) = r.strip_prefix("embeddings.") {
            let e = if let Some(x) = e.strip_prefix("class_embedding") {
                format!("cls_token{x}")
            } else if let Some(x) = e.strip_prefix("position_embedding") {
                format!("position_embeddings{x}")
            } else if let Some(x) = e.strip_prefix("patch_embedding") {
                format!("patch_embeddings.projection{x}")
            } else {
                e.to_string()
            };
            format!("embeddings.{e}")
        } else if let Some(l) = r.strip_prefix("encoder.layers.") {
            let (i, rest) = l.split_once('.').unwrap_or((l, ""));
            let rest = [
                ("attn.proj", "attention.projection_layer"),
                ("attn.", "attention."),
                ("ls1", "lambda_1"),
                ("ls2", "lambda_2"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
            ]
            .iter()
            .find_map(|(from, to)| rest.strip_prefix(from).map(|x| format!("{to}{x}")))
            .unwrap_or_else(|| rest.to_string());
            if l.contains('.') {
                format!("encoder.layer.{i}.{rest}")
            } else {
                format!("encoder.layer.{i}")
            }
        } else {
            r.to_string()
        };
        return format!("{model}vision_tower.{r}");
    }
    if let Some(r) = name.strip_prefix("mlp1.") {
        let r = [("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")]
            .iter()
            .find_map(|(from, to)| r.strip_prefix(from).map(|x| format!("{to}{x}")))
            .unwrap_or_else(|| r.to_string());
        return format!("{model}multi_modal_projector.{r}");
    }
    if gen == HfNames::New {
        if let Some(r) = name.strip_prefix("language_model.model.") {
            return format!("model.language_model.{r}");
        }
        if let Some(r) = name.strip_prefix("language_model.lm_head") {
            return format!("lm_head{r}");
        }
    }
    name.to_string()
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F16 => Some(Kind::Half),
        Dtype::F32 => Some(Kind::Float),
        _ => None,
    }
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index.is_file() {
            let text = crate::files::read_to_string(
                &index,
                crate::files::MAX_METADATA_BYTES,
                "a model's metadata file",
            )
            .map_err(io_err(&index))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| WeightsError::Index {
                    path: index.clone(),
                    what: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| WeightsError::Index {
                    path: index.clone(),
                    what: "no weight_map object".into(),
                })?;
            let mut names = BTreeSet::new();
            for f in map.values() {
                let f = f.as_str().ok_or_else(|| WeightsError::Index {
                    path: index.clone(),
                    what: "weight_map values must be file names".into(),
                })?;
                names.insert(f.to_string());
            }
            for n in &names {
                if !dir.join(n).is_file() {
                    return Err(WeightsError::Index {
                        path: index.clone(),
                        what: format!("names shard {n}, which does not exist"),
                    });
                }
            }
            names.into_iter().collect()
        } else if single.is_file() {
            vec!["model.safetensors".into()]
        } else {
            return Err(WeightsError::NoWeights { dir: dir.into() });
        };

        let mut files = Vec::new();
        let mut entries = HashMap::new();
        for (fi, name) in shard_names.iter().enumerate() {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the checkpoint is read-only for our lifetime; tensors borrowing this map
            // are never written to.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| WeightsError::Corrupt {
                    path: path.clone(),
                    what: format!("{e:?}"),
                })?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let kind = kind_of(info.dtype).ok_or_else(|| WeightsError::Dtype {
                    path: path.clone(),
                    name: tname.clone(),
                    dtype: format!("{:?}", info.dtype),
                })?;
                entries.insert(
                    tname,
                    Entry {
                        file: fi,
                        kind,
                        shape: info.shape.iter().map(|&d| d as i64).collect(),
                        start: data_start + info.data_offsets.0,
                        end: data_start + info.data_offsets.1,
                    },
                );
            }
            files.push((path, Arc::new(mmap)));
        }
        Ok(Self {
            dir: dir.into(),
            files,
            entries,
            taken: BTreeSet::new(),
            problems: Vec::new(),
            record: None,
            hf: None,
        })
    }

    /// Reads the checkpoint's keys as a transformers-native (-hf) one: loaders keep asking for
    /// the remote-code names, which are looked up (and reported) by their native keys. The
    /// generation of names is the one the file uses (`model.`-prefixed keys: the newer one).
    pub fn use_hf_names(&mut self) {
        let newer = self.entries.keys().any(|k| k.starts_with("model."));
        self.hf = Some(if newer { HfNames::New } else { HfNames::Old });
    }

    /// [`Weights::recording`] for a -hf checkpoint (the names transformers 4.55 writes).
    pub fn recording_hf() -> Self {
        Self {
            hf: Some(HfNames::Old),
            ..Self::recording()
        }
    }

    /// The key `name` has in this checkpoint.
    fn key(&self, name: &str) -> String {
        match self.hf {
            Some(gen) => hf_native(name, gen),
            None => name.to_string(),
        }
    }

    /// A checkpoint with no tensors that records what a model's loader asks for: running a
    /// loader against it lists the tensors (names and shapes) a checkpoint of that config has.
    pub fn recording() -> Self {
        Self {
            dir: PathBuf::new(),
            files: Vec::new(),
            entries: HashMap::new(),
            taken: BTreeSet::new(),
            problems: Vec::new(),
            record: Some(Vec::new()),
            hf: None,
        }
    }

    /// The tensors requested so far in recording mode.
    pub fn recorded(&self) -> &[(String, Vec<i64>)] {
        self.record.as_deref().unwrap_or(&[])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(&self.key(name))
    }

    pub fn shape_of(&self, name: &str) -> Option<&[i64]> {
        self.entries
            .get(&self.key(name))
            .map(|e| e.shape.as_slice())
    }

    /// The tensor `name`, checked against `shape`, as `kind` on `dev`.
    ///
    /// On a missing key or a wrong shape the problem is recorded and a zero-strided placeholder
    /// returned, so that one load reports every problem at once through [`Weights::finish`].
    pub fn get(&mut self, name: &str, shape: &[i64], kind: Kind, dev: Device) -> Tensor {
        let key = self.key(name);
        let name = key.as_str();
        let placeholder = || Tensor::zeros([1], (kind, Device::Cpu)).expand(shape, false);
        if let Some(r) = &mut self.record {
            r.push((name.to_string(), shape.to_vec()));
            return placeholder();
        }
        let Some(e) = self.entries.get(name) else {
            self.problems.push(format!("missing tensor {name}"));
            return placeholder();
        };
        self.taken.insert(name.to_string());
        if e.shape != shape {
            self.problems.push(format!(
                "tensor {name} has shape {:?}, expected {:?}",
                e.shape, shape
            ));
            return placeholder();
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let elt = e.kind.elt_size_in_bytes();
        if dev == Device::Cpu && kind == e.kind && (bytes.as_ptr() as usize).is_multiple_of(elt) {
            // Zero-copy: the tensor views the memory map, which `Weights` keeps alive through
            // the model holding `mmaps()`.
            // SAFETY: bounds come from the validated header; the map outlives the model.
            unsafe { Tensor::from_blob(bytes.as_ptr(), shape, &[], e.kind, Device::Cpu) }
        } else {
            Tensor::from_data_size(bytes, shape, e.kind)
                .to_device(dev)
                .to_kind(kind)
        }
    }

    /// The tensor `name` in the dtype it is stored in, on the CPU (memory-mapped where
    /// possible): for code that converts it block by block itself.
    pub fn get_stored(&mut self, name: &str, shape: &[i64]) -> Tensor {
        let kind = self
            .entries
            .get(&self.key(name))
            .map_or(Kind::Float, |e| e.kind);
        self.get(name, shape, kind, Device::Cpu)
    }

    /// Gives the file pages behind `name` back to the kernel (MADV_DONTNEED) once the tensor
    /// has been copied elsewhere (int8 weights), so that the mapped bf16 bytes no longer count
    /// in the process's resident memory. The mapping is private and read-only: a later read of
    /// those pages (a neighbouring tensor sharing a page) faults them in again from the file.
    pub fn release(&self, name: &str) {
        let Some(e) = self.entries.get(&self.key(name)) else {
            return;
        };
        dont_need(&self.files[e.file].1, e.start, e.end);
    }

    /// `t` in the process's own memory: where it views one of the checkpoint's memory maps
    /// (a zero-copy CPU tensor from [`Weights::get`]), a copy, with the mapped pages behind it
    /// given back to the kernel (as [`Weights::release`]); any other tensor as it is.
    ///
    /// Why: decoding streams every decoder weight once a token, and gemv read them 13 to 30%
    /// slower from the file's page-cache pages than from anonymous memory (the same kernels on
    /// the 1B decoder, interleaved runs; llama.cpp shows the same between its default `mmap` and
    /// `--load-mode none`). The resident memory stays the same: the copy replaces the mapped
    /// pages as it goes, [`OWN_CHUNK`] bytes at a time.
    pub fn own(&self, t: Tensor) -> Tensor {
        if t.device() != Device::Cpu || !t.is_contiguous() {
            return t;
        }
        let start = t.data_ptr() as usize;
        let end = start + t.numel() * t.kind().elt_size_in_bytes();
        let Some(map) = self.files.iter().map(|(_, m)| m).find(|m| {
            let base = m.as_ptr() as usize;
            base <= start && end <= base + m.len()
        }) else {
            return t;
        };
        let owned = Tensor::empty(t.size(), (t.kind(), Device::Cpu));
        let dst = owned.data_ptr() as *mut u8;
        let base = map.as_ptr() as usize;
        for at in (start..end).step_by(OWN_CHUNK) {
            let n = OWN_CHUNK.min(end - at);
            // SAFETY: `at..at + n` lies inside the map (checked above) and `dst` is a fresh
            // buffer of the same `end - start` bytes.
            unsafe { std::ptr::copy_nonoverlapping(at as *const u8, dst.add(at - start), n) };
            dont_need(map, at - base, at - base + n);
        }
        owned
    }

    /// The mapped file pages behind every key starting with `prefix` (as the loaders spell it),
    /// to give back to the kernel later ([`MappedPages::release`]).
    pub fn pages_with_prefix(&self, prefix: &str) -> MappedPages {
        let prefix = self.key(prefix);
        let mut ranges: Vec<(usize, usize, usize)> = self
            .entries
            .iter()
            .filter(|(k, _)| k.starts_with(prefix.as_str()))
            .map(|(_, e)| (e.file, e.start, e.end))
            .collect();
        ranges.sort_unstable();
        // neighbouring tensors of one file as one range
        let mut merged: Vec<(usize, usize, usize)> = Vec::new();
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.0 == r.0 && last.2 >= r.1 => last.2 = last.2.max(r.2),
                _ => merged.push(r),
            }
        }
        MappedPages {
            ranges: merged
                .into_iter()
                .map(|(f, start, end)| (self.files[f].1.clone(), start, end))
                .collect(),
        }
    }

    /// Marks every key starting with `prefix` as accounted for without loading it.
    pub fn skip_prefix(&mut self, prefix: &str) {
        let prefix = self.key(prefix);
        let keys: Vec<String> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix.as_str()))
            .cloned()
            .collect();
        self.taken.extend(keys);
    }

    /// The memory maps that zero-copy tensors point into; keep them as long as the tensors.
    pub fn mmaps(&self) -> Vec<Arc<Mmap>> {
        self.files.iter().map(|(_, m)| m.clone()).collect()
    }

    /// Errors with every missing, misshapen and unused tensor.
    pub fn finish(&mut self) -> Result<(), WeightsError> {
        let mut problems = std::mem::take(&mut self.problems);
        let mut unused: Vec<&String> = self
            .entries
            .keys()
            .filter(|k| !self.taken.contains(*k))
            .collect();
        unused.sort();
        for k in unused {
            problems.push(format!("unexpected tensor {k}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WeightsError::Mismatch {
                dir: self.dir.clone(),
                problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory (kB) of this process's mappings of `file`, from /proc/self/smaps. (The
    /// process's whole RssFile also moves when tests running beside this one map or drop
    /// their own files, and did fail this test that way.)
    fn mapped_rss_kb(file: &std::path::Path) -> u64 {
        let name = file.canonicalize().unwrap();
        let name = name.to_str().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut total = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if !first.ends_with(':') {
                // a mapping's header: address range, permissions, offset, device, inode, path
                inside = line.ends_with(name);
            } else if inside && first == "Rss:" {
                total += line
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        total
    }

    /// `pages_with_prefix` covers exactly the bytes of the keys it names, and releasing them
    /// takes the pages a read brought in out of the process's resident memory; reading the
    /// tensor again still gives its values.
    #[test]
    fn released_pages_leave_resident_memory_and_read_back() {
        let dir = std::env::temp_dir().join(format!("ivl-pages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 16 << 20; // 64 MiB of f32 in each of two tensors
        let a: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
        let t = Tensor::from_slice(&a);
        let small = Tensor::from_slice(&[1f32, 2.0]);
        tch::Tensor::write_safetensors(
            &[("vis.a", &t), ("vis.b", &t), ("other", &small)],
            dir.join("model.safetensors"),
        )
        .unwrap();
        let mut w = Weights::open(&dir).unwrap();
        let pages = w.pages_with_prefix("vis.");
        assert_eq!(pages.bytes(), 2 * n * 4);
        let x = w.get("vis.a", &[n as i64], Kind::Float, Device::Cpu);
        let file = dir.join("model.safetensors");
        let before = mapped_rss_kb(&file);
        let sum = x.sum(Kind::Double).double_value(&[]);
        let touched = mapped_rss_kb(&file);
        pages.release();
        let after = mapped_rss_kb(&file);
        eprintln!(
            "resident in the map: {before} kB, {touched} kB after reading 64 MiB, {after} kB after release"
        );
        assert!(
            touched >= before + 48 * 1024,
            "the read brought the pages in"
        );
        assert!(
            after + 48 * 1024 <= touched,
            "released pages left resident memory"
        );
        // the zero-copy tensor reads the file again
        assert_eq!(x.sum(Kind::Double).double_value(&[]), sum);
        drop(x);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `own` turns a tensor viewing the map into a copy with the same values outside it and
    /// gives the mapped pages back; a tensor already in our memory comes back as it is.
    #[test]
    fn owned_weights_leave_the_map() {
        let dir = std::env::temp_dir().join(format!("ivl-own-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 16 << 20; // 64 MiB of f32
        let a: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 - 500.0).collect();
        let t = Tensor::from_slice(&a).view([4096, -1]);
        tch::Tensor::write_safetensors(&[("w", &t)], dir.join("model.safetensors")).unwrap();
        let file = dir.join("model.safetensors");
        let mut w = Weights::open(&dir).unwrap();
        let mapped = w.get("w", &[4096, 4096], Kind::Float, Device::Cpu);
        let map = &w.files[0].1;
        let in_map = |t: &Tensor| {
            let (p, base) = (t.data_ptr() as usize, map.as_ptr() as usize);
            base <= p && p < base + map.len()
        };
        assert!(
            in_map(&mapped),
            "a CPU tensor of the stored dtype views the map"
        );
        let _ = mapped.sum(Kind::Double).double_value(&[]); // brings its pages in
        let before = mapped_rss_kb(&file);
        assert!(before >= 48 * 1024, "the read brought the pages in");
        let owned = w.own(mapped.shallow_clone());
        let after = mapped_rss_kb(&file);
        eprintln!("resident in the map: {before} kB before own, {after} kB after");
        assert!(!in_map(&owned), "the owned weight is a copy");
        assert!(owned.equal(&t), "the copy holds the stored values");
        assert!(
            after + 48 * 1024 <= before,
            "owning gave the mapped pages back"
        );
        // a converted tensor is already ours: no second copy
        let converted = w.get("w", &[4096, 4096], Kind::BFloat16, Device::Cpu);
        let ptr = converted.data_ptr();
        assert_eq!(w.own(converted).data_ptr(), ptr);
        drop((mapped, owned));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
