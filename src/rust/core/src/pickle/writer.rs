//! A pickle writer (protocol 4) for [`Value`] trees, and builders for the numpy and
//! scikit-learn objects in the shape Python itself pickles them:
//!
//! * an object `Value::Object { callable, args, new_obj, state }` is written as
//!   `callable args NEWOBJ|REDUCE [state BUILD]` (scikit-learn estimators: `cls () NEWOBJ
//!   __dict__ BUILD`, what `copyreg.__reduce_ex__` gives with protocol >= 2);
//! * [`ndarray`] gives numpy's own `ndarray.__reduce__`: `numpy.core.multiarray._reconstruct(
//!   numpy.ndarray, (0,), b'b')` then `BUILD (1, shape, dtype, is_fortran, data)`, with raw
//!   little-endian bytes for numbers and a list of str for object arrays; `numpy.core.*`
//!   loads under numpy 1.x and 2.x.
//!
//! No memo is written (a pickle does not need one), no frames (optional in protocol 4).

use super::Value;
use crate::error::{ScError, ScResult};

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const BINUNICODE8: u8 = 0x8d;
const SHORT_BINBYTES: u8 = b'C';
const BINBYTES: u8 = b'B';
const BINBYTES8: u8 = 0x8e;
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';
const EMPTY_SET: u8 = 0x8f;
const ADDITEMS: u8 = 0x90;
const STACK_GLOBAL: u8 = 0x93;
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const NEWOBJ_EX: u8 = 0x92;
const BUILD: u8 = b'b';

/// Python's batch size for `APPENDS` / `SETITEMS`.
const BATCH: usize = 1000;

/// Serialise `v` as a protocol-4 pickle.
pub fn write(v: &Value) -> ScResult<Vec<u8>> {
    let mut out = vec![PROTO, 4];
    emit(v, &mut out, 0)?;
    out.push(STOP);
    Ok(out)
}

fn emit_str(s: &str, out: &mut Vec<u8>) {
    let b = s.as_bytes();
    if b.len() < 256 {
        out.push(SHORT_BINUNICODE);
        out.push(b.len() as u8);
    } else if b.len() <= u32::MAX as usize {
        out.push(BINUNICODE);
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    } else {
        out.push(BINUNICODE8);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
    }
    out.extend_from_slice(b);
}

fn emit(v: &Value, out: &mut Vec<u8>, depth: usize) -> ScResult<()> {
    if depth > 200 {
        return Err(ScError::Input("value nested too deeply to pickle".into()));
    }
    let d = depth + 1;
    match v {
        Value::None => out.push(NONE),
        Value::Bool(b) => out.push(if *b { NEWTRUE } else { NEWFALSE }),
        Value::Int(i) => {
            let i = *i;
            if (0..256).contains(&i) {
                out.extend_from_slice(&[BININT1, i as u8]);
            } else if (0..65536).contains(&i) {
                out.push(BININT2);
                out.extend_from_slice(&(i as u16).to_le_bytes());
            } else if i >= i32::MIN as i64 && i <= i32::MAX as i64 {
                out.push(BININT);
                out.extend_from_slice(&(i as i32).to_le_bytes());
            } else {
                // shortest two's-complement little-endian encoding
                let mut b = i.to_le_bytes().to_vec();
                while b.len() > 1 {
                    let last = b[b.len() - 1];
                    let prev = b[b.len() - 2];
                    if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                        b.pop();
                    } else {
                        break;
                    }
                }
                out.extend_from_slice(&[LONG1, b.len() as u8]);
                out.extend_from_slice(&b);
            }
        }
        Value::BigInt(b) => {
            if b.len() > 255 {
                return Err(ScError::Input("integer too large to pickle".into()));
            }
            out.extend_from_slice(&[LONG1, b.len() as u8]);
            out.extend_from_slice(b);
        }
        Value::Float(f) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => emit_str(s, out),
        Value::Bytes(b) => {
            if b.len() < 256 {
                out.extend_from_slice(&[SHORT_BINBYTES, b.len() as u8]);
            } else if b.len() <= u32::MAX as usize {
                out.push(BINBYTES);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            } else {
                out.push(BINBYTES8);
                out.extend_from_slice(&(b.len() as u64).to_le_bytes());
            }
            out.extend_from_slice(b);
        }
        Value::List(items) => {
            out.push(EMPTY_LIST);
            for chunk in items.chunks(BATCH) {
                out.push(MARK);
                for x in chunk {
                    emit(x, out, d)?;
                }
                out.push(APPENDS);
            }
        }
        Value::Tuple(items) => match items.len() {
            0 => out.push(EMPTY_TUPLE),
            1..=3 => {
                for x in items {
                    emit(x, out, d)?;
                }
                out.push([TUPLE1, TUPLE2, TUPLE3][items.len() - 1]);
            }
            _ => {
                out.push(MARK);
                for x in items {
                    emit(x, out, d)?;
                }
                out.push(TUPLE);
            }
        },
        Value::Dict(items) => {
            out.push(EMPTY_DICT);
            for chunk in items.chunks(BATCH) {
                out.push(MARK);
                for (k, x) in chunk {
                    emit(k, out, d)?;
                    emit(x, out, d)?;
                }
                out.push(SETITEMS);
            }
        }
        Value::Set(items) => {
            out.push(EMPTY_SET);
            for chunk in items.chunks(BATCH) {
                out.push(MARK);
                for x in chunk {
                    emit(x, out, d)?;
                }
                out.push(ADDITEMS);
            }
        }
        Value::Global { module, name } => {
            emit_str(module, out);
            emit_str(name, out);
            out.push(STACK_GLOBAL);
        }
        Value::Object(o) => {
            emit(&o.callable, out, d)?;
            emit(&o.args, out, d)?;
            match (&o.kwargs, o.new_obj) {
                (Some(kw), true) => {
                    emit(kw, out, d)?;
                    out.push(NEWOBJ_EX);
                }
                (Some(_), false) => {
                    return Err(ScError::Input(
                        "keyword arguments need NEWOBJ_EX (new_obj = true)".into(),
                    ))
                }
                (None, true) => out.push(NEWOBJ),
                (None, false) => out.push(REDUCE),
            }
            if !o.list_items.is_empty() || !o.dict_items.is_empty() {
                return Err(ScError::Input(
                    "list or dict subclasses cannot be pickled by this writer".into(),
                ));
            }
            if let Some(s) = &o.state {
                emit(s, out, d)?;
                out.push(BUILD);
            }
        }
        Value::Build { obj, state } => {
            emit(obj, out, d)?;
            emit(state, out, d)?;
            out.push(BUILD);
        }
        Value::PersId(_) | Value::Recursive => {
            return Err(ScError::Input(format!(
                "a {} cannot be pickled by this writer",
                v.describe()
            )))
        }
    }
    Ok(())
}

/// `module.name`, a class or function reference.
pub fn global(module: &str, name: &str) -> Value {
    Value::Global {
        module: module.into(),
        name: name.into(),
    }
}

/// A call `callable(*args)` (REDUCE) or `cls.__new__(cls, *args)` (NEWOBJ), then `BUILD state`.
pub fn object(callable: Value, args: Vec<Value>, new_obj: bool, state: Option<Value>) -> Value {
    Value::Object(Box::new(super::Object {
        callable,
        args: Value::Tuple(args),
        kwargs: None,
        new_obj,
        state,
        list_items: Vec::new(),
        dict_items: Vec::new(),
    }))
}

/// A dict with str keys.
pub fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        items
            .into_iter()
            .map(|(k, v)| (Value::Str(k.into()), v))
            .collect(),
    )
}

/// `numpy.dtype(code, False, True)` with its `__setstate__` (version 3), as numpy pickles it.
/// `code` is e.g. `f8`, `i4`, `i8`, `O8`; object dtypes use byte order `|`.
pub fn dtype(code: &str) -> Value {
    let is_object = code.starts_with('O');
    let state = Value::Tuple(vec![
        Value::Int(3),
        Value::Str(if is_object { "|" } else { "<" }.into()),
        Value::None,
        Value::None,
        Value::None,
        Value::Int(-1),
        Value::Int(-1),
        Value::Int(if is_object { 63 } else { 0 }),
    ]);
    object(
        global("numpy", "dtype"),
        vec![
            Value::Str(code.into()),
            Value::Bool(false),
            Value::Bool(true),
        ],
        false,
        Some(state),
    )
}

/// The data of a numpy array to write.
pub enum ArrayOut<'a> {
    F64(&'a [f64]),
    I32(&'a [i32]),
    I64(&'a [i64]),
    /// An object array of str (numpy dtype `O`).
    Str(&'a [String]),
}

/// A C-ordered numpy array of `shape`, pickled as `ndarray.__reduce__` does.
pub fn ndarray(shape: &[usize], data: ArrayOut) -> ScResult<Value> {
    let n: usize = shape.iter().product();
    let (code, len, payload) = match data {
        ArrayOut::F64(x) => (
            "f8",
            x.len(),
            Value::Bytes(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ),
        ArrayOut::I32(x) => (
            "i4",
            x.len(),
            Value::Bytes(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ),
        ArrayOut::I64(x) => (
            "i8",
            x.len(),
            Value::Bytes(x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ),
        ArrayOut::Str(x) => (
            "O8",
            x.len(),
            Value::List(x.iter().map(|s| Value::Str(s.clone())).collect()),
        ),
    };
    if len != n {
        return Err(ScError::Dims(format!(
            "{len} values for an array of shape {shape:?}"
        )));
    }
    let state = Value::Tuple(vec![
        Value::Int(1),
        Value::Tuple(shape.iter().map(|&d| Value::Int(d as i64)).collect()),
        dtype(code),
        Value::Bool(false),
        payload,
    ]);
    Ok(object(
        global("numpy.core.multiarray", "_reconstruct"),
        vec![
            global("numpy", "ndarray"),
            Value::Tuple(vec![Value::Int(0)]),
            Value::Bytes(b"b".to_vec()),
        ],
        false,
        Some(state),
    ))
}

/// A numpy scalar `numpy.core.multiarray.scalar(dtype('i8'), bytes)`.
pub fn scalar_i64(v: i64) -> Value {
    object(
        global("numpy.core.multiarray", "scalar"),
        vec![dtype("i8"), Value::Bytes(v.to_le_bytes().to_vec())],
        false,
        None,
    )
}
