//! A safe reader for Python pickles (protocols 2 to 5, plus the simple protocol 0/1 opcodes).
//!
//! [`parse`] runs a small pickle virtual machine that **never executes anything**: a class or
//! function reference (`GLOBAL`, `STACK_GLOBAL`) becomes a [`Value::Global`], a call or
//! instantiation (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`, `OBJ`) becomes a [`Value::Object`]
//! holding the callable and its arguments, and `BUILD` stores the state in that object. Unknown
//! classes (scikit-learn estimators, Cython objects, pandas internals) are therefore never an
//! error: they are opaque objects the caller may inspect or ignore.
//!
//! Two constructors are interpreted because every reader needs them as plain containers:
//! `collections.OrderedDict` and `collections.defaultdict` give a [`Value::Dict`], and a `BUILD`
//! on a dict or list (torch's `_metadata` attribute on state dicts) is ignored.
//!
//! [`numpy`] turns the numpy patterns (`_reconstruct` + `BUILD`, protocol 5 `_frombuffer`,
//! numpy scalars) into typed arrays, and [`as_bytes`] decodes the protocol-2 spelling of
//! `bytes` (`_codecs.encode(str, 'latin1')`).
//!
//! Corrupt, truncated or hostile input gives [`ScError::Format`], never a panic: every length
//! is checked against the remaining input, and the object count, the nesting depth and the size
//! of the materialised tree are bounded ([`Limits`]).

pub mod numpy;
mod vm;
pub mod writer;

use crate::error::{ScError, ScResult};
use std::borrow::Cow;

/// Bounds that keep a hostile pickle from exhausting memory or the stack.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most objects the virtual machine may create.
    pub max_objects: usize,
    /// Deepest nesting of containers in the result.
    pub max_depth: usize,
    /// Most values in the materialised tree (shared references are copied, so a tiny pickle
    /// could otherwise expand exponentially).
    pub max_values: usize,
    /// Most bytes of strings and byte strings in the materialised tree.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_objects: 50_000_000,
            max_depth: 100,
            max_values: 100_000_000,
            max_bytes: 8 << 30,
        }
    }
}

/// Parse a pickle with the default [`Limits`].
pub fn parse(data: &[u8]) -> ScResult<Value> {
    vm::run(data, Limits::default())
}

/// Parse a pickle with explicit [`Limits`].
pub fn parse_with_limits(data: &[u8], limits: Limits) -> ScResult<Value> {
    vm::run(data, limits)
}

/// A Python object as described by a pickle, without running any of its code.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside `i64`: little-endian two's-complement bytes, as `LONG1`/`LONG4` store it.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    /// `bytes` and `bytearray`.
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict (also `OrderedDict`, `defaultdict`) in insertion order; a repeated key keeps its
    /// first position and its last value, as in Python.
    Dict(Vec<(Value, Value)>),
    /// `set` or `frozenset`, in pickle order.
    Set(Vec<Value>),
    /// A reference to a class or function, `module.name`; never imported.
    Global {
        module: String,
        name: String,
    },
    /// The result of calling or instantiating something (`REDUCE`, `NEWOBJ`...).
    Object(Box<Object>),
    /// `BUILD` applied to something that is neither an object nor a container.
    Build {
        obj: Box<Value>,
        state: Box<Value>,
    },
    /// A persistent id (`BINPERSID`/`PERSID`), resolved by the caller (torch storages).
    PersId(Box<Value>),
    /// A reference back to a container that is still being built (a recursive structure).
    Recursive,
}

/// A call recorded instead of executed.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// What was called: usually a [`Value::Global`] (the class for `NEWOBJ`).
    pub callable: Value,
    /// The positional arguments, a [`Value::Tuple`] for well-formed pickles.
    pub args: Value,
    /// Keyword arguments (`NEWOBJ_EX` only).
    pub kwargs: Option<Value>,
    /// True for `NEWOBJ`/`NEWOBJ_EX` (`cls.__new__(cls, *args)`), false for a plain call.
    pub new_obj: bool,
    /// The state given by `BUILD` (usually the instance `__dict__`).
    pub state: Option<Value>,
    /// Items added by `APPEND`/`APPENDS` (list subclasses).
    pub list_items: Vec<Value>,
    /// Items added by `SETITEM`/`SETITEMS` (dict subclasses).
    pub dict_items: Vec<(Value, Value)>,
}

impl Object {
    /// `(module, name)` of the callable when it is a global.
    pub fn callable_name(&self) -> Option<(&str, &str)> {
        self.callable.global()
    }

    /// The positional arguments as a slice (empty when they are not a tuple).
    pub fn arg_slice(&self) -> &[Value] {
        self.args.as_seq().unwrap_or(&[])
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A Python `int` or `bool` as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// A Python `float`, `int` or `bool` as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            Value::Bool(b) => Some(*b as i64 as f64),
            _ => None,
        }
    }

    /// A Python `bool` (or the ints 0 and 1).
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// The items of a list or a tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// The pairs of a dict.
    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The value stored under the string key `key` in a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// `(module, name)` of a global.
    pub fn global(&self) -> Option<(&str, &str)> {
        match self {
            Value::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// True for the object produced by calling the global `module.name`.
    pub fn is_call_of(&self, module: &str, name: &str) -> bool {
        self.as_object()
            .and_then(Object::callable_name)
            .is_some_and(|(m, n)| m == module && n == name)
    }

    /// A short description for error messages: `int`, `str`, `dict`, `object of pandas...`.
    pub fn describe(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) | Value::BigInt(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::List(_) => "list".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::Dict(_) => "dict".into(),
            Value::Set(_) => "set".into(),
            Value::Global { module, name } => format!("reference to {module}.{name}"),
            Value::Object(o) => match o.callable_name() {
                Some((m, n)) => format!("{m}.{n} object"),
                None => "object".into(),
            },
            Value::Build { .. } => "built object".into(),
            Value::PersId(_) => "persistent id".into(),
            Value::Recursive => "recursive reference".into(),
        }
    }
}

/// The content of a Python `bytes` value in any of its pickled spellings: `BINBYTES` & co.,
/// protocol 2's `_codecs.encode(str, 'latin1')`, `bytes()` / `bytearray(...)` calls.
pub fn as_bytes(v: &Value) -> Option<Cow<'_, [u8]>> {
    match v {
        Value::Bytes(b) => Some(Cow::Borrowed(b)),
        Value::Object(o) => {
            let (m, n) = o.callable_name()?;
            let args = o.arg_slice();
            match (m, n) {
                ("_codecs", "encode") => {
                    let s = args.first()?.as_str()?;
                    let enc = args.get(1).and_then(Value::as_str).unwrap_or("utf-8");
                    encode_str(s, enc)
                }
                ("__builtin__" | "builtins", "bytes" | "bytearray") => match args {
                    [] => Some(Cow::Owned(Vec::new())),
                    [Value::List(items)] => items
                        .iter()
                        .map(|x| x.as_i64().and_then(|i| u8::try_from(i).ok()))
                        .collect::<Option<Vec<u8>>>()
                        .map(Cow::Owned),
                    [Value::Str(s), enc, ..] => encode_str(s, enc.as_str()?),
                    // bytearray(b'...') and protocol 2's bytearray(_codecs.encode(...))
                    [inner] => as_bytes(inner),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

fn encode_str<'a>(s: &str, encoding: &str) -> Option<Cow<'a, [u8]>> {
    match encoding.to_ascii_lowercase().replace('_', "-").as_str() {
        "latin1" | "latin-1" | "iso-8859-1" | "iso8859-1" | "l1" => s
            .chars()
            .map(|c| u8::try_from(u32::from(c)).ok())
            .collect::<Option<Vec<u8>>>()
            .map(Cow::Owned),
        "utf-8" | "utf8" => Some(Cow::Owned(s.as_bytes().to_vec())),
        "ascii" if s.is_ascii() => Some(Cow::Owned(s.as_bytes().to_vec())),
        _ => None,
    }
}

pub(crate) fn format_err(msg: impl Into<String>) -> ScError {
    ScError::Format(msg.into())
}

#[cfg(test)]
mod tests;
