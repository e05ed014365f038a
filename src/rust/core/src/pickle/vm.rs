//! The pickle virtual machine. Objects live in an arena while the opcodes run, so that the memo,
//! `BUILD` and the container-filling opcodes (`APPENDS`, `SETITEMS`...) can act on an object
//! after it was memoised, exactly as Python mutates shared objects. The arena is turned into a
//! [`Value`] tree at `STOP`.

use super::{format_err, Limits, Object, Value};
use crate::error::ScResult;
use std::collections::HashMap;

type Id = usize;

enum Node {
    Leaf(Value),
    List(Vec<Id>),
    Tuple(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    Object {
        callable: Id,
        args: Id,
        kwargs: Option<Id>,
        new_obj: bool,
        state: Option<Id>,
        list_items: Vec<Id>,
        dict_items: Vec<(Id, Id)>,
    },
    Build {
        obj: Id,
        state: Id,
    },
    PersId(Id),
    /// A leaf already moved into the result (only for leaves referenced once).
    Taken,
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run, for error messages.
    op_pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
    limits: Limits,
}

pub(super) fn run(data: &[u8], limits: Limits) -> ScResult<Value> {
    if data.is_empty() {
        return Err(format_err(
            "the pickle is empty (0 bytes); the file is truncated or was never written",
        ));
    }
    let mut m = Machine {
        data,
        pos: 0,
        op_pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        limits,
    };
    let root = m.execute()?;
    Materializer::new(m.nodes, root, data.len(), limits).run(root)
}

const NEWER: &str = "this reader supports pickle protocols up to 5";

impl<'a> Machine<'a> {
    fn corrupt(&self, what: &str) -> crate::error::ScError {
        format_err(format!(
            "the pickle is corrupt at byte {}: {what}; the file is damaged or is not a pickle",
            self.op_pos
        ))
    }

    fn take(&mut self, n: usize, what: &str) -> ScResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format_err(format!(
                "the pickle is truncated: {what} at byte {} needs {n} bytes but only {} remain; \
                 the file is incomplete, write or download it again",
                self.op_pos,
                self.data.len() - self.pos
            ))),
        }
    }

    fn u8(&mut self, what: &str) -> ScResult<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn arr<const N: usize>(&mut self, what: &str) -> ScResult<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn len_u32(&mut self, what: &str) -> ScResult<usize> {
        Ok(u32::from_le_bytes(self.arr::<4>(what)?) as usize)
    }

    fn len_i32(&mut self, what: &str) -> ScResult<usize> {
        let n = i32::from_le_bytes(self.arr::<4>(what)?);
        usize::try_from(n).map_err(|_| self.corrupt(&format!("negative length {n} for {what}")))
    }

    fn len_u64(&mut self, what: &str) -> ScResult<usize> {
        let n = u64::from_le_bytes(self.arr::<8>(what)?);
        usize::try_from(n).map_err(|_| self.corrupt(&format!("length {n} for {what} is too large")))
    }

    fn line(&mut self, what: &str) -> ScResult<&'a [u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => Err(format_err(format!(
                "the pickle is truncated: {what} at byte {} has no end of line; the file is \
                 incomplete, write or download it again",
                self.op_pos
            ))),
        }
    }

    fn text_line(&mut self, what: &str) -> ScResult<String> {
        let l = self.line(what)?;
        String::from_utf8(l.to_vec()).map_err(|_| self.corrupt(&format!("{what} is not UTF-8")))
    }

    fn utf8(&self, b: &[u8], what: &str) -> ScResult<String> {
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| self.corrupt(&format!("{what} is not valid UTF-8")))
    }

    fn alloc(&mut self, n: Node) -> ScResult<Id> {
        if self.nodes.len() >= self.limits.max_objects {
            return Err(format_err(format!(
                "the pickle creates more than {} objects, more than this reader allows; it is not \
                 a model file scannot can read",
                self.limits.max_objects
            )));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, n: Node) -> ScResult<()> {
        let id = self.alloc(n)?;
        self.stack.push(id);
        Ok(())
    }

    fn leaf(&mut self, v: Value) -> ScResult<()> {
        self.push(Node::Leaf(v))
    }

    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> ScResult<Id> {
        if self.stack.len() <= self.base() {
            return Err(self.corrupt("an opcode needs a value but the stack is empty"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.corrupt("the stack is empty"))
    }

    fn top(&self) -> ScResult<Id> {
        if self.stack.len() <= self.base() {
            return Err(self.corrupt("an opcode needs a value but the stack is empty"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.corrupt("the stack is empty"))
    }

    fn pop_mark(&mut self) -> ScResult<Vec<Id>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.corrupt("an opcode needs a MARK but there is none"))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }

    fn leaf_of(&self, id: Id) -> Option<&Value> {
        match self.nodes.get(id) {
            Some(Node::Leaf(v)) => Some(v),
            _ => None,
        }
    }

    fn memo_put(&mut self, key: u64) -> ScResult<()> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> ScResult<()> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.corrupt(&format!("memo entry {key} is used before it is set")))?;
        self.stack.push(id);
        Ok(())
    }

    fn append_items(&mut self, items: Vec<Id>) -> ScResult<()> {
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::List(v) | Node::Set(v) => v.extend(items),
            Node::Object { list_items, .. } => list_items.extend(items),
            _ => return Err(self.corrupt("APPEND to something that is not a list")),
        }
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Id>) -> ScResult<()> {
        if items.len() % 2 != 0 {
            return Err(self.corrupt("SETITEMS with an odd number of values"));
        }
        let pairs: Vec<(Id, Id)> = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::Dict(v) => v.extend(pairs),
            Node::Object { dict_items, .. } => dict_items.extend(pairs),
            _ => return Err(self.corrupt("SETITEM on something that is not a dict")),
        }
        Ok(())
    }

    /// `callable(*args)`; `OrderedDict` and `defaultdict` become plain dicts.
    fn reduce(&mut self, callable: Id, args: Id, new_obj: bool) -> ScResult<()> {
        let is_dict_class = matches!(
            self.leaf_of(callable),
            Some(Value::Global { module, name })
                if module == "collections" && (name == "OrderedDict" || name == "defaultdict")
        );
        if is_dict_class {
            let ordered = matches!(
                self.leaf_of(callable),
                Some(Value::Global { name, .. }) if name == "OrderedDict"
            );
            let mut pairs = Vec::new();
            // OrderedDict([(k, v), ...]) may carry its items as the first argument
            if ordered {
                if let Some(Node::Tuple(a)) = self.nodes.get(args) {
                    if let Some(&first) = a.first() {
                        if let Some(Node::List(items) | Node::Tuple(items)) = self.nodes.get(first)
                        {
                            for &it in items {
                                match self.nodes.get(it) {
                                    Some(Node::Tuple(kv) | Node::List(kv)) if kv.len() == 2 => {
                                        pairs.push((kv[0], kv[1]))
                                    }
                                    _ => {
                                        return Err(
                                            self.corrupt("OrderedDict item is not a (key, value)")
                                        )
                                    }
                                }
                            }
                        }
                    }
                }
            }
            return self.push(Node::Dict(pairs));
        }
        self.push(Node::Object {
            callable,
            args,
            kwargs: None,
            new_obj,
            state: None,
            list_items: Vec::new(),
            dict_items: Vec::new(),
        })
    }

    fn build(&mut self) -> ScResult<()> {
        let state = self.pop()?;
        let target = self.top()?;
        match &mut self.nodes[target] {
            Node::Object {
                state: s @ None, ..
            } => *s = Some(state),
            // attributes set on a dict or list (torch `_metadata`) are not needed
            Node::Dict(_) | Node::List(_) => {}
            _ => {
                // keep the identity of `target` (the memo may point at it): move its content
                let content = std::mem::replace(&mut self.nodes[target], Node::Taken);
                let moved = self.alloc(content)?;
                self.nodes[target] = Node::Build { obj: moved, state };
            }
        }
        Ok(())
    }

    fn execute(&mut self) -> ScResult<Id> {
        loop {
            self.op_pos = self.pos;
            let op = self.u8("an opcode")?;
            match op {
                // ---- framing and control
                0x80 => {
                    let p = self.u8("the protocol number")?;
                    if p > 5 {
                        return Err(format_err(format!(
                            "the pickle uses protocol {p}; {NEWER}. Save it with protocol 5 or \
                             lower"
                        )));
                    }
                }
                0x95 => {
                    self.arr::<8>("a frame length")?;
                }
                b'.' => {
                    let r = self.pop()?;
                    return Ok(r);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.stack.len() > self.base() {
                        self.stack.pop();
                    } else {
                        self.pop_mark()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                // ---- constants
                b'N' => self.leaf(Value::None)?,
                0x88 => self.leaf(Value::Bool(true))?,
                0x89 => self.leaf(Value::Bool(false))?,
                // ---- integers
                b'J' => {
                    let v = i32::from_le_bytes(self.arr::<4>("BININT")?);
                    self.leaf(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8("BININT1")?;
                    self.leaf(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr::<2>("BININT2")?);
                    self.leaf(Value::Int(v as i64))?
                }
                0x8a => {
                    let n = self.u8("LONG1 length")? as usize;
                    let b = self.take(n, "LONG1")?;
                    self.leaf(decode_long(b))?
                }
                0x8b => {
                    let n = self.len_i32("LONG4 length")?;
                    let b = self.take(n, "LONG4")?;
                    self.leaf(decode_long(b))?
                }
                b'I' => {
                    let l = self.text_line("INT")?;
                    let v = match l.trim() {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        t => parse_text_int(t).ok_or_else(|| self.corrupt("bad INT"))?,
                    };
                    self.leaf(v)?
                }
                b'L' => {
                    let l = self.text_line("LONG")?;
                    let t = l.trim().trim_end_matches('L');
                    let v = parse_text_int(t).ok_or_else(|| self.corrupt("bad LONG"))?;
                    self.leaf(v)?
                }
                // ---- floats
                b'G' => {
                    let v = f64::from_be_bytes(self.arr::<8>("BINFLOAT")?);
                    self.leaf(Value::Float(v))?
                }
                b'F' => {
                    let l = self.text_line("FLOAT")?;
                    let v = parse_text_float(l.trim()).ok_or_else(|| self.corrupt("bad FLOAT"))?;
                    self.leaf(Value::Float(v))?
                }
                // ---- text
                0x8c => {
                    let n = self.u8("SHORT_BINUNICODE length")? as usize;
                    let b = self.take(n, "SHORT_BINUNICODE")?;
                    let s = self.utf8(b, "a string")?;
                    self.leaf(Value::Str(s))?
                }
                b'X' => {
                    let n = self.len_u32("BINUNICODE length")?;
                    let b = self.take(n, "BINUNICODE")?;
                    let s = self.utf8(b, "a string")?;
                    self.leaf(Value::Str(s))?
                }
                0x8d => {
                    let n = self.len_u64("BINUNICODE8 length")?;
                    let b = self.take(n, "BINUNICODE8")?;
                    let s = self.utf8(b, "a string")?;
                    self.leaf(Value::Str(s))?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.len_i32("BINSTRING length")?
                    } else {
                        self.u8("SHORT_BINSTRING length")? as usize
                    };
                    let b = self.take(n, "BINSTRING")?;
                    // Python 2 `str`: text when it decodes, bytes otherwise
                    let v = match std::str::from_utf8(b) {
                        Ok(s) => Value::Str(s.to_owned()),
                        Err(_) => Value::Bytes(b.to_vec()),
                    };
                    self.leaf(v)?
                }
                b'S' => {
                    let l = self.line("STRING")?;
                    let b = unquote_py_string(l).ok_or_else(|| self.corrupt("bad STRING"))?;
                    let v = match String::from_utf8(b) {
                        Ok(s) => Value::Str(s),
                        Err(e) => Value::Bytes(e.into_bytes()),
                    };
                    self.leaf(v)?
                }
                b'V' => {
                    let l = self.line("UNICODE")?;
                    let s = raw_unicode_escape(l).ok_or_else(|| self.corrupt("bad UNICODE"))?;
                    self.leaf(Value::Str(s))?
                }
                // ---- binary
                b'C' => {
                    let n = self.u8("SHORT_BINBYTES length")? as usize;
                    let b = self.take(n, "SHORT_BINBYTES")?;
                    self.leaf(Value::Bytes(b.to_vec()))?
                }
                b'B' => {
                    let n = self.len_u32("BINBYTES length")?;
                    let b = self.take(n, "BINBYTES")?;
                    self.leaf(Value::Bytes(b.to_vec()))?
                }
                0x8e | 0x96 => {
                    let n = self.len_u64("BINBYTES8/BYTEARRAY8 length")?;
                    let b = self.take(n, "BINBYTES8/BYTEARRAY8")?;
                    self.leaf(Value::Bytes(b.to_vec()))?
                }
                0x97 => {
                    return Err(format_err(
                        "the pickle refers to out-of-band buffers (protocol 5 with \
                         buffer_callback), which are not stored in the file; save it without \
                         buffer_callback",
                    ))
                }
                0x98 => {
                    self.top()?;
                }
                // ---- containers
                b')' => self.push(Node::Tuple(Vec::new()))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items))?
                }
                b']' => self.push(Node::List(Vec::new()))?,
                b'a' => {
                    let v = self.pop()?;
                    self.append_items(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append_items(items)?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                b'}' => self.push(Node::Dict(Vec::new()))?,
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.corrupt("DICT with an odd number of values"));
                    }
                    let pairs = items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    self.push(Node::Dict(pairs))?
                }
                0x8f => self.push(Node::Set(Vec::new()))?,
                0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    match &mut self.nodes[target] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err(self.corrupt("ADDITEMS on something that is not a set")),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items))?
                }
                // ---- memo
                0x94 => {
                    let k = self.memo.len() as u64;
                    self.memo_put(k)?
                }
                b'q' => {
                    let k = self.u8("BINPUT")? as u64;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.arr::<4>("LONG_BINPUT")?) as u64;
                    self.memo_put(k)?
                }
                b'p' => {
                    let l = self.text_line("PUT")?;
                    let k = l.trim().parse().map_err(|_| self.corrupt("bad PUT"))?;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8("BINGET")? as u64;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.arr::<4>("LONG_BINGET")?) as u64;
                    self.memo_get(k)?
                }
                b'g' => {
                    let l = self.text_line("GET")?;
                    let k = l.trim().parse().map_err(|_| self.corrupt("bad GET"))?;
                    self.memo_get(k)?
                }
                // ---- objects
                b'c' => {
                    let module = self.text_line("GLOBAL module")?;
                    let name = self.text_line("GLOBAL name")?;
                    self.leaf(Value::Global { module, name })?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Value::Str(m)), Some(Value::Str(n))) =
                        (self.leaf_of(module), self.leaf_of(name))
                    else {
                        return Err(self.corrupt("STACK_GLOBAL needs two strings"));
                    };
                    let v = Value::Global {
                        module: m.clone(),
                        name: n.clone(),
                    };
                    self.leaf(v)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    self.reduce(callable, args, false)?
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.reduce(cls, args, true)?
                }
                0x92 => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.push(Node::Object {
                        callable: cls,
                        args,
                        kwargs: Some(kwargs),
                        new_obj: true,
                        state: None,
                        list_items: Vec::new(),
                        dict_items: Vec::new(),
                    })?
                }
                b'i' => {
                    let module = self.text_line("INST module")?;
                    let name = self.text_line("INST name")?;
                    let items = self.pop_mark()?;
                    let callable = self.alloc(Node::Leaf(Value::Global { module, name }))?;
                    let args = self.alloc(Node::Tuple(items))?;
                    self.reduce(callable, args, false)?
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.corrupt("OBJ without a class"));
                    }
                    let cls = items.remove(0);
                    let args = self.alloc(Node::Tuple(items))?;
                    self.reduce(cls, args, false)?
                }
                b'b' => self.build()?,
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(Node::PersId(pid))?
                }
                b'P' => {
                    let l = self.text_line("PERSID")?;
                    let pid = self.alloc(Node::Leaf(Value::Str(l)))?;
                    self.push(Node::PersId(pid))?
                }
                0x82..=0x84 => {
                    return Err(format_err(
                        "the pickle uses the copyreg extension registry (EXT opcodes), which \
                         this reader does not support",
                    ))
                }
                other => {
                    return Err(self.corrupt(&format!("unknown opcode 0x{other:02x}")));
                }
            }
        }
    }
}

/// LONG1/LONG4 payload: little-endian two's complement.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    // drop redundant sign-extension bytes to see whether it fits in i64
    let fill = if neg { 0xff } else { 0x00 };
    let mut n = b.len();
    while n > 1 && b[n - 1] == fill && (b[n - 2] & 0x80 != 0) == neg {
        n -= 1;
    }
    if n <= 8 {
        let mut a = [fill; 8];
        a[..n].copy_from_slice(&b[..n]);
        Value::Int(i64::from_le_bytes(a))
    } else {
        Value::BigInt(b[..n].to_vec())
    }
}

fn parse_text_int(t: &str) -> Option<Value> {
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Int(i));
    }
    let i = t.parse::<i128>().ok()?;
    Some(decode_long(&i.to_le_bytes()))
}

fn parse_text_float(t: &str) -> Option<f64> {
    match t {
        "nan" => Some(f64::NAN),
        "inf" => Some(f64::INFINITY),
        "-inf" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok(),
    }
}

/// A protocol-0 STRING argument: a Python repr in single or double quotes.
fn unquote_py_string(l: &[u8]) -> Option<Vec<u8>> {
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    if l.len() < 2 || l[0] != l[l.len() - 1] || (l[0] != b'\'' && l[0] != b'"') {
        return None;
    }
    let body = &l[1..l.len() - 1];
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c != b'\\' {
            out.push(c);
            i += 1;
            continue;
        }
        let e = *body.get(i + 1)?;
        i += 2;
        match e {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'0'..=b'7' => {
                // up to three octal digits
                let mut v = (e - b'0') as u32;
                let mut k = 0;
                while k < 2 && i < body.len() && (b'0'..=b'7').contains(&body[i]) {
                    v = v * 8 + (body[i] - b'0') as u32;
                    i += 1;
                    k += 1;
                }
                out.push(u8::try_from(v).ok()?);
            }
            b'x' => {
                let h = std::str::from_utf8(body.get(i..i + 2)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            b'\\' | b'\'' | b'"' => out.push(e),
            _ => {
                out.push(b'\\');
                out.push(e);
            }
        }
    }
    Some(out)
}

/// A protocol-0 UNICODE argument: latin-1 text with `\uXXXX` / `\UXXXXXXXX` escapes.
fn raw_unicode_escape(l: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(l.len());
    let mut i = 0;
    while i < l.len() {
        if l[i] == b'\\' && i + 1 < l.len() && (l[i + 1] == b'u' || l[i + 1] == b'U') {
            let n = if l[i + 1] == b'u' { 4 } else { 8 };
            let h = std::str::from_utf8(l.get(i + 2..i + 2 + n)?).ok()?;
            out.push(char::from_u32(u32::from_str_radix(h, 16).ok()?)?);
            i += 2 + n;
        } else {
            out.push(char::from(l[i]));
            i += 1;
        }
    }
    Some(out)
}

/// Turns the arena into a tree. Shared objects are copied; the copying is bounded.
struct Materializer {
    nodes: Vec<Node>,
    refs: Vec<u32>,
    visiting: Vec<bool>,
    values: usize,
    bytes: usize,
    limits: Limits,
    max_bytes: usize,
}

impl Materializer {
    fn new(nodes: Vec<Node>, root: Id, input_len: usize, limits: Limits) -> Self {
        let mut refs = vec![0u32; nodes.len()];
        let mut bump = |id: Id| {
            if let Some(r) = refs.get_mut(id) {
                *r = r.saturating_add(1);
            }
        };
        bump(root);
        for n in &nodes {
            match n {
                Node::List(v) | Node::Tuple(v) | Node::Set(v) => v.iter().for_each(|&i| bump(i)),
                Node::Dict(v) => v.iter().for_each(|&(a, b)| {
                    bump(a);
                    bump(b)
                }),
                Node::Object {
                    callable,
                    args,
                    kwargs,
                    state,
                    list_items,
                    dict_items,
                    ..
                } => {
                    bump(*callable);
                    bump(*args);
                    kwargs.iter().for_each(|&i| bump(i));
                    state.iter().for_each(|&i| bump(i));
                    list_items.iter().for_each(|&i| bump(i));
                    dict_items.iter().for_each(|&(a, b)| {
                        bump(a);
                        bump(b)
                    });
                }
                Node::Build { obj, state } => {
                    bump(*obj);
                    bump(*state)
                }
                Node::PersId(i) => bump(*i),
                Node::Leaf(_) | Node::Taken => {}
            }
        }
        let n = nodes.len();
        Materializer {
            nodes,
            refs,
            visiting: vec![false; n],
            values: 0,
            bytes: 0,
            limits,
            max_bytes: limits.max_bytes.max(input_len.saturating_mul(2)),
        }
    }

    fn run(mut self, root: Id) -> ScResult<Value> {
        self.go(root, 0, false)
    }

    fn count(&mut self, v: &Value) -> ScResult<()> {
        self.values += 1;
        self.bytes += match v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) | Value::BigInt(b) => b.len(),
            _ => 0,
        };
        if self.values > self.limits.max_values || self.bytes > self.max_bytes {
            return Err(format_err(
                "the pickle expands to more data than this reader allows (too many shared \
                 references); it is not a model file scannot can read",
            ));
        }
        Ok(())
    }

    fn list(&mut self, ids: &[Id], depth: usize, shared: bool) -> ScResult<Vec<Value>> {
        ids.iter().map(|&i| self.go(i, depth + 1, shared)).collect()
    }

    fn pairs(
        &mut self,
        ids: &[(Id, Id)],
        depth: usize,
        shared: bool,
    ) -> ScResult<Vec<(Value, Value)>> {
        let mut out: Vec<(Value, Value)> = Vec::with_capacity(ids.len());
        let mut index: HashMap<KeyRepr, usize> = HashMap::new();
        for &(k, v) in ids {
            let k = self.go(k, depth + 1, shared)?;
            let v = self.go(v, depth + 1, shared)?;
            match KeyRepr::of(&k) {
                Some(r) => match index.get(&r) {
                    Some(&pos) => out[pos].1 = v,
                    None => {
                        index.insert(r, out.len());
                        out.push((k, v));
                    }
                },
                None => out.push((k, v)),
            }
        }
        Ok(out)
    }

    /// `shared`: some ancestor is referenced more than once, so this subtree will be
    /// materialised again and nothing in it may be moved out.
    fn go(&mut self, id: Id, depth: usize, shared: bool) -> ScResult<Value> {
        if depth > self.limits.max_depth {
            return Err(format_err(format!(
                "the pickle nests containers more than {} deep; it is not a model file scannot \
                 can read",
                self.limits.max_depth
            )));
        }
        if self.visiting[id] {
            return Ok(Value::Recursive);
        }
        let shared = shared || self.refs[id] > 1;
        // leaves referenced once (through unshared ancestors) are moved, not copied
        if !shared {
            if let Node::Leaf(_) = &self.nodes[id] {
                if let Node::Leaf(v) = std::mem::replace(&mut self.nodes[id], Node::Taken) {
                    self.count(&v)?;
                    return Ok(v);
                }
            }
        }
        self.visiting[id] = true;
        // temporarily move the node out to walk its children without borrowing self.nodes
        let node = std::mem::replace(&mut self.nodes[id], Node::Taken);
        let out = self.node_value(&node, depth, shared);
        self.nodes[id] = node;
        self.visiting[id] = false;
        let v = out?;
        self.count(&v)?;
        Ok(v)
    }

    fn node_value(&mut self, node: &Node, depth: usize, shared: bool) -> ScResult<Value> {
        Ok(match node {
            Node::Leaf(v) => v.clone(),
            Node::List(v) => Value::List(self.list(v, depth, shared)?),
            Node::Tuple(v) => Value::Tuple(self.list(v, depth, shared)?),
            Node::Set(v) => Value::Set(self.list(v, depth, shared)?),
            Node::Dict(v) => Value::Dict(self.pairs(v, depth, shared)?),
            Node::Object {
                callable,
                args,
                kwargs,
                new_obj,
                state,
                list_items,
                dict_items,
            } => {
                let callable = self.go(*callable, depth + 1, shared)?;
                let args = self.go(*args, depth + 1, shared)?;
                let kwargs = match kwargs {
                    Some(k) => Some(self.go(*k, depth + 1, shared)?),
                    None => None,
                };
                let state = match state {
                    Some(s) => Some(self.go(*s, depth + 1, shared)?),
                    None => None,
                };
                Value::Object(Box::new(Object {
                    callable,
                    args,
                    kwargs,
                    new_obj: *new_obj,
                    state,
                    list_items: self.list(list_items, depth, shared)?,
                    dict_items: self.pairs(dict_items, depth, shared)?,
                }))
            }
            Node::Build { obj, state } => Value::Build {
                obj: Box::new(self.go(*obj, depth + 1, shared)?),
                state: Box::new(self.go(*state, depth + 1, shared)?),
            },
            Node::PersId(p) => Value::PersId(Box::new(self.go(*p, depth + 1, shared)?)),
            // only reachable for a leaf moved out earlier yet referenced again, which the
            // reference counts exclude; report rather than panic
            Node::Taken => {
                return Err(format_err(
                    "the pickle refers to an object in an inconsistent way; the file is corrupt",
                ))
            }
        })
    }
}

/// Hashable form of the scalar dict keys, to apply Python's "last value wins" rule.
#[derive(Hash, PartialEq, Eq)]
enum KeyRepr {
    Str(String),
    Int(i64),
    Bytes(Vec<u8>),
    None,
}

impl KeyRepr {
    fn of(v: &Value) -> Option<KeyRepr> {
        match v {
            Value::Str(s) => Some(KeyRepr::Str(s.clone())),
            // True == 1 and False == 0 as dict keys in Python
            Value::Int(_) | Value::Bool(_) => v.as_i64().map(KeyRepr::Int),
            Value::Bytes(b) => Some(KeyRepr::Bytes(b.clone())),
            Value::None => Some(KeyRepr::None),
            _ => None,
        }
    }
}
