//! Content keys: SHA-256 over a domain tag and length-prefixed fields, so
//! that a result is found again exactly when everything it depends on is
//! unchanged (and two different field lists can never collide by
//! concatenation).

use sha2::{Digest, Sha256};

/// A 32-byte content key (SHA-256).
pub type Key = [u8; 32];

/// Builds a [`Key`] from typed fields. Every field is written with a type
/// tag and its length, so `("ab", "c")` and `("a", "bc")` differ.
#[derive(Clone)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    /// A hasher for keys of one kind (`domain` separates kinds, e.g.
    /// `"vqa-answer/v1"`).
    pub fn new(domain: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"leverflow-key\0");
        h.update((domain.len() as u64).to_le_bytes());
        h.update(domain.as_bytes());
        Self(h)
    }

    fn tagged(&mut self, tag: u8, bytes: &[u8]) -> &mut Self {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    /// Adds raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.tagged(b'b', b)
    }

    /// Adds a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.tagged(b's', s.as_bytes())
    }

    /// Adds an integer.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.tagged(b'u', &v.to_le_bytes())
    }

    /// Adds a float by its bit pattern.
    pub fn f64(&mut self, v: f64) -> &mut Self {
        self.tagged(b'f', &v.to_bits().to_le_bytes())
    }

    /// Adds an optional string (absent and empty differ).
    pub fn opt_str(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.tagged(b'S', s.as_bytes()),
            None => self.tagged(b'N', &[]),
        }
    }

    /// Adds a list of integers.
    pub fn u64s(&mut self, v: &[u64]) -> &mut Self {
        self.0.update([b'U']);
        self.0.update((v.len() as u64).to_le_bytes());
        for x in v {
            self.0.update(x.to_le_bytes());
        }
        self
    }

    /// Adds a row of `f32` values by their bit patterns.
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.0.update([b'F']);
        self.0.update((v.len() as u64).to_le_bytes());
        for x in v {
            self.0.update(x.to_bits().to_le_bytes());
        }
        self
    }

    /// Adds another key.
    pub fn key(&mut self, k: &Key) -> &mut Self {
        self.tagged(b'k', k)
    }

    /// Adds any serialisable value through its canonical JSON form (for
    /// settings structs; not for bulk data).
    pub fn json<T: serde::Serialize + ?Sized>(&mut self, v: &T) -> &mut Self {
        let s = serde_json::to_vec(v).unwrap_or_default();
        self.tagged(b'j', &s)
    }

    /// The key.
    pub fn finish(&self) -> Key {
        self.0.clone().finalize().into()
    }
}

/// A key as lowercase hex (for messages and `_meta`).
pub fn key_hex(k: &Key) -> String {
    hex::encode(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_boundaries_and_domains_matter() {
        let a = KeyHasher::new("t").str("ab").str("c").finish();
        let b = KeyHasher::new("t").str("a").str("bc").finish();
        assert_ne!(a, b);
        let c = KeyHasher::new("u").str("ab").str("c").finish();
        assert_ne!(a, c);
        let d = KeyHasher::new("t").str("ab").str("c").finish();
        assert_eq!(a, d);
        assert_ne!(
            KeyHasher::new("t").opt_str(None).finish(),
            KeyHasher::new("t").opt_str(Some("")).finish()
        );
        assert_ne!(
            KeyHasher::new("t").f32s(&[0.0]).finish(),
            KeyHasher::new("t").f32s(&[-0.0]).finish()
        );
        assert_eq!(key_hex(&[0xab; 32]).len(), 64);
    }
}
