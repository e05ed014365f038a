//! numpy arrays and scalars from a pickled [`Value`] tree, without numpy.
//!
//! Recognised spellings (numpy 1.x writes `numpy.core.*`, numpy 2.x `numpy._core.*`):
//! * `_reconstruct(ndarray, (0,), b'b')` + `BUILD (version, shape, dtype, is_fortran, data)`
//!   (the 4-tuple without version is accepted too); `data` is raw bytes, in Fortran order when
//!   `is_fortran`, or a list of Python objects for object arrays;
//! * protocol 5: `numeric._frombuffer(buffer, dtype, shape, order)`;
//! * `multiarray.scalar(dtype, bytes)`: a numpy scalar (an array of shape `[]`).
//!
//! Dtypes: `numpy.dtype(code, False, True)` + `BUILD (3, byteorder, subarray, names, fields,
//! elsize, alignment, flags[, metadata])`, codes `b1 i1 i2 i4 i8 u1 u2 u4 u8 f2 f4 f8 U<n> S<n>
//! O<n>`, little or big endian. Arrays are returned in **C (row-major) order** whatever the
//! layout in the file.

use super::{as_bytes, format_err, Value};
use crate::error::ScResult;

/// The element type of a numpy array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dtype {
    /// numpy kind character: `b` (bool), `i`, `u`, `f`, `U` (unicode), `S` (bytes), `O` (object).
    pub kind: char,
    /// Bytes per element (`4 n` for `U<n>`).
    pub itemsize: usize,
    pub big_endian: bool,
}

/// Array elements, always in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    Bool(Vec<bool>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    /// `f2` is widened to f32.
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// `<U` unicode strings, trailing NULs removed.
    Str(Vec<String>),
    /// `S` byte strings, trailing NULs removed.
    Bytes(Vec<Vec<u8>>),
    /// Object arrays: any Python values.
    Object(Vec<Value>),
}

/// A decoded numpy array (a scalar has an empty shape and one element).
#[derive(Debug, Clone, PartialEq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: ArrayData,
}

impl NdArray {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numeric and boolean elements as f64; `None` for strings and objects (object arrays of
    /// Python numbers are converted).
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        Some(match &self.data {
            ArrayData::Bool(v) => v.iter().map(|&b| b as u8 as f64).collect(),
            ArrayData::I8(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::I16(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::I32(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::U8(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::U16(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::U32(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::U64(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            ArrayData::F64(v) => v.clone(),
            ArrayData::Object(v) => v.iter().map(Value::as_f64).collect::<Option<_>>()?,
            ArrayData::Str(_) | ArrayData::Bytes(_) => return None,
        })
    }

    /// Integer and boolean elements as i64 (floats only when integral).
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        Some(match &self.data {
            ArrayData::Bool(v) => v.iter().map(|&b| b as i64).collect(),
            ArrayData::I8(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::I16(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::I64(v) => v.clone(),
            ArrayData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::U16(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::U32(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::U64(v) => v
                .iter()
                .map(|&x| i64::try_from(x).ok())
                .collect::<Option<_>>()?,
            ArrayData::Object(v) => v.iter().map(Value::as_i64).collect::<Option<_>>()?,
            _ => self
                .to_f64()?
                .into_iter()
                .map(|x| (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64))
                .collect::<Option<_>>()?,
        })
    }

    /// Text elements: `<U` arrays, object arrays of `str`, and `S` arrays that are UTF-8.
    pub fn to_strings(&self) -> Option<Vec<String>> {
        match &self.data {
            ArrayData::Str(v) => Some(v.clone()),
            ArrayData::Object(v) => v.iter().map(|x| x.as_str().map(str::to_owned)).collect(),
            ArrayData::Bytes(v) => v
                .iter()
                .map(|b| String::from_utf8(b.clone()).ok())
                .collect(),
            _ => None,
        }
    }
}

fn multiarray(module: &str) -> bool {
    matches!(module, "numpy.core.multiarray" | "numpy._core.multiarray")
}

fn numeric(module: &str) -> bool {
    matches!(module, "numpy.core.numeric" | "numpy._core.numeric")
}

/// True when `v` looks like a pickled numpy array or scalar (worth calling [`ndarray`] on).
pub fn is_ndarray(v: &Value) -> bool {
    v.as_object()
        .and_then(|o| o.callable_name())
        .is_some_and(|(m, n)| {
            (multiarray(m) && (n == "_reconstruct" || n == "scalar"))
                || (numeric(m) && n == "_frombuffer")
        })
}

/// Decode a pickled numpy array or numpy scalar.
pub fn ndarray(v: &Value) -> ScResult<NdArray> {
    let bad = |what: &str| {
        format_err(format!(
            "expected a numpy array but {what}; the file was not written by a supported numpy \
             version or is corrupt"
        ))
    };
    let o = v
        .as_object()
        .ok_or_else(|| bad(&format!("found a {}", v.describe())))?;
    let (m, n) = o
        .callable_name()
        .ok_or_else(|| bad("found an object without a class"))?;
    let args = o.arg_slice();
    if multiarray(m) && n == "_reconstruct" {
        let state = o
            .state
            .as_ref()
            .and_then(Value::as_seq)
            .ok_or_else(|| bad("the array has no state tuple"))?;
        let (shape, dtype, fortran, data) = match state {
            [_, s, d, f, x] | [s, d, f, x] => (s, d, f, x),
            _ => return Err(bad("the array state tuple has the wrong length")),
        };
        let shape = shape_of(shape).ok_or_else(|| bad("its shape is not a tuple of integers"))?;
        let dtype = parse_dtype(dtype)?;
        let fortran = fortran
            .as_bool()
            .ok_or_else(|| bad("its Fortran flag is not a bool"))?;
        from_data(shape, dtype, fortran, data)
    } else if numeric(m) && n == "_frombuffer" {
        let [buf, dtype, shape, order, ..] = args else {
            return Err(bad("_frombuffer has too few arguments"));
        };
        let shape = shape_of(shape).ok_or_else(|| bad("its shape is not a tuple of integers"))?;
        let dtype = parse_dtype(dtype)?;
        let fortran = match order.as_str() {
            Some("F") => true,
            Some("C") | Some("A") | Some("K") | None => false,
            Some(other) => return Err(bad(&format!("its order is '{other}'"))),
        };
        from_data(shape, dtype, fortran, buf)
    } else if multiarray(m) && n == "scalar" {
        let [dtype, rest @ ..] = args else {
            return Err(bad("the numpy scalar has no dtype"));
        };
        let dtype = parse_dtype(dtype)?;
        if dtype.kind == 'O' {
            let item = rest.first().cloned().unwrap_or(Value::None);
            return Ok(NdArray {
                shape: vec![],
                dtype,
                data: ArrayData::Object(vec![item]),
            });
        }
        let data = rest
            .first()
            .ok_or_else(|| bad("the numpy scalar has no data"))?;
        from_data(vec![], dtype, false, data)
    } else {
        Err(bad(&format!("found a {m}.{n} object")))
    }
}

/// A number stored either as a Python number or a numpy scalar (or one-element array).
pub fn scalar_f64(v: &Value) -> Option<f64> {
    if let Some(x) = v.as_f64() {
        return Some(x);
    }
    let a = ndarray(v).ok()?;
    if a.len() != 1 {
        return None;
    }
    a.to_f64()?.first().copied()
}

/// An integer stored either as a Python int or a numpy scalar (or one-element array).
pub fn scalar_i64(v: &Value) -> Option<i64> {
    if let Some(x) = v.as_i64() {
        return Some(x);
    }
    let a = ndarray(v).ok()?;
    if a.len() != 1 {
        return None;
    }
    a.to_i64()?.first().copied()
}

fn shape_of(v: &Value) -> Option<Vec<usize>> {
    match v {
        Value::Int(i) => usize::try_from(*i).ok().map(|n| vec![n]),
        _ => v
            .as_seq()?
            .iter()
            .map(|x| x.as_i64().and_then(|i| usize::try_from(i).ok()))
            .collect(),
    }
}

/// Parse a pickled `numpy.dtype`.
pub fn parse_dtype(v: &Value) -> ScResult<Dtype> {
    let bad = |what: String| {
        format_err(format!(
            "unsupported numpy dtype: {what}; only bool, integer, float, unicode, bytes and \
             object arrays can be read"
        ))
    };
    let o = v
        .as_object()
        .filter(|o| {
            o.callable_name()
                .is_some_and(|(m, n)| n == "dtype" && m.starts_with("numpy"))
        })
        .ok_or_else(|| bad(format!("expected numpy.dtype, found a {}", v.describe())))?;
    let code = o
        .arg_slice()
        .first()
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the dtype has no type code".into()))?;
    let mut big_endian = cfg!(target_endian = "big");
    let code = match code.as_bytes().first() {
        Some(b'<') => {
            big_endian = false;
            &code[1..]
        }
        Some(b'>') => {
            big_endian = true;
            &code[1..]
        }
        Some(b'|' | b'=') => &code[1..],
        _ => code,
    };
    if let Some(state) = o.state.as_ref().and_then(Value::as_seq) {
        if let Some(order) = state.get(1).and_then(Value::as_str) {
            match order {
                "<" => big_endian = false,
                ">" => big_endian = true,
                _ => {}
            }
        }
        // subarray, names, fields
        if state.len() >= 5 && state[2..5].iter().any(|x| !x.is_none()) {
            return Err(bad("structured or sub-array dtypes".into()));
        }
    }
    let mut chars = code.chars();
    let kind = chars.next().ok_or_else(|| bad("empty type code".into()))?;
    let num: &str = chars.as_str();
    let n: Option<usize> = if num.is_empty() {
        None
    } else {
        Some(
            num.parse()
                .map_err(|_| bad(format!("type code '{code}'")))?,
        )
    };
    let (kind, itemsize) = match (kind, n) {
        ('b', Some(1)) | ('?', None) => ('b', 1),
        ('i' | 'u', Some(s @ (1 | 2 | 4 | 8))) => (kind, s),
        ('f', Some(s @ (2 | 4 | 8))) => ('f', s),
        ('U', Some(n)) => ('U', n.checked_mul(4).ok_or_else(|| bad(code.into()))?),
        ('U', None) => ('U', 0),
        ('S', n) => ('S', n.unwrap_or(0)),
        ('O', _) => ('O', 8),
        _ => return Err(bad(format!("type code '{code}'"))),
    };
    Ok(Dtype {
        kind,
        itemsize,
        big_endian,
    })
}

fn from_data(shape: Vec<usize>, dtype: Dtype, fortran: bool, data: &Value) -> ScResult<NdArray> {
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format_err("the numpy array shape overflows; the file is corrupt"))?;
    if dtype.kind == 'O' {
        // object arrays are pickled as a list in C order, whatever the memory layout
        let items = data.as_seq().ok_or_else(|| {
            format_err(format!(
                "an object numpy array holds a {} instead of a list; the file is corrupt",
                data.describe()
            ))
        })?;
        if items.len() != count {
            return Err(format_err(format!(
                "an object numpy array of shape {shape:?} holds {} elements",
                items.len()
            )));
        }
        return Ok(NdArray {
            shape,
            dtype,
            data: ArrayData::Object(items.to_vec()),
        });
    }
    let bytes = as_bytes(data).ok_or_else(|| {
        format_err(format!(
            "a numpy array holds a {} instead of its raw bytes; the file is corrupt",
            data.describe()
        ))
    })?;
    let need = count.checked_mul(dtype.itemsize);
    if need != Some(bytes.len()) {
        return Err(format_err(format!(
            "a numpy array of shape {shape:?} and {}-byte elements needs {} bytes but holds {}; \
             the file is truncated or corrupt",
            dtype.itemsize,
            need.map_or("too many".into(), |n| n.to_string()),
            bytes.len()
        )));
    }
    let data = decode(&bytes, dtype)?;
    let data = if fortran && shape.len() > 1 {
        reorder(data, &shape)
    } else {
        data
    };
    Ok(NdArray { shape, dtype, data })
}

fn decode(b: &[u8], dt: Dtype) -> ScResult<ArrayData> {
    macro_rules! num {
        ($t:ty, $n:expr, $variant:ident) => {
            ArrayData::$variant(
                b.chunks_exact($n)
                    .map(|c| {
                        let mut a = [0u8; $n];
                        a.copy_from_slice(c);
                        if dt.big_endian {
                            <$t>::from_be_bytes(a)
                        } else {
                            <$t>::from_le_bytes(a)
                        }
                    })
                    .collect(),
            )
        };
    }
    Ok(match (dt.kind, dt.itemsize) {
        ('b', _) => ArrayData::Bool(b.iter().map(|&x| x != 0).collect()),
        ('i', 1) => ArrayData::I8(b.iter().map(|&x| x as i8).collect()),
        ('i', 2) => num!(i16, 2, I16),
        ('i', 4) => num!(i32, 4, I32),
        ('i', 8) => num!(i64, 8, I64),
        ('u', 1) => ArrayData::U8(b.to_vec()),
        ('u', 2) => num!(u16, 2, U16),
        ('u', 4) => num!(u32, 4, U32),
        ('u', 8) => num!(u64, 8, U64),
        ('f', 2) => {
            let h = match num!(u16, 2, U16) {
                ArrayData::U16(v) => v,
                _ => Vec::new(),
            };
            ArrayData::F32(h.into_iter().map(f16_to_f32).collect())
        }
        ('f', 4) => num!(f32, 4, F32),
        ('f', 8) => num!(f64, 8, F64),
        ('U', 0) => ArrayData::Str(Vec::new()),
        ('U', n) => {
            let mut out = Vec::with_capacity(b.len() / n);
            for item in b.chunks_exact(n) {
                let mut s = String::new();
                for c in item.chunks_exact(4) {
                    let a = [c[0], c[1], c[2], c[3]];
                    let cp = if dt.big_endian {
                        u32::from_be_bytes(a)
                    } else {
                        u32::from_le_bytes(a)
                    };
                    if cp == 0 {
                        break;
                    }
                    s.push(char::from_u32(cp).ok_or_else(|| {
                        format_err(format!(
                            "a numpy unicode array holds the invalid code point {cp:#x}; the \
                             file is corrupt"
                        ))
                    })?);
                }
                out.push(s);
            }
            ArrayData::Str(out)
        }
        ('S', 0) => ArrayData::Bytes(Vec::new()),
        ('S', n) => ArrayData::Bytes(
            b.chunks_exact(n)
                .map(|c| {
                    let end = c.iter().rposition(|&x| x != 0).map_or(0, |p| p + 1);
                    c[..end].to_vec()
                })
                .collect(),
        ),
        _ => {
            return Err(format_err(format!(
                "unsupported numpy dtype {}{}",
                dt.kind, dt.itemsize
            )))
        }
    })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) & 1) as u32;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if frac == 0 {
            sign << 31
        } else {
            // subnormal: value = frac * 2^-24
            let v = frac as f32 * (1.0 / 16_777_216.0);
            return if sign == 1 { -v } else { v };
        }
    } else if exp == 0x1f {
        (sign << 31) | 0x7f80_0000 | (frac << 13)
    } else {
        (sign << 31) | ((exp + 112) << 23) | (frac << 13)
    };
    f32::from_bits(bits)
}

/// Fortran-ordered elements to C order.
fn reorder(d: ArrayData, shape: &[usize]) -> ArrayData {
    fn perm<T: Clone>(v: Vec<T>, shape: &[usize]) -> Vec<T> {
        let nd = shape.len();
        // Fortran strides (in elements)
        let mut fstride = vec![1usize; nd];
        for k in 1..nd {
            fstride[k] = fstride[k - 1] * shape[k - 1];
        }
        let mut idx = vec![0usize; nd];
        let mut out = Vec::with_capacity(v.len());
        for _ in 0..v.len() {
            let off: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
            out.push(v[off].clone());
            // next C-order multi-index
            for k in (0..nd).rev() {
                idx[k] += 1;
                if idx[k] < shape[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        out
    }
    match d {
        ArrayData::Bool(v) => ArrayData::Bool(perm(v, shape)),
        ArrayData::I8(v) => ArrayData::I8(perm(v, shape)),
        ArrayData::I16(v) => ArrayData::I16(perm(v, shape)),
        ArrayData::I32(v) => ArrayData::I32(perm(v, shape)),
        ArrayData::I64(v) => ArrayData::I64(perm(v, shape)),
        ArrayData::U8(v) => ArrayData::U8(perm(v, shape)),
        ArrayData::U16(v) => ArrayData::U16(perm(v, shape)),
        ArrayData::U32(v) => ArrayData::U32(perm(v, shape)),
        ArrayData::U64(v) => ArrayData::U64(perm(v, shape)),
        ArrayData::F32(v) => ArrayData::F32(perm(v, shape)),
        ArrayData::F64(v) => ArrayData::F64(perm(v, shape)),
        ArrayData::Str(v) => ArrayData::Str(perm(v, shape)),
        ArrayData::Bytes(v) => ArrayData::Bytes(perm(v, shape)),
        ArrayData::Object(v) => ArrayData::Object(perm(v, shape)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fortran_reorder_2x3() {
        // Fortran bytes of [[1,2,3],[4,5,6]] are 1,4,2,5,3,6
        let d = ArrayData::I32(vec![1, 4, 2, 5, 3, 6]);
        assert_eq!(reorder(d, &[2, 3]), ArrayData::I32(vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert!(f16_to_f32(0x7e00).is_nan());
    }
}
