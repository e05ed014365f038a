//! A pickle writer for [`Value`] trees (protocol 4, or protocol 2 as `torch.save` writes),
//! and builders for the numpy, scikit-learn and `collections` objects in the shape Python
//! itself pickles them:
//!
//! * an object `Value::Object { callable, args, new_obj, state }` is written as
//!   `callable args NEWOBJ|REDUCE [state BUILD]` (scikit-learn estimators: `cls () NEWOBJ
//!   __dict__ BUILD`, what `copyreg.__reduce_ex__` gives with protocol >= 2);
//! * [`ndarray`] gives numpy's own `ndarray.__reduce__`: `numpy.core.multiarray._reconstruct(
//!   numpy.ndarray, (0,), b'b')` then `BUILD (1, shape, dtype, is_fortran, data)`, with raw
//!   little-endian bytes for numbers and a list of str for object arrays; `numpy.core.*`
//!   loads under numpy 1.x and 2.x.
//!
//! * [`ordered_dict`] / [`default_dict`]: `collections.OrderedDict()` (or
//!   `defaultdict(factory)`) by `REDUCE`, then its items by `SETITEMS`, as Python does;
//! * a [`Value::PersId`] is written as its id then `BINPERSID` (torch storages).
//!
//! Protocol 2 ([`write_protocol2`]) uses only opcodes Python 2.3+ knows: `GLOBAL` instead of
//! `STACK_GLOBAL`, `BINUNICODE` for every str, bytes as `_codecs.encode(str, 'latin1')` (what
//! Python 3 writes with protocol 2) and sets as `__builtin__.set([...])`; `NEWOBJ_EX` and
//! values over 4 GiB have no protocol-2 spelling and are errors.
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
const GLOBAL: u8 = b'c';
const BINPERSID: u8 = b'Q';
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const NEWOBJ_EX: u8 = 0x92;
const BUILD: u8 = b'b';

/// Python's batch size for `APPENDS` / `SETITEMS`.
const BATCH: usize = 1000;

/// Serialise `v` as a protocol-4 pickle.
pub fn write(v: &Value) -> ScResult<Vec<u8>> {
    let mut out = vec![PROTO, 4];
    Emitter { proto: 4 }.emit(v, &mut out, 0)?;
    out.push(STOP);
    Ok(out)
}

/// Serialise `v` as a protocol-2 pickle (the protocol of `torch.save`'s `data.pkl`).
pub fn write_protocol2(v: &Value) -> ScResult<Vec<u8>> {
    let mut out = vec![PROTO, 2];
    Emitter { proto: 2 }.emit(v, &mut out, 0)?;
    out.push(STOP);
    Ok(out)
}

fn too_big(what: &str) -> ScError {
    ScError::Input(format!(
        "a {what} over 4 GiB cannot be written in a protocol-2 pickle"
    ))
}

struct Emitter {
    proto: u8,
}

fn emit_str(s: &str, out: &mut Vec<u8>, proto: u8) -> ScResult<()> {
    let b = s.as_bytes();
    if proto < 4 {
        let n = u32::try_from(b.len()).map_err(|_| too_big("string"))?;
        out.push(BINUNICODE);
        out.extend_from_slice(&n.to_le_bytes());
    } else if b.len() < 256 {
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
    Ok(())
}

impl Emitter {
    fn global(&self, module: &str, name: &str, out: &mut Vec<u8>) -> ScResult<()> {
        if self.proto < 4 {
            if module.contains('\n') || name.contains('\n') {
                return Err(ScError::Input(format!(
                    "the global {module:?}.{name:?} cannot be pickled (a newline in its name)"
                )));
            }
            out.push(GLOBAL);
            out.extend_from_slice(module.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        } else {
            emit_str(module, out, self.proto)?;
            emit_str(name, out, self.proto)?;
            out.push(STACK_GLOBAL);
        }
        Ok(())
    }

    fn emit(&self, v: &Value, out: &mut Vec<u8>, depth: usize) -> ScResult<()> {
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
            Value::Str(s) => emit_str(s, out, self.proto)?,
            Value::Bytes(b) if self.proto < 3 => {
                // Python 3's protocol-2 spelling: _codecs.encode(latin-1 str, 'latin1'), or
                // bytes() when empty
                if b.is_empty() {
                    self.global("__builtin__", "bytes", out)?;
                    out.push(EMPTY_TUPLE);
                } else {
                    self.global("_codecs", "encode", out)?;
                    let s: String = b.iter().map(|&c| char::from(c)).collect();
                    emit_str(&s, out, self.proto)?;
                    emit_str("latin1", out, self.proto)?;
                    out.push(TUPLE2);
                }
                out.push(REDUCE);
            }
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
                        self.emit(x, out, d)?;
                    }
                    out.push(APPENDS);
                }
            }
            Value::Tuple(items) => match items.len() {
                0 => out.push(EMPTY_TUPLE),
                1..=3 => {
                    for x in items {
                        self.emit(x, out, d)?;
                    }
                    out.push([TUPLE1, TUPLE2, TUPLE3][items.len() - 1]);
                }
                _ => {
                    out.push(MARK);
                    for x in items {
                        self.emit(x, out, d)?;
                    }
                    out.push(TUPLE);
                }
            },
            Value::Dict(items) => {
                out.push(EMPTY_DICT);
                for chunk in items.chunks(BATCH) {
                    out.push(MARK);
                    for (k, x) in chunk {
                        self.emit(k, out, d)?;
                        self.emit(x, out, d)?;
                    }
                    out.push(SETITEMS);
                }
            }
            Value::Set(items) if self.proto < 4 => {
                self.global("__builtin__", "set", out)?;
                self.emit(&Value::List(items.clone()), out, d)?;
                out.push(TUPLE1);
                out.push(REDUCE);
            }
            Value::Set(items) => {
                out.push(EMPTY_SET);
                for chunk in items.chunks(BATCH) {
                    out.push(MARK);
                    for x in chunk {
                        self.emit(x, out, d)?;
                    }
                    out.push(ADDITEMS);
                }
            }
            Value::Global { module, name } => self.global(module, name, out)?,
            Value::Object(o) => {
                self.emit(&o.callable, out, d)?;
                self.emit(&o.args, out, d)?;
                match (&o.kwargs, o.new_obj) {
                    (Some(_), true) if self.proto < 4 => return Err(ScError::Input(
                        "keyword arguments (NEWOBJ_EX) cannot be written in a protocol-2 pickle"
                            .into(),
                    )),
                    (Some(kw), true) => {
                        self.emit(kw, out, d)?;
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
                // list and dict subclasses (OrderedDict, defaultdict): items after construction
                for chunk in o.list_items.chunks(BATCH) {
                    out.push(MARK);
                    for x in chunk {
                        self.emit(x, out, d)?;
                    }
                    out.push(APPENDS);
                }
                for chunk in o.dict_items.chunks(BATCH) {
                    out.push(MARK);
                    for (k, x) in chunk {
                        self.emit(k, out, d)?;
                        self.emit(x, out, d)?;
                    }
                    out.push(SETITEMS);
                }
                if let Some(s) = &o.state {
                    self.emit(s, out, d)?;
                    out.push(BUILD);
                }
            }
            Value::Build { obj, state } => {
                self.emit(obj, out, d)?;
                self.emit(state, out, d)?;
                out.push(BUILD);
            }
            Value::PersId(id) => {
                self.emit(id, out, d)?;
                out.push(BINPERSID);
            }
            Value::Recursive => {
                return Err(ScError::Input(format!(
                    "a {} cannot be pickled by this writer",
                    v.describe()
                )))
            }
        }
        Ok(())
    }
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

/// `collections.OrderedDict()` filled with `items` (read back as a [`Value::Dict`]).
pub fn ordered_dict(items: Vec<(Value, Value)>) -> Value {
    Value::Object(Box::new(super::Object {
        callable: global("collections", "OrderedDict"),
        args: Value::Tuple(vec![]),
        kwargs: None,
        new_obj: false,
        state: None,
        list_items: Vec::new(),
        dict_items: items,
    }))
}

/// `collections.defaultdict(factory)` filled with `items`; `factory` is e.g.
/// `global("__builtin__", "dict")` (read back as a [`Value::Dict`]).
pub fn default_dict(factory: Value, items: Vec<(Value, Value)>) -> Value {
    Value::Object(Box::new(super::Object {
        callable: global("collections", "defaultdict"),
        args: Value::Tuple(vec![factory]),
        kwargs: None,
        new_obj: false,
        state: None,
        list_items: Vec::new(),
        dict_items: items,
    }))
}
