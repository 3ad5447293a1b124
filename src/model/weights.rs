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

/// An opened checkpoint. Create tensors with [`Weights::get`]; call [`Weights::finish`] at the end.
pub struct Weights {
    dir: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    taken: BTreeSet<String>,
    problems: Vec<String>,
    /// Recording mode: every requested (name, shape), nothing loaded.
    record: Option<Vec<(String, Vec<i64>)>>,
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
        })
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
        }
    }

    /// The tensors requested so far in recording mode.
    pub fn recorded(&self) -> &[(String, Vec<i64>)] {
        self.record.as_deref().unwrap_or(&[])
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn shape_of(&self, name: &str) -> Option<&[i64]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name`, checked against `shape`, as `kind` on `dev`.
    ///
    /// On a missing key or a wrong shape the problem is recorded and a zero-strided placeholder
    /// returned, so that one load reports every problem at once through [`Weights::finish`].
    pub fn get(&mut self, name: &str, shape: &[i64], kind: Kind, dev: Device) -> Tensor {
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
        let kind = self.entries.get(name).map_or(Kind::Float, |e| e.kind);
        self.get(name, shape, kind, Device::Cpu)
    }

    /// Gives the file pages behind `name` back to the kernel (MADV_DONTNEED) once the tensor
    /// has been copied elsewhere (int8 weights), so that the mapped bf16 bytes no longer count
    /// in the process's resident memory. The mapping is private and read-only: a later read of
    /// those pages (a neighbouring tensor sharing a page) faults them in again from the file.
    pub fn release(&self, name: &str) {
        let Some(e) = self.entries.get(name) else {
            return;
        };
        let map = &self.files[e.file].1;
        // SAFETY: the map is a read-only private file mapping that is never written, so dropping
        // its pages loses nothing; zero-copy tensors on the same pages read the file again.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.start, e.end - e.start)
        };
    }

    /// Marks every key starting with `prefix` as accounted for without loading it.
    pub fn skip_prefix(&mut self, prefix: &str) {
        let keys: Vec<String> = self
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
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
