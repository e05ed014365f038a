//! Reading a scvi-tools `model.pt`: a `torch.save` zip archive (stored members) whose
//! `<prefix>/data.pkl` is a protocol-2 pickle of
//! `{'model_state_dict': OrderedDict, 'var_names': ndarray, 'attr_dict': dict}`, tensors being
//! `torch._utils._rebuild_tensor_v2(persistent storage id, offset, size, stride, ...)` with the
//! storage bytes in `<prefix>/data/<key>`.
//!
//! Nothing from the archive is executed; pandas objects in `history_` and anything else the
//! readers do not need stay opaque [`Value`]s.

use crate::error::{ScError, ScResult};
use crate::pickle::numpy::{ndarray, scalar_i64, NdArray};
use crate::pickle::{self, Value};
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

fn ferr(msg: impl Into<String>) -> ScError {
    ScError::Format(msg.into())
}

/// Tensor elements (row-major). Half and bfloat16 are widened to f32, small integer types to
/// i32.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    Bool(Vec<bool>),
}

/// A dense tensor from a state dict, in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as f32 if the tensor is floating point (f64 is rounded).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        match &self.data {
            TensorData::F32(v) => Some(v.clone()),
            TensorData::F64(v) => Some(v.iter().map(|&x| x as f32).collect()),
            _ => None,
        }
    }

    /// The elements as f64 if the tensor is floating point.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        match &self.data {
            TensorData::F32(v) => Some(v.iter().map(|&x| x as f64).collect()),
            TensorData::F64(v) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            TensorData::F32(_) => "float32",
            TensorData::F64(_) => "float64",
            TensorData::I64(_) => "int64",
            TensorData::I32(_) => "int32",
            TensorData::Bool(_) => "bool",
        }
    }
}

/// `init_params_` of the saved model, with SCVI's defaults for absent entries.
#[derive(Debug, Clone, PartialEq)]
pub struct InitParams {
    pub n_hidden: usize,
    pub n_latent: usize,
    pub n_layers: usize,
    pub dropout_rate: f64,
    pub dispersion: String,
    pub gene_likelihood: String,
    pub latent_distribution: String,
    pub use_observed_lib_size: bool,
    /// `'both'`, `'encoder'`, `'decoder'` or `'none'` (booleans are mapped as scvi-tools does).
    pub use_batch_norm: String,
    pub use_layer_norm: String,
    pub encode_covariates: bool,
    pub deeply_inject_covariates: bool,
    pub batch_representation: String,
    pub log_variational: bool,
    /// Every keyword argument as saved (the `**kwargs` of `SCVI(...)`), for anything not typed
    /// above.
    pub kwargs: Vec<(String, Value)>,
}

/// `registry_['setup_args']`: how `setup_anndata` was called.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SetupArgs {
    pub layer: Option<String>,
    pub batch_key: Option<String>,
    pub labels_key: Option<String>,
    pub size_factor_key: Option<String>,
    pub categorical_covariate_keys: Vec<String>,
    pub continuous_covariate_keys: Vec<String>,
}

/// Everything read from a scvi-tools `model.pt`.
#[derive(Debug, Clone)]
pub struct ScviModelFile {
    /// Tensors of `model_state_dict`, in saved order (keys contain spaces: `"Layer 0"`).
    pub state_dict: Vec<(String, Tensor)>,
    /// Non-tensor entries of `model_state_dict` (`pyro_param_store` since scvi-tools 1.3).
    pub extra_state: Vec<(String, Value)>,
    /// The model's genes, in the order of its input layer.
    pub var_names: Vec<String>,
    pub init: InitParams,
    pub setup: SetupArgs,
    pub scvi_version: Option<String>,
    /// `'SCVI'`, `'SCANVI'`...
    pub model_name: Option<String>,
    /// Batch names in code order (`categorical_mapping`); `["0"]`-like when there is no batch.
    pub batch_mapping: Vec<String>,
    pub n_batch: usize,
    pub labels_mapping: Vec<String>,
    /// Extra categorical covariates: (obs key, categories in code order), in registry order.
    pub extra_categorical: Vec<(String, Vec<String>)>,
    /// Extra continuous covariates (obs keys), in registry order.
    pub extra_continuous: Vec<String>,
    /// The whole `attr_dict` as read, for anything not typed above (history_, indices...).
    pub attr_dict: Value,
}

impl ScviModelFile {
    /// A tensor of the state dict by name.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.state_dict
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, t)| t)
    }
}

/// Find the model file in a directory saved by `model.save(dir)`: `model.pt`, or a single
/// `<prefix>model.pt`.
pub fn find_model_file(dir: &Path) -> ScResult<PathBuf> {
    let direct = dir.join("model.pt");
    if direct.is_file() {
        return Ok(direct);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| {
        ScError::Input(format!(
            "cannot read the model folder '{}': {e}; pass the folder given to model.save()",
            dir.display()
        ))
    })?;
    let mut found = Vec::new();
    let mut legacy = false;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with("model.pt") {
            found.push(e.path());
        }
        if name.ends_with("model_params.pt") || name.ends_with("attr.pkl") {
            legacy = true;
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 if legacy => Err(ferr(format!(
            "'{}' holds a model saved by scvi-tools < 0.15 (model_params.pt, attr.pkl); this \
             layout is not supported yet: load and save it again with scvi-tools >= 0.15 \
             (scvi.model.SCVI.convert_legacy_save)",
            dir.display()
        ))),
        0 => Err(ScError::Input(format!(
            "no model.pt in '{}'; pass the folder given to scvi-tools' model.save()",
            dir.display()
        ))),
        _ => Err(ScError::Input(format!(
            "'{}' holds several *model.pt files; pass the file itself",
            dir.display()
        ))),
    }
}

/// Read a scvi-tools model from a `model.pt` file or from the folder holding it.
pub fn read_scvi_model(path: &Path) -> ScResult<ScviModelFile> {
    let file = if path.is_dir() {
        find_model_file(path)?
    } else {
        path.to_path_buf()
    };
    let f = std::fs::File::open(&file)
        .map_err(|e| ScError::Input(format!("cannot open '{}': {e}", file.display())))?;
    let (pkl, storages) = read_torch_zip(std::io::BufReader::new(f))
        .map_err(|e| ferr(format!("'{}': {e}", file.display())))?;
    decode_scvi(&pkl, &storages).map_err(|e| match e {
        ScError::Format(m) => ferr(format!("'{}': {m}", file.display())),
        other => other,
    })
}

/// Read a scvi-tools model from the bytes of a `model.pt`.
pub fn parse_scvi_model(bytes: &[u8]) -> ScResult<ScviModelFile> {
    let (pkl, storages) = read_torch_zip(std::io::Cursor::new(bytes))?;
    decode_scvi(&pkl, &storages)
}

/// The parsed `data.pkl` of a torch archive and a lookup of its storages.
pub struct TorchStorages {
    bytes: HashMap<String, Vec<u8>>,
}

/// Read a `torch.save` zip: the pickle of `<prefix>/data.pkl` and every `<prefix>/data/<key>`.
pub fn read_torch_zip<R: Read + Seek>(reader: R) -> ScResult<(Value, TorchStorages)> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        ferr(format!(
            "not a torch zip archive ({e}); expected a model.pt written by torch.save() \
             (torch >= 1.6)"
        ))
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_owned).collect();
    // the pickle sits at <prefix>/data.pkl; the prefix varies (model/, archive/...)
    let pkl_name = names
        .iter()
        .filter(|n| n.ends_with("data.pkl") && n.matches('/').count() == 1)
        .min_by_key(|n| n.len())
        .or_else(|| names.iter().find(|n| n.ends_with("/data.pkl")))
        .cloned()
        .ok_or_else(|| {
            ferr(
                "the zip archive has no */data.pkl; it is not a torch.save() file (scvi-tools \
                 model.pt)",
            )
        })?;
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let data_prefix = format!("{prefix}data/");
    let pkl_bytes = read_member(&mut zip, &pkl_name)?;
    let value = pickle::parse(&pkl_bytes)?;
    let mut bytes = HashMap::new();
    for n in &names {
        if let Some(key) = n.strip_prefix(&data_prefix) {
            if !key.is_empty() && !key.contains('/') {
                bytes.insert(key.to_owned(), read_member(&mut zip, n)?);
            }
        }
    }
    Ok((value, TorchStorages { bytes }))
}

fn read_member<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, name: &str) -> ScResult<Vec<u8>> {
    let mut f = zip
        .by_name(name)
        .map_err(|e| ferr(format!("cannot read '{name}' in the archive: {e}")))?;
    if f.compression() != zip::CompressionMethod::Stored {
        return Err(ferr(format!(
            "'{name}' in the archive is compressed ({:?}); torch.save() stores members \
             uncompressed, so this file was repacked: save it again with torch.save()",
            f.compression()
        )));
    }
    let mut out = Vec::with_capacity(f.size().min(1 << 26) as usize);
    f.read_to_end(&mut out).map_err(|e| {
        ferr(format!(
            "cannot read '{name}' in the archive ({e}); the file is truncated or corrupt"
        ))
    })?;
    Ok(out)
}

#[derive(Clone, Copy)]
enum StorageType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageType {
    fn from_name(n: &str) -> Option<Self> {
        Some(match n {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn decode(self, b: &[u8]) -> TensorData {
        fn le<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
            b.chunks_exact(N).map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                a
            })
        }
        match self {
            Self::F32 => TensorData::F32(le::<4>(b).map(f32::from_le_bytes).collect()),
            Self::F64 => TensorData::F64(le::<8>(b).map(f64::from_le_bytes).collect()),
            Self::F16 => TensorData::F32(
                le::<2>(b)
                    .map(|a| half_to_f32(u16::from_le_bytes(a)))
                    .collect(),
            ),
            Self::BF16 => TensorData::F32(
                le::<2>(b)
                    .map(|a| f32::from_bits((u16::from_le_bytes(a) as u32) << 16))
                    .collect(),
            ),
            Self::I64 => TensorData::I64(le::<8>(b).map(i64::from_le_bytes).collect()),
            Self::I32 => TensorData::I32(le::<4>(b).map(i32::from_le_bytes).collect()),
            Self::I16 => {
                TensorData::I32(le::<2>(b).map(|a| i16::from_le_bytes(a) as i32).collect())
            }
            Self::I8 => TensorData::I32(b.iter().map(|&x| x as i8 as i32).collect()),
            Self::U8 => TensorData::I32(b.iter().map(|&x| x as i32).collect()),
            Self::Bool => TensorData::Bool(b.iter().map(|&x| x != 0).collect()),
        }
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

impl TorchStorages {
    /// Decode a tensor from its pickled form, or `None` if `v` is not a tensor.
    pub fn tensor(&self, v: &Value, name: &str) -> ScResult<Option<Tensor>> {
        let Some(o) = v.as_object() else {
            return Ok(None);
        };
        let Some((module, func)) = o.callable_name() else {
            return Ok(None);
        };
        let args = o.arg_slice();
        match (module, func) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                self.rebuild(args, name).map(Some)
            }
            // nn.Parameter(data, requires_grad, hooks)
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args.first() {
                    Some(inner) => self.tensor(inner, name),
                    None => Err(ferr(format!("tensor '{name}': empty parameter"))),
                }
            }
            // tensor subclasses: (func, type, args, state)
            ("torch._tensor", "_rebuild_from_type_v2") => match args {
                [f, _, inner_args, ..]
                    if f.global() == Some(("torch._utils", "_rebuild_tensor_v2")) =>
                {
                    self.rebuild(inner_args.as_seq().unwrap_or(&[]), name)
                        .map(Some)
                }
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    fn rebuild(&self, args: &[Value], name: &str) -> ScResult<Tensor> {
        let bad = |what: String| {
            ferr(format!(
                "tensor '{name}' cannot be read: {what}; the file is corrupt or was written by \
                 an unsupported torch version"
            ))
        };
        let [storage, offset, size, stride, ..] = args else {
            return Err(bad("too few arguments to _rebuild_tensor_v2".into()));
        };
        let Value::PersId(pid) = storage else {
            return Err(bad(format!("its storage is a {}", storage.describe())));
        };
        let pid = pid
            .as_seq()
            .ok_or_else(|| bad("its storage id is not a tuple".into()))?;
        let [tag, stype, key, _location, numel, ..] = pid else {
            return Err(bad("its storage id is too short".into()));
        };
        if tag.as_str() != Some("storage") {
            return Err(bad("its persistent id is not a storage".into()));
        }
        let sname = stype.global().map(|(_, n)| n).unwrap_or("?");
        let st = StorageType::from_name(sname)
            .ok_or_else(|| bad(format!("storage type {sname} is not supported")))?;
        let key = match key {
            Value::Str(s) => s.clone(),
            Value::Int(i) => i.to_string(),
            _ => return Err(bad("its storage key is not a string".into())),
        };
        let storage_numel = numel
            .as_i64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("its storage size is not a count".into()))?;
        let bytes = self.bytes.get(&key).ok_or_else(|| {
            bad(format!(
                "its storage data/{key} is missing from the archive"
            ))
        })?;
        let need = storage_numel
            .checked_mul(st.size())
            .ok_or_else(|| bad("its storage size overflows".into()))?;
        if bytes.len() < need {
            return Err(bad(format!(
                "its storage data/{key} holds {} bytes but {need} are needed",
                bytes.len()
            )));
        }
        let offset = offset
            .as_i64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("its storage offset is not a count".into()))?;
        let dims = |v: &Value, what: &str| -> ScResult<Vec<usize>> {
            v.as_seq()
                .ok_or_else(|| bad(format!("its {what} is not a tuple")))?
                .iter()
                .map(|x| x.as_i64().and_then(|i| usize::try_from(i).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(format!("its {what} has a non-integer entry")))
        };
        let shape = dims(size, "size")?;
        let stride = dims(stride, "stride")?;
        if stride.len() != shape.len() {
            return Err(bad("its size and stride differ in length".into()));
        }
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("its size overflows".into()))?;
        // row-major contiguity (dimensions of extent 1 may carry any stride)
        let mut expect = 1usize;
        for (d, s) in shape.iter().zip(&stride).rev() {
            if *d != 1 && *s != expect && n > 0 {
                return Err(bad(format!(
                    "it is not contiguous (size {shape:?}, stride {stride:?}); save the model \
                     after calling .contiguous() on its parameters"
                )));
            }
            expect = expect.saturating_mul(*d);
        }
        let end = offset
            .checked_add(n)
            .filter(|&e| e <= storage_numel)
            .ok_or_else(|| {
                bad(format!(
                    "offset {offset} + {n} elements exceed its storage of {storage_numel}"
                ))
            })?;
        let slice = &bytes[offset * st.size()..end * st.size()];
        Ok(Tensor {
            shape,
            data: st.decode(slice),
        })
    }
}

// ------------------------------------------------------------------------ attr_dict decoding

fn value_to_string(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Float(f) => f.to_string(),
        Value::None => "None".into(),
        other => other.describe(),
    }
}

fn array_strings(a: &NdArray) -> Vec<String> {
    if let Some(s) = a.to_strings() {
        return s;
    }
    if let Some(i) = a.to_i64() {
        return i.iter().map(|x| x.to_string()).collect();
    }
    if let Some(f) = a.to_f64() {
        return f.iter().map(|x| x.to_string()).collect();
    }
    match &a.data {
        crate::pickle::numpy::ArrayData::Object(v) => v.iter().map(value_to_string).collect(),
        _ => Vec::new(),
    }
}

/// Categories from a mapping stored as numpy array, list or tuple.
fn categories(v: &Value, what: &str) -> ScResult<Vec<String>> {
    if let Some(items) = v.as_seq() {
        return Ok(items.iter().map(value_to_string).collect());
    }
    let a = ndarray(v).map_err(|e| ferr(format!("{what}: {e}")))?;
    Ok(array_strings(&a))
}

fn opt_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Str(s)) => vec![s.clone()],
        Some(v) => match v.as_seq() {
            Some(items) => items.iter().map(value_to_string).collect(),
            None => ndarray(v).map(|a| array_strings(&a)).unwrap_or_default(),
        },
        None => Vec::new(),
    }
}

/// scvi-tools accepts booleans for use_batch_norm / use_layer_norm in old versions.
fn norm_setting(v: Option<&Value>, default: &str) -> ScResult<String> {
    match v {
        None => Ok(default.into()),
        Some(Value::Bool(true)) => Ok("both".into()),
        Some(Value::Bool(false)) | Some(Value::None) => Ok("none".into()),
        Some(Value::Str(s)) if ["both", "encoder", "decoder", "none"].contains(&s.as_str()) => {
            Ok(s.clone())
        }
        Some(other) => Err(ferr(format!(
            "the model's norm setting is {}; expected 'both', 'encoder', 'decoder' or 'none'",
            value_to_string(other)
        ))),
    }
}

fn parse_init(init: Option<&Value>) -> ScResult<InitParams> {
    // >= 0.15: {'non_kwargs': {...}, 'kwargs': {'kwargs': {...}}}; older: one flat dict
    let mut flat: Vec<(String, Value)> = Vec::new();
    let mut kwargs: Vec<(String, Value)> = Vec::new();
    let mut push_dict = |d: &Value, into_kwargs: bool, flat: &mut Vec<(String, Value)>| {
        for (k, v) in d.as_dict().unwrap_or(&[]) {
            let Some(k) = k.as_str() else { continue };
            // a nested **kwargs dict is flattened
            if k == "kwargs" && v.as_dict().is_some() {
                for (k2, v2) in v.as_dict().unwrap_or(&[]) {
                    if let Some(k2) = k2.as_str() {
                        flat.push((k2.to_owned(), v2.clone()));
                        kwargs.push((k2.to_owned(), v2.clone()));
                    }
                }
            } else {
                flat.push((k.to_owned(), v.clone()));
                if into_kwargs {
                    kwargs.push((k.to_owned(), v.clone()));
                }
            }
        }
    };
    if let Some(init) = init {
        if init.as_dict().is_none() {
            return Err(ferr(format!(
                "attr_dict['init_params_'] is a {}, not a dict",
                init.describe()
            )));
        }
        match (init.get("non_kwargs"), init.get("kwargs")) {
            (None, None) => push_dict(init, false, &mut flat),
            (nk, kw) => {
                if let Some(nk) = nk {
                    push_dict(nk, false, &mut flat);
                }
                if let Some(kw) = kw {
                    push_dict(kw, true, &mut flat);
                }
            }
        }
    }
    let get = |k: &str| flat.iter().rev().find(|(n, _)| n == k).map(|(_, v)| v);
    let count = |k: &str, default: usize| -> ScResult<usize> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .as_i64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| ferr(format!("init parameter {k} is not a count"))),
        }
    };
    let string = |k: &str, default: &str| -> String {
        get(k).and_then(Value::as_str).unwrap_or(default).to_owned()
    };
    let boolean = |k: &str, default: bool| -> ScResult<bool> {
        match get(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| ferr(format!("init parameter {k} is not a bool"))),
        }
    };
    Ok(InitParams {
        n_hidden: count("n_hidden", 128)?,
        n_latent: count("n_latent", 10)?,
        n_layers: count("n_layers", 1)?,
        dropout_rate: get("dropout_rate").and_then(Value::as_f64).unwrap_or(0.1),
        dispersion: string("dispersion", "gene"),
        gene_likelihood: string("gene_likelihood", "zinb"),
        latent_distribution: string("latent_distribution", "normal"),
        use_observed_lib_size: boolean("use_observed_lib_size", true)?,
        use_batch_norm: norm_setting(get("use_batch_norm"), "both")?,
        use_layer_norm: norm_setting(get("use_layer_norm"), "none")?,
        encode_covariates: boolean("encode_covariates", false)?,
        deeply_inject_covariates: boolean("deeply_inject_covariates", true)?,
        batch_representation: string("batch_representation", "one-hot"),
        log_variational: boolean("log_variational", true)?,
        kwargs,
    })
}

fn decode_scvi(top: &Value, storages: &TorchStorages) -> ScResult<ScviModelFile> {
    if top.as_dict().is_none() {
        return Err(ferr(format!(
            "the archive holds a {} instead of a dict; this is not a scvi-tools model.pt \
             (a bare state dict or another torch file?)",
            top.describe()
        )));
    }
    let sd = top.get("model_state_dict").ok_or_else(|| {
        ferr(
            "the archive has no 'model_state_dict'; this is not a scvi-tools model.pt (saved \
             by model.save() with scvi-tools >= 0.15)",
        )
    })?;
    let sd = sd.as_dict().ok_or_else(|| {
        ferr(format!(
            "'model_state_dict' is a {}, not a dict",
            sd.describe()
        ))
    })?;
    let mut state_dict = Vec::with_capacity(sd.len());
    let mut extra_state = Vec::new();
    for (k, v) in sd {
        let name = k
            .as_str()
            .ok_or_else(|| ferr("a state dict key is not a string"))?
            .to_owned();
        match storages.tensor(v, &name)? {
            Some(t) => state_dict.push((name, t)),
            None => extra_state.push((name, v.clone())),
        }
    }

    let vn = top
        .get("var_names")
        .ok_or_else(|| ferr("the archive has no 'var_names'"))?;
    let var_names = if vn.as_dict().is_some() {
        return Err(ferr(
            "the model was trained on several modalities (MuData: var_names per modality); \
             only single-modality models (SCVI) are supported",
        ));
    } else {
        str_list(Some(vn))
    };
    if var_names.is_empty() {
        return Err(ferr(format!(
            "'var_names' ({}) holds no gene names",
            vn.describe()
        )));
    }

    let attr = top.get("attr_dict").cloned().unwrap_or(Value::Dict(vec![]));
    let init = parse_init(attr.get("init_params_"))?;
    let registry = attr.get("registry_");
    let setup_v = registry.and_then(|r| r.get("setup_args"));
    let setup = SetupArgs {
        layer: opt_str(setup_v.and_then(|s| s.get("layer"))),
        batch_key: opt_str(setup_v.and_then(|s| s.get("batch_key"))),
        labels_key: opt_str(setup_v.and_then(|s| s.get("labels_key"))),
        size_factor_key: opt_str(setup_v.and_then(|s| s.get("size_factor_key"))),
        categorical_covariate_keys: str_list(
            setup_v
                .and_then(|s| s.get("categorical_covariate_keys"))
                .filter(|v| !v.is_none()),
        ),
        continuous_covariate_keys: str_list(
            setup_v
                .and_then(|s| s.get("continuous_covariate_keys"))
                .filter(|v| !v.is_none()),
        ),
    };
    let fields = registry.and_then(|r| r.get("field_registries"));
    let field_state = |f: &str| {
        fields
            .and_then(|x| x.get(f))
            .and_then(|x| x.get("state_registry"))
    };
    let batch_mapping = match field_state("batch").and_then(|s| s.get("categorical_mapping")) {
        Some(m) => categories(m, "the batch categories")?,
        None => Vec::new(),
    };
    let n_batch = fields
        .and_then(|x| x.get("batch"))
        .and_then(|b| b.get("summary_stats"))
        .and_then(|s| s.get("n_batch"))
        .and_then(scalar_i64)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or_else(|| {
            let mut u = batch_mapping.clone();
            u.sort();
            u.dedup();
            u.len().max(1)
        });
    let labels_mapping = match field_state("labels").and_then(|s| s.get("categorical_mapping")) {
        Some(m) => categories(m, "the label categories")?,
        None => Vec::new(),
    };
    let mut extra_categorical = Vec::new();
    if let Some(st) = field_state("extra_categorical_covs") {
        if let Some(maps) = st.get("mappings").and_then(Value::as_dict) {
            let keys = str_list(st.get("field_keys"));
            let mut pairs: Vec<(String, Vec<String>)> = Vec::new();
            for (k, m) in maps {
                let k = value_to_string(k);
                let cats = categories(m, &format!("the categories of covariate '{k}'"))?;
                pairs.push((k, cats));
            }
            // registry order is field_keys when present
            if !keys.is_empty() {
                pairs.sort_by_key(|(k, _)| keys.iter().position(|x| x == k).unwrap_or(usize::MAX));
            }
            extra_categorical = pairs;
        }
    }
    let extra_continuous = field_state("extra_continuous_covs")
        .and_then(|s| s.get("columns"))
        .map(|c| str_list(Some(c)))
        .unwrap_or_default();

    Ok(ScviModelFile {
        state_dict,
        extra_state,
        var_names,
        init,
        setup,
        scvi_version: opt_str(registry.and_then(|r| r.get("scvi_version"))),
        model_name: opt_str(registry.and_then(|r| r.get("model_name"))),
        batch_mapping,
        n_batch,
        labels_mapping,
        extra_categorical,
        extra_continuous,
        attr_dict: attr,
    })
}
