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
//!
//! **Hostile input.** A pickle is a program, and checkpoints come from other
//! people, so the machine is bounded:
//! * every value that owns memory is behind an [`Arc`]: `DUP`, `GET` and
//!   `PUT` share it and never deep-copy (a memo that refers to itself again
//!   and again, "billion laughs", costs a few pointers, not gigabytes). As
//!   before, a memo entry is a snapshot of the value at `PUT` time: a later
//!   `APPEND`/`SETITEMS` on the stack copies the shared container first
//!   ([`Arc::make_mut`]);
//! * the values pushed and the container elements copied (twice: the copy
//!   may grow) are charged to a budget proportional to the pickle's length ([`BUDGET_PER_BYTE`] bytes
//!   per pickle byte plus [`BUDGET_FIXED`]); exceeding it is an error naming
//!   the byte position;
//! * values nest at most [`MAX_DEPTH`] levels, so recursive walks over a
//!   [`Value`] (its `Drop`, `Debug`, `PartialEq`) are depth-bounded;
//! * every length read from the stream is checked against the bytes left.
//!
//! Because memo entries are shared, a [`Value`] is a DAG whose *logical*
//! size may be exponential in the file size: walk only what you need (the
//! loaders read the top-level dict and the tensors), never the whole tree.

use std::collections::HashMap;
use std::sync::Arc;

/// Deepest nesting of containers accepted (Python's own pickler gives up
/// near its recursion limit of 1000; torch checkpoints nest about 10 deep).
pub const MAX_DEPTH: u32 = 512;

/// Work budget of one pickle, in bytes per byte of pickle data: each value
/// pushed costs `size_of::<Value>()` bytes, each element copied by a
/// copy-on-write costs the same, each string or byte string its length.
pub const BUDGET_PER_BYTE: usize = 32;

/// Work budget every pickle has on top of [`BUDGET_PER_BYTE`] (16 MiB).
pub const BUDGET_FIXED: usize = 16 << 20;

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

/// An instance of a class the machine does not interpret.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// `module.name` of the class
    pub class: String,
    /// constructor arguments
    pub args: Value,
    /// items set on it (dict subclasses)
    pub items: Vec<(Value, Value)>,
    /// state given to BUILD
    pub state: Value,
}

/// A decoded pickle value (only what torch checkpoints need).
///
/// Everything that owns memory is shared ([`Arc`]): cloning a value is O(1).
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
    Str(Arc<str>),
    /// Raw bytes.
    Bytes(Arc<[u8]>),
    /// Tuples.
    Tuple(Arc<Vec<Value>>),
    /// Lists and sets.
    List(Arc<Vec<Value>>),
    /// Dicts (also `OrderedDict`), in insertion order.
    Dict(Arc<Vec<(Value, Value)>>),
    /// A global reference `module.name`.
    Global(Arc<str>, Arc<str>),
    /// A persistent storage reference (before `_rebuild_tensor_v2`).
    Storage {
        /// storage key
        key: Arc<str>,
        /// element type
        dtype: StorageDtype,
    },
    /// A rebuilt tensor.
    Tensor(Arc<TensorRef>),
    /// An instance of a class we do not interpret.
    Object(Arc<Object>),
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

/// A value with its nesting depth (1 for a scalar or an empty container).
type Slot = (Value, u32);

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
    /// Work left, in bytes (see [`BUDGET_PER_BYTE`]).
    budget: usize,
}

type R<T> = Result<T, PickleError>;

const VALUE_COST: usize = std::mem::size_of::<Value>();

fn arc_str(s: &str) -> Arc<str> {
    Arc::from(s)
}

impl<'a> Machine<'a> {
    fn err<T>(&self, msg: impl std::fmt::Display) -> R<T> {
        Err(PickleError(format!("pickle byte {}: {msg}", self.pos)))
    }

    /// Charges `cost` bytes of work; an error once the budget is spent.
    fn charge(&mut self, cost: usize) -> R<()> {
        match self.budget.checked_sub(cost) {
            Some(left) => {
                self.budget = left;
                Ok(())
            }
            None => self.err(format!(
                "the pickle needs more work or memory than its size allows \
                 (budget {BUDGET_PER_BYTE} bytes per pickle byte + {} MiB): \
                 a hostile or corrupt file",
                BUDGET_FIXED >> 20
            )),
        }
    }

    fn push(&mut self, v: Value, depth: u32) -> R<()> {
        if depth > MAX_DEPTH {
            return self.err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        self.charge(VALUE_COST)?;
        self.stack.push((v, depth));
        Ok(())
    }

    fn push1(&mut self, v: Value) -> R<()> {
        self.push(v, 1)
    }

    /// Length read from the stream as `usize` (checked on 32-bit targets).
    fn len_of(&self, n: u64) -> R<usize> {
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.err(format!("length {n} does not fit in memory")),
        }
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => end,
            _ => {
                return self.err(format!(
                    "unexpected end of pickle data ({n} bytes needed, {} left)",
                    self.data.len() - self.pos
                ))
            }
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
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
            Ok(s) => Ok(Value::Str(arc_str(s))),
            Err(_) => self.err("invalid UTF-8 in string"),
        }
    }

    fn pop(&mut self) -> R<Slot> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow"),
        }
    }

    fn top(&mut self) -> R<&mut Slot> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| PickleError(format!("pickle byte {pos}: stack underflow")))
    }

    /// The items above the topmost MARK (the MARK is removed), with the
    /// depth of a container holding them.
    fn pop_mark(&mut self) -> R<(Vec<Value>, u32)> {
        match self
            .stack
            .iter()
            .rposition(|(v, _)| matches!(v, Value::Mark))
        {
            Some(i) => {
                let items = self.stack.split_off(i + 1);
                self.stack.pop();
                Ok(container_of(items))
            }
            None => self.err("MARK not found"),
        }
    }

    fn memo_get(&mut self, idx: u32) -> R<()> {
        match self.memo.get(&idx) {
            Some((v, d)) => {
                let (v, d) = (v.clone(), *d);
                self.push(v, d)
            }
            None => self.err(format!("memo key {idx} not found")),
        }
    }

    fn memo_put(&mut self, idx: u32) -> R<()> {
        let slot = self.top()?.clone();
        self.charge(VALUE_COST)?;
        self.memo.insert(idx, slot);
        Ok(())
    }

    /// Copy-on-write access to a shared container of the top slot: charges
    /// the elements copied when the container is shared.
    fn make_mut<'v, T: Clone>(
        budget: &mut usize,
        arc: &'v mut Arc<T>,
        len: usize,
    ) -> Option<&'v mut T> {
        if Arc::get_mut(arc).is_none() {
            // Twice the copy: the copy is exact-size, and the extend that
            // follows may double its capacity.
            *budget = budget.checked_sub(len.saturating_mul(2 * VALUE_COST))?;
        }
        Some(Arc::make_mut(arc))
    }

    fn over_budget<T>(&self) -> R<T> {
        self.err("the pickle copies more than its size allows: a hostile or corrupt file")
    }

    fn set_items(&mut self, pairs: Vec<(Value, Value)>, depth: u32) -> R<()> {
        let mut budget = self.budget;
        let pos = self.pos;
        let (top, top_depth) = self.top()?;
        let done = match top {
            Value::Dict(d) => {
                let n = d.len();
                Self::make_mut(&mut budget, d, n).map(|d| d.extend(pairs))
            }
            Value::Object(o) => {
                let n = o.items.len() + 2;
                Self::make_mut(&mut budget, o, n).map(|o| o.items.extend(pairs))
            }
            _ => {
                return Err(PickleError(format!(
                    "pickle byte {pos}: SETITEM(S) on a non-dict"
                )))
            }
        };
        *top_depth = (*top_depth).max(depth);
        let new_depth = *top_depth;
        self.budget = budget;
        if done.is_none() {
            return self.over_budget();
        }
        if new_depth > MAX_DEPTH {
            return self.err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn append(&mut self, vals: Vec<Value>, depth: u32) -> R<()> {
        let mut budget = self.budget;
        let pos = self.pos;
        let (top, top_depth) = self.top()?;
        let done = match top {
            Value::List(l) => {
                let n = l.len();
                Self::make_mut(&mut budget, l, n).map(|l| l.extend(vals))
            }
            Value::Object(o) => {
                let n = o.items.len() + 2;
                Self::make_mut(&mut budget, o, n)
                    .map(|o| o.items.extend(vals.into_iter().map(|v| (Value::None, v))))
            }
            _ => {
                return Err(PickleError(format!(
                    "pickle byte {pos}: APPEND(S) on a non-list"
                )))
            }
        };
        *top_depth = (*top_depth).max(depth);
        let new_depth = *top_depth;
        self.budget = budget;
        if done.is_none() {
            return self.over_budget();
        }
        if new_depth > MAX_DEPTH {
            return self.err(format!("values nested deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn object(class: String, args: Value) -> Value {
        Value::Object(Arc::new(Object {
            class,
            args,
            items: vec![],
            state: Value::None,
        }))
    }

    fn reduce(&mut self, callable: Value, args: Value) -> R<Value> {
        let (module, name) = match &callable {
            Value::Global(m, n) => (&**m, &**n),
            _ => return Ok(Self::object("<callable>".into(), args)),
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
                Ok(Value::Dict(Arc::new(vec![])))
            }
            _ => Ok(Self::object(format!("{module}.{name}"), args)),
        }
    }

    fn rebuild_tensor(&self, a: &[Value]) -> R<Value> {
        if a.len() < 4 {
            return self.err("_rebuild_tensor: expected at least 4 arguments");
        }
        let (key, dtype) = match &a[0] {
            Value::Storage { key, dtype } => (key.to_string(), *dtype),
            _ => return self.err("_rebuild_tensor: first argument is not a storage"),
        };
        let to_usize = |i: i64, what: &str| -> R<usize> {
            match usize::try_from(i) {
                Ok(u) => Ok(u),
                Err(_) => self.err(format!("_rebuild_tensor: bad {what} {i}")),
            }
        };
        let offset = match a[1] {
            Value::Int(o) => to_usize(o, "storage offset")?,
            _ => return self.err("_rebuild_tensor: bad storage offset"),
        };
        let ints = |v: &Value, what: &str| -> R<Vec<usize>> {
            match v {
                Value::Tuple(t) | Value::List(t) => t
                    .iter()
                    .map(|x| match x {
                        Value::Int(i) => to_usize(*i, what),
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
        Ok(Value::Tensor(Arc::new(TensorRef {
            key,
            dtype,
            offset,
            shape,
            stride,
        })))
    }

    fn persistent_load(&self, pid: Value) -> R<Value> {
        let t = match pid {
            Value::Tuple(t) => t,
            _ => return self.err("persistent id is not a tuple"),
        };
        match (t.first(), t.get(1), t.get(2)) {
            (Some(Value::Str(kind)), Some(Value::Global(_, class)), Some(Value::Str(key)))
                if &**kind == "storage" =>
            {
                let dtype = match StorageDtype::from_class(class) {
                    Some(d) => d,
                    None => return self.err(format!("unsupported storage type {class}")),
                };
                Ok(Value::Storage {
                    key: Arc::clone(key),
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
                b'.' => return Ok(self.pop()?.0),
                b'(' => self.push1(Value::Mark)?,
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let (v, d) = self.top()?.clone();
                    self.push(v, d)?
                }
                b'N' => self.push1(Value::None)?,
                0x88 => self.push1(Value::Bool(true))?,
                0x89 => self.push1(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push1(Value::Int(v as i64))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push1(Value::Int(v as i64))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push1(Value::Int(v as i64))?
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        let n = self.u32()?;
                        self.len_of(n as u64)?
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
                    self.push1(v)?
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
                    self.push1(v)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push1(Value::Float(f64::from_be_bytes(a)))?
                }
                b'F' => {
                    let l = self.line()?;
                    match l.parse::<f64>() {
                        Ok(f) => self.push1(Value::Float(f))?,
                        Err(_) => return self.err(format!("bad float literal {l:?}")),
                    }
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_of(n)?;
                    let v = self.text(n)?;
                    self.charge(n)?;
                    self.push1(v)?
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        let n = self.u32()?;
                        self.len_of(n as u64)?
                    } else {
                        self.u8()? as usize
                    };
                    let b = self.take(n)?;
                    self.charge(n)?;
                    self.push1(Value::Str(arc_str(&String::from_utf8_lossy(b))))?
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?;
                    self.charge(n)?;
                    self.push1(Value::Bytes(Arc::from(b)))?
                }
                b')' => self.push1(Value::Tuple(Arc::new(vec![])))?,
                b't' => {
                    let (items, d) = self.pop_mark()?;
                    self.push(Value::Tuple(Arc::new(items)), d)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.err("stack underflow in TUPLEn");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    let (items, d) = container_of(items);
                    self.push(Value::Tuple(Arc::new(items)), d)?
                }
                b']' | 0x8f => self.push1(Value::List(Arc::new(vec![])))?, // EMPTY_LIST / EMPTY_SET
                b'l' | 0x91 => {
                    // LIST / FROZENSET
                    let (items, d) = self.pop_mark()?;
                    self.push(Value::List(Arc::new(items)), d)?
                }
                b'a' => {
                    let (v, d) = self.pop()?;
                    self.append(vec![v], d.saturating_add(1))?
                }
                b'e' | 0x90 => {
                    // APPENDS / ADDITEMS
                    let (items, d) = self.pop_mark()?;
                    self.append(items, d)?
                }
                b'}' => self.push1(Value::Dict(Arc::new(vec![])))?,
                b'd' => {
                    let (items, d) = self.pop_mark()?;
                    let pairs = pairs_of(items);
                    self.push(Value::Dict(Arc::new(pairs)), d)?
                }
                b's' => {
                    let (v, dv) = self.pop()?;
                    let (k, dk) = self.pop()?;
                    self.set_items(vec![(k, v)], dv.max(dk).saturating_add(1))?
                }
                b'u' => {
                    let (items, d) = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of items");
                    }
                    self.set_items(pairs_of(items), d)?
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
                    self.charge(m.len() + n.len())?;
                    self.push1(Value::Global(arc_str(&m), arc_str(&n)))?
                }
                0x93 => {
                    let (n, _) = self.pop()?;
                    let (m, _) = self.pop()?;
                    match (m, n) {
                        (Value::Str(m), Value::Str(n)) => self.push1(Value::Global(m, n))?,
                        _ => return self.err("STACK_GLOBAL with non-string operands"),
                    }
                }
                b'R' => {
                    let (args, da) = self.pop()?;
                    let (callable, dc) = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.push_reduced(v, da.max(dc))?
                }
                0x81 | 0x92 => {
                    if op == 0x92 {
                        self.pop()?; // kwargs
                    }
                    let (args, da) = self.pop()?;
                    let (cls, dc) = self.pop()?;
                    let v = self.reduce(cls, args)?;
                    self.push_reduced(v, da.max(dc))?
                }
                b'b' => {
                    let (state, ds) = self.pop()?;
                    // OrderedDict state (e.g. `_metadata`) and tensor state
                    // are irrelevant here; objects keep theirs.
                    let mut budget = self.budget;
                    let (top, top_depth) = self.top()?;
                    if let Value::Object(o) = top {
                        let n = o.items.len() + 2;
                        match Self::make_mut(&mut budget, o, n) {
                            Some(o) => o.state = state,
                            None => return self.over_budget(),
                        }
                        *top_depth = (*top_depth).max(ds.saturating_add(1));
                        let d = *top_depth;
                        self.budget = budget;
                        if d > MAX_DEPTH {
                            return self
                                .err(format!("values nested deeper than {MAX_DEPTH} levels"));
                        }
                    }
                }
                b'Q' => {
                    let (pid, _) = self.pop()?;
                    let v = self.persistent_load(pid)?;
                    self.push1(v)?
                }
                _ => return self.err(format!("unsupported pickle opcode 0x{op:02x}")),
            }
        }
    }

    /// Pushes the result of a REDUCE/NEWOBJ whose operands had depth `d`:
    /// an object keeps its arguments (one level deeper), anything else is
    /// built from them (a tensor, a fresh dict) and is shallow.
    fn push_reduced(&mut self, v: Value, d: u32) -> R<()> {
        let depth = match &v {
            Value::Object(_) => d.saturating_add(1),
            Value::Tensor(_) | Value::Dict(_) => 1,
            _ => d,
        };
        self.push(v, depth)
    }
}

/// Items of a new container and the container's depth.
fn container_of(items: Vec<Slot>) -> (Vec<Value>, u32) {
    let depth = items
        .iter()
        .map(|(_, d)| *d)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    (items.into_iter().map(|(v, _)| v).collect(), depth)
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
///
/// Bounded: see the module documentation (work budget, nesting depth,
/// checked lengths); a hostile stream is an error naming the byte position.
pub fn parse(data: &[u8]) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        budget: data
            .len()
            .saturating_mul(BUDGET_PER_BYTE)
            .saturating_add(BUDGET_FIXED),
    };
    m.run()
}
