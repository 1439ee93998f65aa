//! Reading and writing weights: nnU-Net v1 `.model`, nnU-Net v2 `.pth`, plain PyTorch state
//! dicts and safetensors.
//!
//! PyTorch files are pickles. They are parsed by `pytorch-reader`, a pickle *interpreter* that
//! builds plain data and never imports or calls Python code, so a hostile checkpoint can at worst
//! be rejected. Opening a checkpoint reads only its metadata (names, shapes, dtypes); tensor bytes
//! are read one at a time when a model asks for them.
//!
//! Every error names the file, and the key where one is involved.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointFormat {
    /// nnU-Net v1 `.model`: `torch.save` of a dict with the weights under `state_dict`.
    NnUnetV1,
    /// nnU-Net v2 `.pth`: a dict with the weights under `network_weights`.
    NnUnetV2,
    /// A bare PyTorch state dict.
    TorchStateDict,
    /// safetensors, keys optionally under a prefix such as `weights.`.
    Safetensors,
}

impl fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NnUnetV1 => "nnU-Net v1 .model (state_dict)",
            Self::NnUnetV2 => "nnU-Net v2 .pth (network_weights)",
            Self::TorchStateDict => "PyTorch state dict",
            Self::Safetensors => "safetensors",
        })
    }
}

/// What can go wrong with a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is none of the supported containers, or is damaged.
    #[error("{path}: not a readable checkpoint ({reason})")]
    NotACheckpoint {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key (without any container prefix).
        key: String,
    },
    /// A tensor has the wrong shape for the architecture read from the others.
    #[error("{path}: key `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Shape in the file.
        found: Vec<usize>,
        /// Shape the model needs.
        expected: Vec<usize>,
    },
    /// A tensor exists but its bytes cannot be used.
    #[error("{path}: key `{key}`: {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The file holds tensors the model does not know: probably another model's checkpoint.
    #[error("{path}: unexpected key `{key}` for {model} (is this the right checkpoint?)")]
    UnexpectedKey {
        /// The file.
        path: PathBuf,
        /// The first unknown key.
        key: String,
        /// The model that was loading it.
        model: String,
    },
    /// The architecture read from the shapes is inconsistent or unsupported.
    #[error("{path}: {reason}")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

type ReadFn = Arc<dyn Fn() -> io::Result<Vec<f32>> + Send + Sync>;

/// One tensor of a checkpoint, not yet read.
#[derive(Clone)]
pub struct TensorEntry {
    shape: Vec<usize>,
    dtype: &'static str,
    read: ReadFn,
}

impl TensorEntry {
    /// Extents, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Element type in the file.
    pub fn dtype(&self) -> &'static str {
        self.dtype
    }
}

/// The tensors of a checkpoint by key, with the container's prefix removed.
pub struct StateDict {
    path: PathBuf,
    format: CheckpointFormat,
    prefix: String,
    entries: BTreeMap<String, TensorEntry>,
    metadata: std::collections::HashMap<String, String>,
}

impl fmt::Debug for StateDict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDict")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("prefix", &self.prefix)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

/// A value of a PyTorch checkpoint's pickle beside its tensors (see [`torch_entry`]).
pub use pytorch_reader::PickleValue;

/// The top-level entry `key` of a PyTorch checkpoint (`.pth`, `.model`) that is not a tensor,
/// such as nnU-Net's `inference_allowed_mirroring_axes`: the pickle is parsed, never executed.
pub fn torch_entry(path: &Path, key: &str) -> Result<PickleValue, CheckpointError> {
    pytorch_reader::PytorchReader::read_pickle_data(path, Some(key)).map_err(|e| CheckpointError::NotACheckpoint { path: path.to_path_buf(), reason: format!("PyTorch container, entry `{key}`: {e}") })
}

impl StateDict {
    /// Opens a checkpoint of any supported container, reading only its metadata.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        let io_err = |source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut head = [0u8; 9];
        let n = {
            use io::Read;
            let mut f = std::fs::File::open(path).map_err(io_err)?;
            let mut n = 0;
            while n < head.len() {
                match f.read(&mut head[n..]).map_err(io_err)? {
                    0 => break,
                    k => n += k,
                }
            }
            n
        };
        let head = &head[..n];
        // safetensors first: its 8-byte little-endian header length can start with 0x80, the
        // pickle protocol marker, while its 9th byte is always the header's `{`.
        if n == 9 && head[8] == b'{' {
            Self::open_safetensors(path)
        } else if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
            Self::open_torch(path)
        } else {
            Err(CheckpointError::NotACheckpoint {
                path: path.to_path_buf(),
                reason: if n == 0 {
                    "the file is empty".into()
                } else {
                    "neither a PyTorch file (zip or pickle) nor safetensors".into()
                },
            })
        }
    }

    fn open_torch(path: &Path) -> Result<Self, CheckpointError> {
        let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| {
            CheckpointError::NotACheckpoint {
                path: path.to_path_buf(),
                reason: format!("PyTorch container: {e}"),
            }
        })?;
        let tensors = reader.into_tensors();
        let has = |p: &str| tensors.keys().any(|k| k.starts_with(p));
        let (format, prefix) = if has("state_dict.") {
            (CheckpointFormat::NnUnetV1, "state_dict.")
        } else if has("network_weights.") {
            (CheckpointFormat::NnUnetV2, "network_weights.")
        } else {
            (CheckpointFormat::TorchStateDict, "")
        };
        let mut entries = BTreeMap::new();
        for (name, t) in tensors {
            let Some(key) = name.strip_prefix(prefix) else {
                continue; // optimizer state and other objects beside the weights
            };
            let dtype = t.dtype();
            let shape = t.shape().to_vec();
            let read: ReadFn = Arc::new(move || decode_weight(dtype, &t.read()?));
            entries.insert(
                key.to_string(),
                TensorEntry {
                    shape,
                    dtype: dtype_name(dtype),
                    read,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            format,
            prefix: prefix.to_string(),
            entries,
            metadata: Default::default(),
        })
    }

    fn open_safetensors(path: &Path) -> Result<Self, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |e: safetensors::SafeTensorError| CheckpointError::NotACheckpoint {
            path: path.to_path_buf(),
            reason: format!("safetensors: {e}"),
        };
        // `deserialize` validates every offset against the buffer, so a truncated file fails here.
        safetensors::SafeTensors::deserialize(&bytes).map_err(bad)?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(bad)?;
        let data_start = 8 + header_len;
        let bytes = Arc::new(bytes);
        let mut entries = BTreeMap::new();
        for (name, info) in meta.tensors() {
            let (start, end) = info.data_offsets;
            let dtype = info.dtype;
            let buf = Arc::clone(&bytes);
            let read: ReadFn = Arc::new(move || {
                decode_weight(dtype, &buf[data_start + start..data_start + end])
            });
            entries.insert(
                name,
                TensorEntry {
                    shape: info.shape.clone(),
                    dtype: dtype_name(dtype),
                    read,
                },
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            format: CheckpointFormat::Safetensors,
            prefix: String::new(),
            entries,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// Narrows the dict to the keys under the prefix that holds `anchor`, a key every checkpoint
    /// of the model has (e.g. `conv_blocks_context.0.0.conv1.weight`), and strips that prefix.
    /// Handles `weights.` in safetensors fixtures and a `module.` left by DataParallel.
    pub fn select_model(mut self, anchor: &str) -> Result<Self, CheckpointError> {
        let prefixes: Vec<String> = self
            .entries
            .keys()
            .filter_map(|k| k.strip_suffix(anchor))
            .filter(|p| p.is_empty() || p.ends_with('.'))
            .map(str::to_string)
            .collect();
        let prefix = match prefixes.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(CheckpointError::MissingKey {
                    path: self.path,
                    key: anchor.to_string(),
                });
            }
            many => {
                return Err(CheckpointError::Architecture {
                    path: self.path,
                    reason: format!(
                        "several models in one file (key `{anchor}` under prefixes {many:?})"
                    ),
                });
            }
        };
        if !prefix.is_empty() {
            self.entries = std::mem::take(&mut self.entries)
                .into_iter()
                .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v)))
                .collect();
            self.prefix.push_str(&prefix);
        }
        Ok(self)
    }

    /// Whether the dict holds 4-D tensors: a 2-D network's (`Conv2d` weights), which
    /// [`StateDict::lifted_2d`] turns into the depth-1 3-D one.
    pub fn is_2d(&self) -> bool {
        self.entries.values().any(|e| e.shape.len() == 4)
    }

    /// A 2-D network's dict (nnU-Net's `2d`: `Conv2d` weights `[O, I, kh, kw]`) as the 3-D one of
    /// depth 1 that computes the same on each slice: every 4-D tensor gets a unit axis 2
    /// (`[O, I, 1, kh, kw]`, the same values in the same order). `None` when no tensor is 4-D.
    pub fn lifted_2d(&self) -> Option<Self> {
        if !self.is_2d() {
            return None;
        }
        let entries = self
            .entries
            .iter()
            .map(|(k, e)| {
                let mut e = e.clone();
                if e.shape.len() == 4 {
                    e.shape.insert(2, 1);
                }
                (k.clone(), e)
            })
            .collect();
        Some(Self { path: self.path.clone(), format: self.format, prefix: self.prefix.clone(), entries, metadata: self.metadata.clone() })
    }

    /// Tensors held in memory under `path` (a label for messages), as a safetensors dict.
    pub fn from_tensors(path: &Path, tensors: Vec<NamedTensor>) -> Self {
        let entries = tensors
            .into_iter()
            .map(|t| {
                let data = Arc::new(t.data);
                let read: ReadFn = Arc::new(move || Ok(data.as_ref().clone()));
                (t.name, TensorEntry { shape: t.shape, dtype: "f32", read })
            })
            .collect();
        Self { path: path.to_path_buf(), format: CheckpointFormat::Safetensors, prefix: String::new(), entries, metadata: Default::default() }
    }

    /// The same tensors with one metadata entry set (what a safetensors header would carry).
    pub fn with_metadata(mut self, key: &str, value: String) -> Self {
        self.metadata.insert(key.to_string(), value);
        self
    }

    /// The safetensors header's string metadata (empty for other containers).
    pub fn metadata(&self) -> &std::collections::HashMap<String, String> {
        &self.metadata
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The container.
    pub fn format(&self) -> CheckpointFormat {
        self.format
    }
    /// Prefix that was stripped from every key (`state_dict.`, `weights.`, …).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// Keys in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True when the dict has no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// A tensor's metadata.
    pub fn get(&self, key: &str) -> Option<&TensorEntry> {
        self.entries.get(key)
    }
    /// A tensor's shape, or a `MissingKey` error.
    pub fn shape(&self, key: &str) -> Result<&[usize], CheckpointError> {
        self.entries
            .get(key)
            .map(TensorEntry::shape)
            .ok_or_else(|| CheckpointError::MissingKey {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    /// Reads a tensor as f32 after checking it has `expected` shape; rejects NaN and infinity.
    pub fn read(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let found = self.shape(key)?;
        if found != expected {
            return Err(CheckpointError::Shape {
                path: self.path.clone(),
                key: key.to_string(),
                found: found.to_vec(),
                expected: expected.to_vec(),
            });
        }
        let data = (self.entries[key].read)().map_err(|e| CheckpointError::BadTensor {
            path: self.path.clone(),
            key: key.to_string(),
            reason: e.to_string(),
        })?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(CheckpointError::BadTensor {
                path: self.path.clone(),
                key: key.to_string(),
                reason: format!("non-finite value {} at element {i}", data[i]),
            });
        }
        Ok(data)
    }

    /// Error for a key the model does not know, if there is one.
    pub fn reject_unknown<'a>(
        &self,
        known: impl IntoIterator<Item = &'a str>,
        model: &str,
    ) -> Result<(), CheckpointError> {
        let known: std::collections::HashSet<&str> = known.into_iter().collect();
        match self.keys().find(|k| !known.contains(k)) {
            Some(key) => Err(CheckpointError::UnexpectedKey {
                path: self.path.clone(),
                key: key.to_string(),
                model: model.to_string(),
            }),
            None => Ok(()),
        }
    }
}

/// A floating-point weight type both containers store.
#[derive(Clone, Copy)]
enum Float {
    F32,
    F64,
    F16,
    Bf16,
}

/// Little-endian values of `kind` as f32 (PyTorch's zip format and safetensors both store
/// little-endian data).
fn decode_floats(kind: Float, bytes: &[u8]) -> Vec<f32> {
    match kind {
        Float::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Float::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32).collect(),
        Float::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Float::Bf16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    }
}

/// `bytes` of a container's `dtype` as f32. PyTorch's reader and safetensors both name their
/// float types `F32`, `F64`, `F16` and `BF16`; any other type is not a weight.
fn decode_weight(dtype: impl std::fmt::Debug, bytes: &[u8]) -> io::Result<Vec<f32>> {
    let kind = match format!("{dtype:?}").as_str() {
        "F32" => Float::F32,
        "F64" => Float::F64,
        "F16" => Float::F16,
        "BF16" => Float::Bf16,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("dtype {dtype:?} is not a floating-point weight"))),
    };
    Ok(decode_floats(kind, bytes))
}

/// A container's dtype by the name `stu inspect` shows (`f32`, `bf16`, `i64`, …; `other` for
/// types no checkpoint here holds). Both readers name their types so, in capitals.
fn dtype_name(d: impl std::fmt::Debug) -> &'static str {
    const NAMES: [&str; 13] = ["f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u64", "u32", "u16", "u8", "bool"];
    let name = format!("{d:?}").to_lowercase();
    NAMES.into_iter().find(|n| *n == name).unwrap_or("other")
}

/// A named f32 tensor held in memory, for writing.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// State-dict key.
    pub name: String,
    /// Extents.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Writes f32 tensors to a safetensors file atomically (temporary file, then rename), in the
/// given order, with string metadata.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> io::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.as_str(), v))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: {e}", t.name)))
        })
        .collect::<io::Result<Vec<_>>>()?;
    let out = safetensors::serialize(views, metadata)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    write_atomic(path, &out)
}

pub use stu_core::fs::write_atomic;

#[cfg(test)]
mod tests {
    use super::{decode_weight, dtype_name};

    /// Both containers' float types decode by their names, little-endian; integers are refused.
    #[test]
    fn both_containers_float_types_decode_and_others_are_refused() {
        let v = [1.5f32, -2.25];
        let f32s: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f64s: Vec<u8> = v.iter().flat_map(|&x| f64::from(x).to_le_bytes()).collect();
        let f16s: Vec<u8> = v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
        let bf16s: Vec<u8> = v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect();
        use pytorch_reader::DType as T;
        use safetensors::Dtype as S;
        for (got, bytes) in [
            (decode_weight(T::F32, &f32s), &f32s),
            (decode_weight(S::F32, &f32s), &f32s),
            (decode_weight(T::F64, &f64s), &f64s),
            (decode_weight(S::F64, &f64s), &f64s),
            (decode_weight(T::F16, &f16s), &f16s),
            (decode_weight(S::F16, &f16s), &f16s),
            (decode_weight(T::BF16, &bf16s), &bf16s),
            (decode_weight(S::BF16, &bf16s), &bf16s),
        ] {
            assert_eq!(got.unwrap(), v, "{} bytes", bytes.len());
        }
        for err in [decode_weight(T::I64, &f64s), decode_weight(S::I64, &f64s), decode_weight(S::U8, &f32s)] {
            assert!(err.unwrap_err().to_string().contains("is not a floating-point weight"));
        }
        // And their names, as `stu inspect` shows them.
        assert_eq!([dtype_name(T::BF16), dtype_name(S::BF16), dtype_name(T::Bool), dtype_name(S::BOOL), dtype_name(S::I64)], ["bf16", "bf16", "bool", "bool", "i64"]);
        assert_eq!(dtype_name(S::F8_E4M3), "other");
    }
}
