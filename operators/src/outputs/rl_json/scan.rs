//! A fast scanner of the top level of a JSON object held in memory: the key
//! of every entry and the byte range of its value, without parsing values.
//!
//! Readers that need only some entries of a large RL JSON file (the lazy
//! replay index of the `vqa` stage) scan the whole file once with
//! [`scan_object`] and parse the values they need later with
//! `serde_json::from_slice(&bytes[range])`.  Outside strings only `"`, `{`,
//! `}`, `[`, `]` matter to the scan; inside strings only `"` and `\`.  The
//! syntax of a value is checked when the value is parsed, not here; the
//! structure of the top-level object (braces, colons, commas, nothing after
//! the object) is checked here, with the wording of [`super::RlJsonReader`].

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use crate::outputs::SinkError;

/// One `"key": value` entry of the top-level object, found by [`scan_object`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedEntry<'a> {
    /// The decoded key (borrowed from the input when it has no escapes).
    pub key: Cow<'a, str>,
    /// Byte range of the value in the input (first byte to one past the last).
    pub value: Range<usize>,
}

/// Byte classes of the scan: 1 for the bytes that matter outside strings.
const STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// Byte classes of the scan: the bytes that matter inside strings.
const IN_STRING: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Bytes that end a scalar (number, `true`, `false`, `null`) value.
const SCALAR_END: [bool; 256] = {
    let mut t = [false; 256];
    t[b',' as usize] = true;
    t[b'}' as usize] = true;
    t[b']' as usize] = true;
    t[b' ' as usize] = true;
    t[b'\t' as usize] = true;
    t[b'\n' as usize] = true;
    t[b'\r' as usize] = true;
    t
};

/// Scans `bytes`, one JSON object, and calls `on_entry` for each of its
/// entries in order (repeated keys included).  `path` names the source in
/// errors; an error of `on_entry` stops the scan and is returned.
pub fn scan_object<'a, F>(bytes: &'a [u8], path: &Path, mut on_entry: F) -> Result<(), SinkError>
where
    F: FnMut(ScannedEntry<'a>) -> Result<(), SinkError>,
{
    let mut s = Scanner {
        bytes,
        pos: 0,
        path,
    };
    s.skip_ws();
    s.expect(b'{')?;
    let mut first = true;
    loop {
        s.skip_ws();
        if s.peek() == Some(b'}') {
            s.pos += 1;
            s.skip_ws();
            if s.pos < bytes.len() {
                return Err(s.err("content after the top-level object"));
            }
            return Ok(());
        }
        if !first {
            s.expect(b',')?;
            s.skip_ws();
        }
        first = false;
        let key = s.key()?;
        s.skip_ws();
        s.expect(b':')?;
        s.skip_ws();
        let start = s.pos;
        s.value()?;
        on_entry(ScannedEntry {
            key,
            value: start..s.pos,
        })?;
    }
}

/// 1-based line and column (in bytes) of byte `offset` of `bytes`, for
/// error messages.
pub fn line_column(bytes: &[u8], offset: usize) -> (usize, usize) {
    let before = &bytes[..offset.min(bytes.len())];
    let line = 1 + before.iter().filter(|&&b| b == b'\n').count();
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

struct Scanner<'a, 'p> {
    bytes: &'a [u8],
    pos: usize,
    path: &'p Path,
}

impl<'a> Scanner<'a, '_> {
    fn err(&self, what: impl std::fmt::Display) -> SinkError {
        SinkError::invalid(self.path, format!("byte {}: {what}", self.pos))
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), SinkError> {
        match self.peek() {
            None => Err(self.err("unexpected end of file")),
            Some(got) if got != want => Err(self.err(format!(
                "expected {:?}, found {:?}",
                want as char, got as char
            ))),
            Some(_) => {
                self.pos += 1;
                Ok(())
            }
        }
    }

    /// Moves past the string whose opening quote is at the cursor; returns
    /// whether it holds an escape.
    fn string(&mut self) -> Result<bool, SinkError> {
        self.expect(b'"')?;
        let (end, escaped) = string_end(self.bytes, self.pos)
            .ok_or_else(|| self.err("unexpected end of file inside a string"))?;
        self.pos = end;
        Ok(escaped)
    }

    /// The key string at the cursor, decoded.
    fn key(&mut self) -> Result<Cow<'a, str>, SinkError> {
        let start = self.pos;
        let escaped = self.string()?;
        let raw = &self.bytes[start..self.pos];
        if !escaped {
            if let Ok(s) = std::str::from_utf8(&raw[1..raw.len() - 1]) {
                return Ok(Cow::Borrowed(s));
            }
        }
        serde_json::from_slice::<String>(raw)
            .map(Cow::Owned)
            .map_err(|e| SinkError::json(self.path, format!("byte {start}: key"), e))
    }

    /// Moves past the value at the cursor.
    fn value(&mut self) -> Result<(), SinkError> {
        match self.peek() {
            None => Err(self.err("unexpected end of file")),
            Some(b'"') => self.string().map(|_| ()),
            Some(b'{' | b'[') => {
                self.pos = group_end(self.bytes, self.pos)
                    .ok_or_else(|| self.err("unexpected end of file inside a value"))?;
                Ok(())
            }
            Some(b) if SCALAR_END[b as usize] => {
                Err(self.err(format!("expected a value, found {:?}", b as char)))
            }
            Some(_) => {
                let rest = &self.bytes[self.pos..];
                self.pos += rest
                    .iter()
                    .position(|&b| SCALAR_END[b as usize])
                    .unwrap_or(rest.len());
                Ok(())
            }
        }
    }
}

/// One past the closing quote of the string whose body starts at `i` (just
/// after its opening quote), and whether the string holds an escape; `None`
/// when the input ends first.
#[inline]
fn string_end(bytes: &[u8], mut i: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        while !IN_STRING[*bytes.get(i)? as usize] {
            i += 1;
        }
        if bytes[i] == b'"' {
            return Some((i + 1, escaped));
        }
        escaped = true;
        i += 2;
    }
}

/// One past the bracket that closes the object or array opening at `i`
/// (`{`/`[` pairs are counted together, as [`super::RlJsonReader`] does;
/// mismatched kinds are found when the value is parsed); `None` when the
/// input ends first.
#[inline]
fn group_end(bytes: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    loop {
        while !STRUCTURAL[*bytes.get(i)? as usize] {
            i += 1;
        }
        match bytes[i] {
            b'"' => {
                i = string_end(bytes, i + 1)?.0;
                continue;
            }
            b'{' | b'[' => depth += 1,
            _ => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Result<Vec<(String, String)>, SinkError> {
        let mut out = Vec::new();
        scan_object(text.as_bytes(), Path::new("t.json"), |e| {
            out.push((e.key.into_owned(), text[e.value].to_string()));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn json_scan_finds_keys_and_value_ranges() {
        let text = " {\"_meta\" : {\"a\":[1,{\"b\":\"]\"}]} , \"x\": -1.5e3 ,\"y\":true,\"z\":\"s\\\"\",\n\"2\" :{\"q\":\"}{][\\\\\",\"u\":\"é ✓ \\u00e9\"} , \"k\\u0031\":[] , \"e\":{}}\n";
        let got = scan(text).unwrap();
        let want = [
            ("_meta", r#"{"a":[1,{"b":"]"}]}"#),
            ("x", "-1.5e3"),
            ("y", "true"),
            ("z", r#""s\"""#),
            ("2", r#"{"q":"}{][\\","u":"é ✓ \u00e9"}"#),
            ("k1", "[]"),
            ("e", "{}"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        // Every value range parses as the value itself.
        for (_, v) in &got {
            serde_json::from_str::<serde_json::Value>(v).unwrap();
        }
        assert_eq!(scan("{}").unwrap(), vec![]);
        assert_eq!(scan(" {\n}\n").unwrap(), vec![]);
    }

    #[test]
    fn json_scan_rejects_bad_top_level_structure() {
        for (bad, why) in [
            ("", "unexpected end of file"),
            ("[]", "expected '{'"),
            ("{\"_meta\":{},}", "byte 12"),
            ("{\"_meta\":{} \"x\":1}", "expected ','"),
            ("{\"a\" 1}", "expected ':'"),
            ("{\"a\":{\"b\":[1,2}", "inside a value"),
            ("{\"a\":\"abc", "inside a string"),
            ("{\"a\":{\"b\":\"}\"}", "unexpected end of file"),
            ("{\"a\":{\"b\":\"}\"", "inside a value"),
            ("{\"a\":1", "unexpected end of file"),
            ("{\"a\":1} x", "content after the top-level object"),
            ("{\"a\":1}}", "content after the top-level object"),
            ("{\"a\":}", "expected a value"),
        ] {
            let err = scan(bad).unwrap_err().to_string();
            assert!(
                err.contains("t.json") && err.contains(why),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn json_scan_line_column() {
        let b = b"ab\ncd\nef";
        assert_eq!(line_column(b, 0), (1, 1));
        assert_eq!(line_column(b, 1), (1, 2));
        assert_eq!(line_column(b, 3), (2, 1));
        assert_eq!(line_column(b, 7), (3, 2));
    }
}
