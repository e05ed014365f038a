//! Writing a scvi-tools `model.pt` (spec section 5.1): the `torch.save` zip archive that
//! `scvi.model.SCVI.load(dir, adata)` reads, and the query model of scArches surgery
//! ([`query_model_file`]: the reference model with its FC layers enlarged by the new batches
//! and the trained covariate columns, and the query's registry).
//!
//! The archive is what torch writes: stored (uncompressed) members, every member's data
//! aligned to 64 bytes, `<prefix>/data.pkl` a **protocol-2** pickle of
//! `{'model_state_dict': OrderedDict, 'var_names': ndarray, 'attr_dict': dict}`, tensors as
//! `torch._utils._rebuild_tensor_v2(BINPERSID ('storage', torch.FloatStorage, key, 'cpu',
//! numel), 0, size, stride, False, OrderedDict())` with the little-endian storage bytes in
//! `<prefix>/data/<key>`, and the small members `.format_version`, `.storage_alignment`,
//! `byteorder`, `version`, `.data/serialization_id`.
//!
//! Values of `attr_dict` read from another file are written back as read (numpy arrays and
//! pandas objects are pickled calls); `registry_['field_registries']` is written as the
//! `defaultdict(dict)` scvi-tools uses. Half, bfloat16 and small integer tensors were widened
//! by the reader and are written as float32 / int32.

use super::model_file::{ScviModelFile, Tensor, TensorData};
use super::train::SurgeryModel;
use crate::error::{ScError, ScResult};
use crate::pickle::writer::{default_dict, dict, global, ndarray, ordered_dict, ArrayOut};
use crate::pickle::{self, Value};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

/// torch's record alignment (`.storage_alignment`)
const ALIGN: u16 = 64;

fn ierr(msg: impl Into<String>) -> ScError {
    ScError::Input(msg.into())
}

/// Write a `torch.save` zip: `prefix/data.pkl` (`pickle`), then the storages as
/// `prefix/data/0`, `prefix/data/1`... (their index is their key), in torch's member order.
pub fn write_torch_zip<W: Write + Seek>(
    w: W,
    prefix: &str,
    pickle: &[u8],
    storages: &[Vec<u8>],
) -> ScResult<W> {
    if prefix.is_empty() || prefix.contains('/') {
        return Err(ierr(format!(
            "the archive name must be a plain name, got '{prefix}'"
        )));
    }
    let zerr = |e: zip::result::ZipError| ierr(format!("cannot write the torch archive: {e}"));
    let ioerr = |e: std::io::Error| ierr(format!("cannot write the torch archive: {e}"));
    let total: u64 = storages.iter().map(|s| s.len() as u64).sum::<u64>() + pickle.len() as u64;
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(ALIGN)
        .large_file(total >= u32::MAX as u64 / 2);
    let mut z = zip::ZipWriter::new(w);
    let mut put = |name: String, data: &[u8]| -> ScResult<()> {
        z.start_file(name, opts).map_err(zerr)?;
        z.write_all(data).map_err(ioerr)
    };
    put(format!("{prefix}/data.pkl"), pickle)?;
    put(format!("{prefix}/.format_version"), b"1")?;
    put(format!("{prefix}/.storage_alignment"), b"64")?;
    put(format!("{prefix}/byteorder"), b"little")?;
    for (k, s) in storages.iter().enumerate() {
        put(format!("{prefix}/data/{k}"), s)?;
    }
    put(format!("{prefix}/version"), b"3\n")?;
    // torch writes a random 40-digit id; a digest of the content keeps output reproducible
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pickle.iter().chain(storages.iter().flatten()) {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let id = format!("{:020}{:020}", h, h.rotate_left(29) ^ total);
    put(format!("{prefix}/.data/serialization_id"), id.as_bytes())?;
    z.finish().map_err(zerr)
}

/// The storage type name and little-endian bytes of a tensor.
fn storage_of(t: &Tensor) -> (&'static str, Vec<u8>) {
    match &t.data {
        TensorData::F32(v) => (
            "FloatStorage",
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::F64(v) => (
            "DoubleStorage",
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I64(v) => (
            "LongStorage",
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::I32(v) => (
            "IntStorage",
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        TensorData::Bool(v) => ("BoolStorage", v.iter().map(|&b| b as u8).collect()),
    }
}

fn ints(v: &[usize]) -> Value {
    Value::Tuple(v.iter().map(|&d| Value::Int(d as i64)).collect())
}

/// `_rebuild_tensor_v2(storage key, 0, shape, contiguous stride, False, OrderedDict())`.
fn tensor_value(t: &Tensor, key: usize, stype: &str) -> ScResult<Value> {
    let n = t.numel();
    let len = match &t.data {
        TensorData::F32(v) => v.len(),
        TensorData::F64(v) => v.len(),
        TensorData::I64(v) => v.len(),
        TensorData::I32(v) => v.len(),
        TensorData::Bool(v) => v.len(),
    };
    if len != n {
        return Err(ScError::Dims(format!(
            "a tensor of shape {:?} holds {len} values",
            t.shape
        )));
    }
    let mut stride = vec![1usize; t.shape.len()];
    for d in (0..t.shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * t.shape[d + 1];
    }
    let storage = Value::PersId(Box::new(Value::Tuple(vec![
        Value::Str("storage".into()),
        global("torch", stype),
        Value::Str(key.to_string()),
        Value::Str("cpu".into()),
        Value::Int(n as i64),
    ])));
    Ok(pickle::writer::object(
        global("torch._utils", "_rebuild_tensor_v2"),
        vec![
            storage,
            Value::Int(0),
            ints(&t.shape),
            ints(&stride),
            Value::Bool(false),
            ordered_dict(vec![]),
        ],
        false,
        None,
    ))
}

/// `registry_` with `field_registries` as scvi-tools' `defaultdict(dict)`.
fn attr_for_pickle(attr: &Value) -> Value {
    let Some(items) = attr.as_dict() else {
        return attr.clone();
    };
    let map = |(k, v): &(Value, Value)| -> (Value, Value) {
        if k.as_str() != Some("registry_") {
            return (k.clone(), v.clone());
        }
        let Some(reg) = v.as_dict() else {
            return (k.clone(), v.clone());
        };
        let reg = reg
            .iter()
            .map(|(rk, rv)| match (rk.as_str(), rv) {
                (Some("field_registries"), Value::Dict(f)) => (
                    rk.clone(),
                    default_dict(global("__builtin__", "dict"), f.clone()),
                ),
                _ => (rk.clone(), rv.clone()),
            })
            .collect();
        (k.clone(), Value::Dict(reg))
    };
    Value::Dict(items.iter().map(map).collect())
}

/// The bytes of a `model.pt` holding `m` (archive name `model`, as scvi-tools' `model.pt`).
pub fn scvi_model_bytes(m: &ScviModelFile) -> ScResult<Vec<u8>> {
    let mut storages = Vec::with_capacity(m.state_dict.len());
    let mut sd = Vec::with_capacity(m.state_dict.len() + m.extra_state.len());
    for (name, t) in &m.state_dict {
        let (stype, bytes) = storage_of(t);
        let v = tensor_value(t, storages.len(), stype)
            .map_err(|e| ScError::Dims(format!("tensor '{name}': {e}")))?;
        storages.push(bytes);
        sd.push((Value::Str(name.clone()), v));
    }
    for (name, v) in &m.extra_state {
        sd.push((Value::Str(name.clone()), v.clone()));
    }
    let top = dict(vec![
        ("model_state_dict", ordered_dict(sd)),
        (
            "var_names",
            ndarray(&[m.var_names.len()], ArrayOut::Str(&m.var_names))?,
        ),
        ("attr_dict", attr_for_pickle(&m.attr_dict)),
    ]);
    let pkl = pickle::writer::write_protocol2(&top)?;
    let cur = write_torch_zip(std::io::Cursor::new(Vec::new()), "model", &pkl, &storages)?;
    Ok(cur.into_inner())
}

/// Write `m` to `<dir>/model.pt` (creating `dir`) through a temporary file renamed into
/// place, so an interrupted write never leaves a torn `model.pt`. Returns the file's path.
pub fn write_scvi_model(m: &ScviModelFile, dir: &Path) -> ScResult<PathBuf> {
    let bytes = scvi_model_bytes(m)?;
    let io =
        |what: &str, e: std::io::Error| ierr(format!("cannot {what} '{}': {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| io("create the folder", e))?;
    let path = dir.join("model.pt");
    let tmp = dir.join(format!(".model.pt.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write model.pt in", e));
    }
    Ok(path)
}

// ------------------------------------------------------------------------- the query model

/// What the query model's `attr_dict` records about the query.
#[derive(Debug, Clone, Default)]
pub struct QueryInfo {
    /// the appended batch levels (in code order after the reference's)
    pub new_batch_levels: Vec<String>,
    /// the appended levels of each extra categorical covariate (the reference's order of
    /// covariates, each in code order after the reference's levels); empty: none appended
    pub new_cat_levels: Vec<Vec<String>>,
    /// number of query cells (`n_obs` / `n_cells` of the registry)
    pub n_obs: usize,
    /// 0-based training / validation cells (`train_indices_`, `validation_indices_`)
    pub train_indices: Vec<usize>,
    pub validation_indices: Vec<usize>,
    /// seeds the new columns of `l_encoder` (not trained with the observed library size)
    pub seed: u64,
    /// training history, one value per epoch under scvi-tools' names (`elbo_train`,
    /// `elbo_validation`...): `history_` becomes `{name: pandas.DataFrame({name: values},
    /// index=pandas.Index(range(n), name='epoch'))}` as scvi-tools logs it; empty: None
    pub history: Vec<(String, Vec<f64>)>,
}

/// `pandas.DataFrame({name: values}, pandas.Index([0, 1, ...], None, False, 'epoch'))`:
/// built by pandas' public constructors when unpickled, so any pandas version reads it.
fn history_frame(name: &str, values: &[f64]) -> Value {
    let index = pickle::writer::object(
        global("pandas", "Index"),
        vec![
            Value::List((0..values.len()).map(|i| Value::Int(i as i64)).collect()),
            Value::None,
            Value::Bool(false),
            Value::Str("epoch".into()),
        ],
        false,
        None,
    );
    pickle::writer::object(
        global("pandas", "DataFrame"),
        vec![
            dict(vec![(
                name,
                Value::List(values.iter().map(|&v| Value::Float(v)).collect()),
            )]),
            index,
        ],
        false,
        None,
    )
}

/// A dict with one key replaced (or appended).
fn set_key(d: &Value, key: &str, v: Value) -> Value {
    let mut items: Vec<(Value, Value)> = d.as_dict().map(<[_]>::to_vec).unwrap_or_default();
    match items.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
        Some(slot) => slot.1 = v,
        None => items.push((Value::Str(key.into()), v)),
    }
    Value::Dict(items)
}

/// `d[path[0]][path[1]]...`, if every key is there.
fn get_path<'a>(d: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(d, |v, k| v.get(k))
}

/// `d[path[0]][path[1]]...[last] = v`, creating missing dicts.
fn set_path(d: &Value, path: &[&str], v: Value) -> Value {
    match path {
        [] => v,
        [k] => set_key(d, k, v),
        [k, rest @ ..] => {
            let inner = d.get(k).cloned().unwrap_or(Value::Dict(vec![]));
            set_key(d, k, set_path(&inner, rest, v))
        }
    }
}

/// A category mapping (`categorical_mapping`, `mappings[key]`) of `levels`, as an int64
/// array where the reference's was an integer array and every level is an integer (obs
/// columns of integer codes, e.g. donor numbers), else as an object array of str.
fn mapping_array(reference: Option<&Value>, levels: &[String]) -> ScResult<Value> {
    use crate::pickle::numpy::ArrayData as A;
    let int_ref = reference
        .and_then(|v| crate::pickle::numpy::ndarray(v).ok())
        .is_some_and(|a| {
            matches!(
                a.data,
                A::I8(_)
                    | A::I16(_)
                    | A::I32(_)
                    | A::I64(_)
                    | A::U8(_)
                    | A::U16(_)
                    | A::U32(_)
                    | A::U64(_)
            )
        });
    let ints: Option<Vec<i64>> = if int_ref {
        levels.iter().map(|l| l.parse::<i64>().ok()).collect()
    } else {
        None
    };
    match ints {
        Some(v) => ndarray(&[v.len()], ArrayOut::I64(&v)),
        None => ndarray(&[levels.len()], ArrayOut::Str(levels)),
    }
}

fn index_array(ix: &[usize]) -> ScResult<Value> {
    let v: Vec<i64> = ix.iter().map(|&i| i as i64).collect();
    ndarray(&[v.len()], ArrayOut::I64(&v))
}

/// A random (version 4) UUID string.
fn uuid4(rng: &mut ChaCha8Rng) -> String {
    let mut b: [u8; 16] = rng.random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `[n_out, n_in + n_cov]` (torch layout) from feature weights and covariate columns.
fn join_columns(n_out: usize, n_in: usize, w: &[f32], wc: &[f32]) -> Vec<f32> {
    let n_cov = wc.len() / n_out.max(1);
    let mut out = Vec::with_capacity(n_out * (n_in + n_cov));
    for o in 0..n_out {
        out.extend_from_slice(&w[o * n_in..(o + 1) * n_in]);
        out.extend((0..n_cov).map(|c| wc[c * n_out + o]));
    }
    out
}

/// The scArches query model as scvi-tools' `load_query_data` + `train` leaves it, ready for
/// [`write_scvi_model`]: every tensor of `reference`, the FC layers that take the batch
/// replaced by `model`'s trained weights (feature columns with the continuous covariates',
/// then the one-hot columns: the reference's batch and categorical-covariate columns and,
/// appended after all of them as `load_query_data` pads, the new ones), `l_encoder`'s first
/// layer enlarged like the others (new columns `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, as
/// torch initialises them; scvi-tools trains them but they are unused with the observed
/// library size), and an `attr_dict` with the query's registry (batch categories and each
/// extra categorical covariate's `mappings` / `n_cats_per_key` extended, `n_obs`),
/// `is_trained_ = True`, the query's train / validation cells and its training history
/// ([`QueryInfo::history`]). The continuous covariates' registry entries, `setup_args` and
/// `init_params_` stay the reference's (scvi-tools derives `n_cats_per_cov` and
/// `n_continuous_cov` from the registry when it loads the model).
pub fn query_model_file(
    reference: &ScviModelFile,
    model: &SurgeryModel,
    info: &QueryInfo,
) -> ScResult<ScviModelFile> {
    let n_new = info.new_batch_levels.len();
    let n_batch = reference.n_batch + n_new;
    if model.n_batch() != n_batch || model.n_genes() != reference.var_names.len() {
        return Err(ierr(format!(
            "the trained model ({} batches, {} genes) does not extend this reference ({} + {n_new} \
             batches, {} genes)",
            model.n_batch(),
            model.n_genes(),
            reference.n_batch,
            reference.var_names.len()
        )));
    }
    if n_new > 0 && reference.setup.batch_key.is_none() {
        return Err(ierr(
            "new batch levels for a model without batch_key: the query cannot be registered",
        ));
    }
    let n_cats = reference.extra_categorical.len();
    let no_new: Vec<Vec<String>> = vec![Vec::new(); n_cats];
    let new_cats = if info.new_cat_levels.is_empty() {
        &no_new
    } else {
        &info.new_cat_levels
    };
    if new_cats.len() != n_cats {
        return Err(ierr(format!(
            "new levels were given for {} categorical covariates but the reference has {n_cats}",
            new_cats.len()
        )));
    }
    let cat_levels: Vec<usize> = reference
        .extra_categorical
        .iter()
        .zip(new_cats)
        .map(|((_, c), n)| c.len() + n.len())
        .collect();
    if model.cat_levels() != cat_levels.as_slice()
        || model.n_cont() != reference.extra_continuous.len()
    {
        return Err(ierr(format!(
            "the trained model (categorical covariate levels {:?}, {} continuous covariates) \
             does not extend this reference (levels {cat_levels:?}, {} continuous)",
            model.cat_levels(),
            model.n_cont(),
            reference.extra_continuous.len()
        )));
    }
    // a new level must be new: the registry maps each name to one code
    let dup = |old: &[String], new: &[String], what: &str| -> ScResult<()> {
        for (k, l) in new.iter().enumerate() {
            if old.contains(l) || new[..k].contains(l) {
                return Err(ierr(format!(
                    "the new {what} level '{l}' is already a level of the query model"
                )));
            }
        }
        Ok(())
    };
    dup(&reference.batch_mapping, &info.new_batch_levels, "batch")?;
    for ((key, old), new) in reference.extra_categorical.iter().zip(new_cats) {
        dup(old, new, &format!("'{key}'"))?;
    }
    // one-hot widths as FCLayers has them: a covariate with one level has no column
    let width = |k: usize| if k > 1 { k } else { 0 };
    let old_cov = width(reference.n_batch)
        + reference
            .extra_categorical
            .iter()
            .map(|(_, c)| width(c.len()))
            .sum::<usize>();
    let new_cov = width(n_batch) + cat_levels.iter().map(|&k| width(k)).sum::<usize>();
    let mut q = reference.clone();
    for lw in model.layer_weights() {
        let key = format!("{}.weight", lw.key);
        let slot = q
            .state_dict
            .iter_mut()
            .find(|(k, _)| *k == key)
            .ok_or_else(|| ScError::Format(format!("the reference has no '{key}'")))?;
        let n_cov = lw.wc.len() / lw.n_out.max(1);
        let old = &slot.1.shape;
        if old.len() != 2
            || old[0] != lw.n_out
            || old[1] < lw.n_in
            || old[1] > lw.n_in + n_cov
            || lw.w.len() != lw.n_out * lw.n_in
            || lw.wc.len() != n_cov * lw.n_out
        {
            return Err(ScError::Dims(format!(
                "{key} has shape {old:?} in the reference but the trained layer is {} x ({} + \
                 {n_cov})",
                lw.n_out, lw.n_in
            )));
        }
        slot.1 = Tensor {
            shape: vec![lw.n_out, lw.n_in + n_cov],
            data: TensorData::F32(join_columns(lw.n_out, lw.n_in, &lw.w, &lw.wc)),
        };
    }
    // the trained BatchNorm affine parameters (decoder batch norm); running statistics and
    // num_batches_tracked stay the reference's (scvi-tools trains the query in eval mode)
    for (base, gamma, beta) in model.batch_norm_affine() {
        for (what, v) in [("weight", gamma), ("bias", beta)] {
            let key = format!("{base}.{what}");
            let slot = q
                .state_dict
                .iter_mut()
                .find(|(k, _)| *k == key)
                .ok_or_else(|| ScError::Format(format!("the reference has no '{key}'")))?;
            if slot.1.shape != [v.len()] {
                return Err(ScError::Dims(format!(
                    "{key} has shape {:?} in the reference but {} values were trained",
                    slot.1.shape,
                    v.len()
                )));
            }
            slot.1 = Tensor {
                shape: vec![v.len()],
                data: TensorData::F32(v),
            };
        }
    }
    // l_encoder takes the encoder's covariates: append its new columns
    let mut rng = ChaCha8Rng::seed_from_u64(info.seed ^ 0x5eed_1e9c_0de5);
    let g = reference.var_names.len();
    let cont = if reference.init.encode_covariates {
        reference.extra_continuous.len()
    } else {
        0
    };
    let lkey = "l_encoder.encoder.fc_layers.Layer 0.0.weight";
    if reference.init.encode_covariates && new_cov > old_cov {
        if let Some(slot) = q.state_dict.iter_mut().find(|(k, _)| k == lkey) {
            let shape = slot.1.shape.clone();
            let w = slot
                .1
                .to_f32()
                .ok_or_else(|| ScError::Format(format!("{lkey} is not floating point")))?;
            if shape.len() != 2 || shape[1] != g + cont + old_cov {
                return Err(ScError::Dims(format!(
                    "{lkey} has shape {shape:?}; expected {} inputs",
                    g + cont + old_cov
                )));
            }
            let (n_out, n_old) = (shape[0], shape[1]);
            let n_all = n_old + (new_cov - old_cov);
            let bound = 1.0 / (n_all as f32).sqrt();
            // torch draws the whole enlarged matrix; scannot draws only the new columns
            let n_add = n_all - n_old;
            let mut joined = Vec::with_capacity(n_out * n_all);
            for o in 0..n_out {
                joined.extend_from_slice(&w[o * n_old..(o + 1) * n_old]);
                joined.extend((0..n_add).map(|_| rng.random_range(-bound..bound)));
            }
            slot.1 = Tensor {
                shape: vec![n_out, n_all],
                data: TensorData::F32(joined),
            };
        }
    }

    // registry_ of the query
    let mut reg = reference
        .attr_dict
        .get("registry_")
        .cloned()
        .unwrap_or(Value::Dict(vec![]));
    const FR: &str = "field_registries";
    let n_obs = Value::Int(info.n_obs as i64);
    reg = set_path(&reg, &[FR, "X", "state_registry", "n_obs"], n_obs.clone());
    reg = set_path(&reg, &[FR, "X", "summary_stats", "n_cells"], n_obs);
    if n_new > 0 {
        q.batch_mapping
            .extend(info.new_batch_levels.iter().cloned());
        q.n_batch = n_batch;
        let path = [FR, "batch", "state_registry", "categorical_mapping"];
        let old = get_path(&reg, &path).cloned();
        reg = set_path(&reg, &path, mapping_array(old.as_ref(), &q.batch_mapping)?);
        reg = set_path(
            &reg,
            &[FR, "batch", "summary_stats", "n_batch"],
            Value::Int(n_batch as i64),
        );
    }
    // extra categorical covariates: {'mappings': {key: levels}, 'field_keys': [...],
    // 'n_cats_per_key': [...]} as CategoricalJointObsField.transfer_field(extend_categories)
    if new_cats.iter().any(|n| !n.is_empty()) {
        const CC: &str = "extra_categorical_covs";
        for ((key, levels), new) in q.extra_categorical.iter_mut().zip(new_cats) {
            levels.extend(new.iter().cloned());
            let path = [FR, CC, "state_registry", "mappings", key.as_str()];
            let old = get_path(&reg, &path).cloned();
            reg = set_path(&reg, &path, mapping_array(old.as_ref(), levels)?);
        }
        reg = set_path(
            &reg,
            &[FR, CC, "state_registry", "n_cats_per_key"],
            Value::List(cat_levels.iter().map(|&k| Value::Int(k as i64)).collect()),
        );
    }
    // a fresh id per saved model (as a new AnnData setup gets), not derived from the seed
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut id_rng = ChaCha8Rng::seed_from_u64(nanos ^ ((std::process::id() as u64) << 40));
    reg = set_key(&reg, "_scvi_uuid", Value::Str(uuid4(&mut id_rng)));
    let mut attr = reference.attr_dict.clone();
    if attr.as_dict().is_none() {
        attr = Value::Dict(vec![]);
    }
    attr = set_key(&attr, "registry_", reg);
    attr = set_key(&attr, "is_trained_", Value::Bool(true));
    let history = if info.history.is_empty() {
        Value::None
    } else {
        Value::Dict(
            info.history
                .iter()
                .map(|(k, v)| (Value::Str(k.clone()), history_frame(k, v)))
                .collect(),
        )
    };
    attr = set_key(&attr, "history_", history);
    attr = set_key(&attr, "train_indices_", index_array(&info.train_indices)?);
    attr = set_key(
        &attr,
        "validation_indices_",
        index_array(&info.validation_indices)?,
    );
    attr = set_key(&attr, "test_indices_", index_array(&[])?);
    // in the form a reader gives back (protocol 2 spells bytes as _codecs.encode calls)
    q.attr_dict = pickle::parse(&pickle::writer::write_protocol2(&attr)?)?;
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::numpy::{ndarray as read_array, ArrayData};

    #[test]
    fn integer_mappings_stay_integer() {
        let ints = ndarray(&[2], ArrayOut::I64(&[0, 1])).unwrap();
        let strs = ndarray(&[2], ArrayOut::Str(&["0".into(), "1".into()])).unwrap();
        let levels: Vec<String> = ["0", "1", "7"].iter().map(|s| s.to_string()).collect();
        let a = read_array(&mapping_array(Some(&ints), &levels).unwrap()).unwrap();
        assert_eq!(a.data, ArrayData::I64(vec![0, 1, 7]));
        // a level that is no integer, a str reference or none: object array of str
        let mixed: Vec<String> = ["0", "1", "q"].iter().map(|s| s.to_string()).collect();
        for (r, l) in [
            (Some(&ints), &mixed),
            (Some(&strs), &levels),
            (None, &levels),
        ] {
            let a = read_array(&mapping_array(r, l).unwrap()).unwrap();
            assert_eq!(a.to_strings().as_ref(), Some(l));
        }
    }

    /// a reference whose batch and cond columns were integer codes: the query model's
    /// mappings are int64 arrays with the new levels appended
    #[test]
    fn query_model_keeps_integer_mappings() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../tests/testthat/fixtures/scvi/covs");
        let mut r = super::super::read_scvi_model(&dir).unwrap();
        const FR: &str = "field_registries";
        let reg = r.attr_dict.get("registry_").unwrap().clone();
        let reg = set_path(
            &reg,
            &[FR, "batch", "state_registry", "categorical_mapping"],
            ndarray(&[2], ArrayOut::I64(&[10, 11])).unwrap(),
        );
        let reg = set_path(
            &reg,
            &[
                FR,
                "extra_categorical_covs",
                "state_registry",
                "mappings",
                "cond",
            ],
            ndarray(&[3], ArrayOut::I64(&[1, 2, 3])).unwrap(),
        );
        r.attr_dict = set_key(&r.attr_dict, "registry_", reg);
        r.batch_mapping = vec!["10".into(), "11".into()];
        r.extra_categorical[0].1 = vec!["1".into(), "2".into(), "3".into()];
        let s = SurgeryModel::from_model_covs(&r, 1, &[1], 0).unwrap();
        let info = QueryInfo {
            new_batch_levels: vec!["12".into()],
            new_cat_levels: vec![vec!["4".into()]],
            n_obs: 5,
            ..Default::default()
        };
        let q = query_model_file(&r, &s, &info).unwrap();
        let back = super::super::parse_scvi_model(&scvi_model_bytes(&q).unwrap()).unwrap();
        let fr = back
            .attr_dict
            .get("registry_")
            .and_then(|x| x.get(FR))
            .unwrap();
        let b = get_path(fr, &["batch", "state_registry", "categorical_mapping"]).unwrap();
        assert_eq!(
            read_array(b).unwrap().data,
            ArrayData::I64(vec![10, 11, 12])
        );
        let c = get_path(
            fr,
            &[
                "extra_categorical_covs",
                "state_registry",
                "mappings",
                "cond",
            ],
        )
        .unwrap();
        assert_eq!(
            read_array(c).unwrap().data,
            ArrayData::I64(vec![1, 2, 3, 4])
        );
        assert_eq!(back.batch_mapping, ["10", "11", "12"]);
        assert_eq!(back.extra_categorical[0].1, ["1", "2", "3", "4"]);
    }
}
