//! A minimal pickle virtual machine for the subset of the pickle protocol that
//! `torch.save` emits (protocol 2, plus the protocol-4 framing/memo opcodes).
//!
//! Why hand-written instead of `burn_store::pytorch`: burn-store 0.21's
//! `PytorchReader` requires a dictionary at the root (a bare `torch.save(tensor)`
//! is rejected), and its `_rebuild_tensor_v2` ignores the stride argument, so a
//! non-contiguous tensor would be read silently wrong.  Here tensors keep their
//! storage key, offset, shape and strides and are materialised by the caller.
//!
//! Unknown classes (Lightning's `AttributeDict`, `argparse.Namespace`, ...)
//! become [`Value::Object`] so that checkpoints holding hyper-parameters parse
//! gracefully; only the tensors are interpreted.

use std::collections::HashMap;

/// Element type of a torch storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageDtype {
    /// `torch.FloatStorage`
    F32,
    /// `torch.HalfStorage`
    F16,
    /// `torch.BFloat16Storage`
    BF16,
    /// `torch.DoubleStorage`
    F64,
    /// Any other storage (integer, bool, complex): carried so that state dicts
    /// holding such buffers parse, but not convertible to floats.
    Other(&'static str, usize),
}

impl StorageDtype {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
            StorageDtype::F64 => 8,
            StorageDtype::Other(_, s) => s,
        }
    }

    fn from_class(name: &str) -> Option<StorageDtype> {
        Some(match name {
            "FloatStorage" => StorageDtype::F32,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::BF16,
            "DoubleStorage" => StorageDtype::F64,
            "LongStorage" => StorageDtype::Other("int64", 8),
            "IntStorage" => StorageDtype::Other("int32", 4),
            "ShortStorage" => StorageDtype::Other("int16", 2),
            "CharStorage" => StorageDtype::Other("int8", 1),
            "ByteStorage" => StorageDtype::Other("uint8", 1),
            "BoolStorage" => StorageDtype::Other("bool", 1),
            "ComplexFloatStorage" => StorageDtype::Other("complex64", 8),
            "ComplexDoubleStorage" => StorageDtype::Other("complex128", 16),
            _ => return None,
        })
    }
}

/// A tensor as described by the pickle: where its elements live and how.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    /// Storage key (file `<archive>/data/<key>` in the zip).
    pub key: String,
    /// Element type of the storage.
    pub dtype: StorageDtype,
    /// Offset of the first element, in elements.
    pub offset: usize,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

/// A decoded pickle value (only what torch checkpoints need).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`
    None,
    /// `True` / `False`
    Bool(bool),
    /// Integers that fit into i64 (larger ones become `Float`).
    Int(i64),
    /// Floats.
    Float(f64),
    /// Text.
    Str(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// Tuples.
    Tuple(Vec<Value>),
    /// Lists and sets.
    List(Vec<Value>),
    /// Dicts (also `OrderedDict`), in insertion order.
    Dict(Vec<(Value, Value)>),
    /// A global reference `module.name`.
    Global(String, String),
    /// A persistent storage reference (before `_rebuild_tensor_v2`).
    Storage {
        /// storage key
        key: String,
        /// element type
        dtype: StorageDtype,
    },
    /// A rebuilt tensor.
    Tensor(TensorRef),
    /// An instance of a class we do not interpret.
    Object {
        /// `module.name` of the class
        class: String,
        /// constructor arguments
        args: Box<Value>,
        /// items set on it (dict subclasses)
        items: Vec<(Value, Value)>,
        /// state given to BUILD
        state: Box<Value>,
    },
    /// Stack marker (never part of a finished value).
    Mark,
}

/// Error while decoding a pickle stream; the message names the byte position.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError(pub String);

impl std::fmt::Display for PickleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

type R<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl std::fmt::Display) -> R<T> {
        Err(PickleError(format!("pickle byte {}: {msg}", self.pos)))
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if self.pos + n > self.data.len() {
            return self.err("unexpected end of pickle data");
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> R<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> R<String> {
        let start = self.pos;
        while self.pos < self.data.len() && self.data[self.pos] != b'\n' {
            self.pos += 1;
        }
        if self.pos >= self.data.len() {
            return self.err("unterminated text line");
        }
        let s = String::from_utf8_lossy(&self.data[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.to_string())),
            Err(_) => self.err("invalid UTF-8 in string"),
        }
    }

    fn pop(&mut self) -> R<Value> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> R<&mut Value> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| PickleError(format!("pickle byte {pos}: stack underflow")))
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        match self.stack.iter().rposition(|v| matches!(v, Value::Mark)) {
            Some(i) => {
                let items = self.stack.split_off(i + 1);
                self.stack.pop();
                Ok(items)
            }
            None => self.err("MARK not found"),
        }
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx) {
            Some(v) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            None => self.err(format!("memo key {idx} not found")),
        }
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn set_items(&mut self, pairs: Vec<(Value, Value)>) -> R<()> {
        match self.top()? {
            Value::Dict(d) => d.extend(pairs),
            Value::Object { items, .. } => items.extend(pairs),
            _ => return self.err("SETITEM(S) on a non-dict"),
        }
        Ok(())
    }

    fn append(&mut self, vals: Vec<Value>) -> R<()> {
        match self.top()? {
            Value::List(l) => l.extend(vals),
            Value::Object { items, .. } => items.extend(vals.into_iter().map(|v| (Value::None, v))),
            _ => return self.err("APPEND(S) on a non-list"),
        }
        Ok(())
    }

    fn reduce(&mut self, callable: Value, args: Value) -> R<Value> {
        let (module, name) = match &callable {
            Value::Global(m, n) => (m.as_str(), n.as_str()),
            _ => {
                return Ok(Value::Object {
                    class: "<callable>".into(),
                    args: Box::new(args),
                    items: vec![],
                    state: Box::new(Value::None),
                })
            }
        };
        let a = match &args {
            Value::Tuple(a) => a.as_slice(),
            _ => &[],
        };
        match (module, name) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                self.rebuild_tensor(a)
            }
            ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state") => match a.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => self.err("_rebuild_parameter without a tensor"),
            },
            ("collections", "OrderedDict") | ("builtins", "dict") | ("__builtin__", "dict") => {
                Ok(Value::Dict(vec![]))
            }
            _ => Ok(Value::Object {
                class: format!("{module}.{name}"),
                args: Box::new(args),
                items: vec![],
                state: Box::new(Value::None),
            }),
        }
    }

    fn rebuild_tensor(&self, a: &[Value]) -> R<Value> {
        if a.len() < 4 {
            return self.err("_rebuild_tensor: expected at least 4 arguments");
        }
        let (key, dtype) = match &a[0] {
            Value::Storage { key, dtype } => (key.clone(), *dtype),
            _ => return self.err("_rebuild_tensor: first argument is not a storage"),
        };
        let offset = match a[1] {
            Value::Int(o) if o >= 0 => o as usize,
            _ => return self.err("_rebuild_tensor: bad storage offset"),
        };
        let ints = |v: &Value, what: &str| -> R<Vec<usize>> {
            match v {
                Value::Tuple(t) | Value::List(t) => t
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) if *i >= 0 => Ok(*i as usize),
                        _ => self.err(format!("_rebuild_tensor: bad {what} entry")),
                    })
                    .collect(),
                _ => self.err(format!("_rebuild_tensor: {what} is not a tuple")),
            }
        };
        let shape = ints(&a[2], "size")?;
        let stride = ints(&a[3], "stride")?;
        if shape.len() != stride.len() {
            return self.err("_rebuild_tensor: size and stride lengths differ");
        }
        Ok(Value::Tensor(TensorRef {
            key,
            dtype,
            offset,
            shape,
            stride,
        }))
    }

    fn persistent_load(&self, pid: Value) -> R<Value> {
        let t = match pid {
            Value::Tuple(t) => t,
            _ => return self.err("persistent id is not a tuple"),
        };
        match (t.first(), t.get(1), t.get(2)) {
            (Some(Value::Str(kind)), Some(Value::Global(_, class)), Some(Value::Str(key)))
                if kind == "storage" =>
            {
                let dtype = match StorageDtype::from_class(class) {
                    Some(d) => d,
                    None => return self.err(format!("unsupported storage type {class}")),
                };
                Ok(Value::Storage {
                    key: key.clone(),
                    dtype,
                })
            }
            _ => self.err("unsupported persistent id (expected ('storage', type, key, ...))"),
        }
    }

    fn run(&mut self) -> R<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.u64()?; // FRAME
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    let v = if n <= 8 {
                        let mut buf = if b.last().is_some_and(|x| x & 0x80 != 0) {
                            [0xffu8; 8]
                        } else {
                            [0u8; 8]
                        };
                        buf[..n].copy_from_slice(b);
                        Value::Int(i64::from_le_bytes(buf))
                    } else {
                        Value::Float(f64::NAN)
                    };
                    self.stack.push(v)
                }
                b'I' | b'L' => {
                    let l = self.line()?;
                    let t = l.trim_end_matches('L');
                    let v = match t {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        _ => match t.parse::<i64>() {
                            Ok(i) => Value::Int(i),
                            Err(_) => return self.err(format!("bad integer literal {l:?}")),
                        },
                    };
                    self.stack.push(v)
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)))
                }
                b'F' => {
                    let l = self.line()?;
                    match l.parse::<f64>() {
                        Ok(f) => self.stack.push(Value::Float(f)),
                        Err(_) => return self.err(format!("bad float literal {l:?}")),
                    }
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.text(n)?;
                    self.stack.push(v)
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.u32()? as usize
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?;
                    self.stack
                        .push(Value::Str(String::from_utf8_lossy(b).into_owned()))
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as usize,
                        b'C' => self.u8()? as usize,
                        _ => self.u64()? as usize,
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b))
                }
                b')' => self.stack.push(Value::Tuple(vec![])),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.err("stack underflow in TUPLEn");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b']' => self.stack.push(Value::List(vec![])),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?
                }
                0x8f => self.stack.push(Value::List(vec![])), // EMPTY_SET
                0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)? // ADDITEMS
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items)) // FROZENSET
                }
                b'}' => self.stack.push(Value::Dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs_of(items);
                    self.stack.push(Value::Dict(pairs))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    self.set_items(pairs_of(items))?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?
                }
                b'p' => {
                    let l = self.line()?;
                    match l.parse::<u32>() {
                        Ok(i) => self.memo_put(i)?,
                        Err(_) => return self.err("bad PUT index"),
                    }
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'g' => {
                    let l = self.line()?;
                    match l.parse::<u32>() {
                        Ok(i) => self.memo_get(i)?,
                        Err(_) => return self.err("bad GET index"),
                    }
                }
                b'c' => {
                    let m = self.line()?;
                    let n = self.line()?;
                    self.stack.push(Value::Global(m, n))
                }
                0x93 => {
                    let n = self.pop()?;
                    let m = self.pop()?;
                    match (m, n) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return self.err("STACK_GLOBAL with non-string operands"),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v)
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    let state = self.pop()?;
                    // OrderedDict state (e.g. `_metadata`) and tensor state
                    // are irrelevant here; objects keep theirs.
                    if let Value::Object { state: s, .. } = self.top()? {
                        **s = state;
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.stack.push(v)
                }
                _ => return self.err(format!("unsupported pickle opcode 0x{op:02x}")),
            }
        }
    }
}

fn pairs_of(items: Vec<Value>) -> Vec<(Value, Value)> {
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    out
}

/// Decodes one pickle stream (up to its STOP opcode) into a [`Value`].
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    m.run()
}
