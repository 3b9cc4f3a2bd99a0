//! Envelope encryption of values at rest (secrets, env values).
//!
//! Each value gets its own random data key (AES-256-GCM); the data key is
//! wrapped by a key-encryption key (KEK) from the deployment's key file. A
//! sealed value names its KEK, so a key file may hold an old KEK next to
//! the new one while values are re-wrapped (docs/security.md, "Secrets": rotation).
//!
//! Layout: `1 | len(kek id) | kek id | nonce₁ | wrap(dek) | nonce₂ | seal(value)`.
//! The value's associated data is the caller's context (its project and
//! purpose), so a sealed value moved to another row does not open.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Why a sealed value did not open, or a key file did not load.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed under key `{0}`, which is not in the key file (--secrets-key-file)")]
    UnknownKey(String),
    #[error("sealed value is corrupt or does not belong here")]
    Corrupt,
    #[error("secrets key file {path}: {message}")]
    KeyFile { path: String, message: String },
}

/// The deployment's key-encryption keys: the first seals, all open.
pub struct Sealer {
    primary: String,
    keys: HashMap<String, LessSafeKey>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Sealer")
            .field("primary", &self.primary)
            .field("keys", &ids)
            .finish()
    }
}

fn aead_key(bytes: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .ok()
        .map(LessSafeKey::new)
}

impl Sealer {
    /// Reads a key file: one `ID:BASE64` line per key (32 random bytes), the
    /// first the one that seals; blank lines and `#` comments are skipped.
    pub fn from_file(path: &Path) -> Result<Self, SealError> {
        let err = |message: String| SealError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    /// Parses key-file text (see [`Sealer::from_file`]).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut primary = None;
        let mut keys = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, b64) = line.split_once(':').ok_or_else(|| {
                format!(
                    "line {}: expected `ID:BASE64` (key id, a colon, 32 bytes in base64)",
                    n + 1
                )
            })?;
            let id = id.trim();
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "line {}: key id must be 1-64 letters, digits, `-` or `_`",
                    n + 1
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| format!("line {}: key `{id}` is not base64: {e}", n + 1))?;
            if bytes.len() != KEY_LEN {
                return Err(format!(
                    "line {}: key `{id}` is {} bytes; it must be {KEY_LEN} (`head -c32 /dev/urandom | base64`)",
                    n + 1,
                    bytes.len()
                ));
            }
            let key = aead_key(&bytes).ok_or_else(|| format!("line {}: unusable key", n + 1))?;
            if keys.insert(id.to_string(), key).is_some() {
                return Err(format!("line {}: key id `{id}` appears twice", n + 1));
            }
            primary.get_or_insert_with(|| id.to_string());
        }
        let primary = primary.ok_or("no key in the file")?;
        Ok(Self {
            primary,
            keys,
            rng: SystemRandom::new(),
        })
    }

    /// A sealer with one fresh random key (tests).
    pub fn ephemeral() -> Self {
        let mut k = [0u8; KEY_LEN];
        SystemRandom::new().fill(&mut k).expect("system randomness");
        let line = format!("t:{}", base64::engine::general_purpose::STANDARD.encode(k));
        Self::parse(&line).expect("a fresh key parses")
    }

    /// The id of the key that seals.
    pub fn primary(&self) -> &str {
        &self.primary
    }

    fn random<const N: usize>(&self) -> [u8; N] {
        let mut b = [0u8; N];
        self.rng.fill(&mut b).expect("system randomness");
        b
    }

    /// Seals `value` under a fresh data key wrapped by the primary KEK.
    pub fn seal(&self, context: &str, value: &[u8]) -> Vec<u8> {
        let kek = &self.keys[&self.primary];
        let dek_bytes: [u8; KEY_LEN] = self.random();
        let dek = aead_key(&dek_bytes).expect("a 32-byte key");
        let mut out = Vec::with_capacity(
            2 + self.primary.len() + 2 * NONCE_LEN + KEY_LEN + 2 * TAG_LEN + value.len(),
        );
        out.push(VERSION);
        out.push(self.primary.len() as u8);
        out.extend_from_slice(self.primary.as_bytes());
        out.extend_from_slice(&wrap(
            kek,
            self.random(),
            &dek_bytes,
            self.primary.as_bytes(),
        ));
        out.extend_from_slice(&wrap(&dek, self.random(), value, context.as_bytes()));
        out
    }

    /// Opens a value [`Sealer::seal`] made with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (kek_id, wrapped, body) = split(sealed)?;
        let kek = self
            .keys
            .get(kek_id)
            .ok_or_else(|| SealError::UnknownKey(kek_id.to_string()))?;
        let dek_bytes = unwrap(kek, wrapped, kek_id.as_bytes())?;
        let dek = aead_key(&dek_bytes).ok_or(SealError::Corrupt)?;
        unwrap(&dek, body, context.as_bytes())
    }

    /// The id of the KEK `sealed` is under.
    pub fn key_of(sealed: &[u8]) -> Result<&str, SealError> {
        split(sealed).map(|(id, _, _)| id)
    }

    /// Re-wraps the data key of `sealed` under the primary KEK; the value
    /// itself is not touched. `None` when it already is.
    pub fn rewrap(&self, sealed: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        let (kek_id, wrapped, body) = split(sealed)?;
        if kek_id == self.primary {
            return Ok(None);
        }
        let old = self
            .keys
            .get(kek_id)
            .ok_or_else(|| SealError::UnknownKey(kek_id.to_string()))?;
        let dek = unwrap(old, wrapped, kek_id.as_bytes())?;
        let kek = &self.keys[&self.primary];
        let mut out = vec![VERSION, self.primary.len() as u8];
        out.extend_from_slice(self.primary.as_bytes());
        out.extend_from_slice(&wrap(kek, self.random(), &dek, self.primary.as_bytes()));
        out.extend_from_slice(body);
        Ok(Some(out))
    }
}

/// `nonce | seal(plain)`.
fn wrap(key: &LessSafeKey, nonce: [u8; NONCE_LEN], plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut buf,
    )
    .expect("AES-GCM seals any input under 64 GiB");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out
}

fn unwrap(key: &LessSafeKey, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(SealError::Corrupt);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Corrupt)?;
    let mut buf = ct.to_vec();
    let plain = key
        .open_in_place(nonce, Aad::from(aad), &mut buf)
        .map_err(|_| SealError::Corrupt)?;
    Ok(plain.to_vec())
}

/// (KEK id, wrapped data key, sealed value).
fn split(sealed: &[u8]) -> Result<(&str, &[u8], &[u8]), SealError> {
    let [VERSION, n, rest @ ..] = sealed else {
        return Err(SealError::Corrupt);
    };
    let n = usize::from(*n);
    let wrapped_len = NONCE_LEN + KEY_LEN + TAG_LEN;
    if rest.len() < n + wrapped_len + NONCE_LEN + TAG_LEN {
        return Err(SealError::Corrupt);
    }
    let (id, rest) = rest.split_at(n);
    let id = std::str::from_utf8(id).map_err(|_| SealError::Corrupt)?;
    let (wrapped, body) = rest.split_at(wrapped_len);
    Ok((id, wrapped, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(id: &str, byte: u8) -> String {
        format!(
            "{id}:{}",
            base64::engine::general_purpose::STANDARD.encode([byte; 32])
        )
    }

    #[test]
    fn sealed_values_open_only_in_their_context_and_hide_the_value() {
        let s = Sealer::ephemeral();
        let sealed = s.seal("p1/secret", b"sk-ant-very-secret");
        assert!(!sealed.windows(6).any(|w| w == b"sk-ant"));
        assert_eq!(
            s.open("p1/secret", &sealed).expect("should succeed"),
            b"sk-ant-very-secret"
        );
        assert!(matches!(
            s.open("p2/secret", &sealed),
            Err(SealError::Corrupt)
        ));
        let mut flipped = sealed.clone();
        *flipped.last_mut().expect("should succeed") ^= 1;
        assert!(matches!(
            s.open("p1/secret", &flipped),
            Err(SealError::Corrupt)
        ));
        assert!(matches!(
            s.open("p1/secret", &sealed[..10]),
            Err(SealError::Corrupt)
        ));
        assert!(matches!(s.open("p1/secret", &[]), Err(SealError::Corrupt)));
    }

    #[test]
    fn rotation_rewraps_under_the_new_key_and_the_old_one_can_then_go() {
        let old = Sealer::parse(&key_line("k1", 1)).expect("should succeed");
        let sealed = old.seal("ctx", b"value");
        let both = Sealer::parse(&format!(
            "{}\n# old\n{}\n",
            key_line("k2", 2),
            key_line("k1", 1)
        ))
        .expect("should succeed");
        assert_eq!(both.primary(), "k2");
        assert_eq!(both.open("ctx", &sealed).expect("should succeed"), b"value");
        let rewrapped = both
            .rewrap(&sealed)
            .expect("should succeed")
            .expect("under k1");
        assert_eq!(Sealer::key_of(&rewrapped).expect("should succeed"), "k2");
        assert!(both.rewrap(&rewrapped).expect("should succeed").is_none());
        let new_only = Sealer::parse(&key_line("k2", 2)).expect("should succeed");
        assert_eq!(
            new_only.open("ctx", &rewrapped).expect("should succeed"),
            b"value"
        );
        match new_only.open("ctx", &sealed) {
            Err(SealError::UnknownKey(k)) => assert_eq!(k, "k1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn key_files_say_what_is_wrong() {
        assert!(
            Sealer::parse("")
                .expect_err("should fail")
                .contains("no key")
        );
        assert!(
            Sealer::parse("k1")
                .expect_err("should fail")
                .contains("ID:BASE64")
        );
        assert!(
            Sealer::parse("k1:AAAA")
                .expect_err("should fail")
                .contains("must be 32")
        );
        let dup = format!("{}\n{}", key_line("a", 1), key_line("a", 2));
        assert!(
            Sealer::parse(&dup)
                .expect_err("should fail")
                .contains("twice")
        );
    }
}
