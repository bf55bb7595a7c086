//! API keys: making new ones, their digests, and the key ring the server checks presented keys
//! against.
//!
//! The configuration holds a key's SHA-256 digest (`sha256:<64 hex>`), not the key: keys are
//! 256 random bits, so a plain hash is enough (no salt, no slow hash), and a leaked config file
//! leaks no credential. A presented key is hashed and compared with every digest in constant
//! time.

use std::fmt;
use std::str::FromStr;

use rand::TryRngCore;
use sha2::{Digest as _, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::config::AuthConfig;

/// What every generated key starts with, so a key is recognisable in a secret scanner.
pub const KEY_PREFIX: &str = "dk_";
/// Random bytes in a generated key.
pub const KEY_BYTES: usize = 32;
/// The shortest key accepted in plain (`key = "..."`) in the configuration.
pub const MIN_PLAIN_KEY_CHARS: usize = 16;
/// What a digest's text form starts with.
pub const DIGEST_PREFIX: &str = "sha256:";

/// The SHA-256 digest of a key; shown and parsed as `sha256:<64 lowercase hex>`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key` (its UTF-8 bytes, exactly as presented).
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{DIGEST_PREFIX}{}", hex(&self.0))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a digest's text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be \"sha256:\" followed by 64 hex digits (the SHA-256 of the key)")]
pub struct BadDigest;

impl FromStr for KeyDigest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, BadDigest> {
        let hex = s.strip_prefix(DIGEST_PREFIX).ok_or(BadDigest)?.as_bytes();
        if hex.len() != 64 {
            return Err(BadDigest);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (nibble(pair[0]).ok_or(BadDigest)? << 4) | nibble(pair[1]).ok_or(BadDigest)?;
        }
        Ok(Self(out))
    }
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A fresh key: [`KEY_PREFIX`] and [`KEY_BYTES`] bytes from the operating system's random
/// source, in hex (URL- and header-safe).
pub fn generate() -> String {
    random_token(KEY_PREFIX)
}

/// `prefix` and [`KEY_BYTES`] random bytes in hex: a secret nobody can guess.
pub(crate) fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; KEY_BYTES];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random source works");
    format!("{prefix}{}", hex(&bytes))
}

/// The `[[auth.keys]]` table that admits `key` under `name`, holding only its digest.
pub fn config_snippet(name: &str, key: &str) -> String {
    // A JSON string is a valid TOML basic string (same escapes), whatever the name holds.
    let name = serde_json::to_string(name).expect("a string serializes");
    format!("[[auth.keys]]\nname = {name}\ndigest = \"{}\"\n", KeyDigest::of(key))
}

/// The configured keys as digests, and the check of a presented key.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    /// Name, digest, admin.
    entries: Vec<(String, KeyDigest, bool)>,
}

/// A `[[auth.keys]]` entry that does not make a key (the config was not validated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth.keys[{index}] has no valid `digest` or `key`")]
pub struct BadKeyEntry {
    pub index: usize,
}

impl KeyRing {
    /// Digests of every configured key: a `digest` entry as given, a plain `key` hashed now.
    pub fn new(auth: &AuthConfig) -> Result<Self, BadKeyEntry> {
        let entries = auth
            .keys
            .iter()
            .enumerate()
            .map(|(index, k)| {
                let digest = match (&k.digest, &k.key) {
                    (Some(d), None) => d.parse().map_err(|_| BadKeyEntry { index })?,
                    (None, Some(key)) => KeyDigest::of(key),
                    _ => return Err(BadKeyEntry { index }),
                };
                Ok((k.name.clone(), digest, k.admin))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// No keys: authentication is off.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the key `presented`, or `None` for an unknown one. Every digest is compared
    /// in constant time and the loop never stops early, so how long this takes says nothing
    /// about which entry (if any) matched.
    pub fn owner(&self, presented: &str) -> Option<&str> {
        self.lookup(presented).map(|(name, _)| name)
    }

    /// As [`KeyRing::owner`], with whether the key is an admin key (`admin = true`).
    pub fn lookup(&self, presented: &str) -> Option<(&str, bool)> {
        let digest = KeyDigest::of(presented);
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, (_, candidate, _)) in self.entries.iter().enumerate() {
            let equal = candidate.0.ct_eq(&digest.0);
            // The first match wins (validation rejects the same key twice anyway).
            index.conditional_assign(&(i as u64), equal & !found);
            found |= equal;
        }
        bool::from(found).then(|| {
            let (name, _, admin) = &self.entries[index as usize];
            (name.as_str(), *admin)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKey;

    #[test]
    fn digests_are_sha256_in_hex() {
        // printf %s abc | sha256sum
        let d = KeyDigest::of("abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<KeyDigest>(), Ok(d));
        assert_eq!(
            d.to_string().to_uppercase().replace("SHA256:", "sha256:").parse(),
            Ok(d)
        );
    }

    #[test]
    fn malformed_digests_are_refused() {
        let good = KeyDigest::of("abc").to_string();
        for bad in [
            "",
            "sha256:",
            &good[7..],
            &good[..70],
            &format!("{good}0"),
            &good.replace("sha256:", "sha512:"),
            &good.replace('b', "g"),
            &format!("sha256:{}", "é".repeat(32)),
        ] {
            assert_eq!(bad.parse::<KeyDigest>(), Err(BadDigest), "{bad:?}");
        }
    }

    #[test]
    fn generated_keys_are_long_random_and_prefixed() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX), "{a}");
        let body = &a[KEY_PREFIX.len()..];
        assert_eq!(body.len(), KEY_BYTES * 2);
        assert!(
            body.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{a}"
        );
    }

    #[test]
    fn the_snippet_is_toml_holding_the_digest_not_the_key() {
        let key = generate();
        let snippet = config_snippet("widget \"eu\"", &key);
        assert!(!snippet.contains(&key));
        // As a user would: the snippet pasted into a configuration file.
        let path = std::env::temp_dir().join(format!("dllm-keys-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, &snippet).unwrap();
        let file = crate::config::Config::load(Some(&path));
        let _ = std::fs::remove_file(&path);
        let file = file.unwrap();
        let entry = &file.auth.keys[0];
        assert_eq!(entry.name, "widget \"eu\"");
        assert_eq!(entry.digest.as_deref(), Some(KeyDigest::of(&key).to_string().as_str()));
        let ring = KeyRing::new(&file.auth).unwrap();
        assert_eq!(ring.owner(&key), Some("widget \"eu\""));
    }

    fn auth(keys: Vec<ApiKey>) -> AuthConfig {
        AuthConfig {
            keys,
            ..crate::config::Config::defaults().auth
        }
    }

    #[test]
    fn the_ring_knows_digest_and_plain_keys_and_nothing_else() {
        let ring = KeyRing::new(&auth(vec![
            ApiKey::with_digest("widget", KeyDigest::of("widget-key-0123456789")),
            ApiKey::plain("legacy", "legacy-key-0123456789"),
            ApiKey::with_digest("dashboard", KeyDigest::of("dashboard-key-0123456789")),
        ]))
        .unwrap();
        assert_eq!(ring.owner("widget-key-0123456789"), Some("widget"));
        assert_eq!(ring.owner("legacy-key-0123456789"), Some("legacy"));
        assert_eq!(ring.owner("dashboard-key-0123456789"), Some("dashboard"));
        assert_eq!(ring.owner("widget-key-012345678"), None);
        assert_eq!(ring.owner(""), None);
        // A digest is not a key.
        assert_eq!(ring.owner(&KeyDigest::of("widget-key-0123456789").to_string()), None);
        assert!(KeyRing::new(&auth(vec![])).unwrap().is_empty());
    }

    #[test]
    fn an_entry_without_exactly_one_of_key_and_digest_is_refused() {
        let mut both = ApiKey::plain("x", "legacy-key-0123456789");
        both.digest = Some(KeyDigest::of("y").to_string());
        let mut neither = both.clone();
        neither.key = None;
        neither.digest = None;
        let bad = ApiKey {
            name: "z".into(),
            key: None,
            digest: Some("sha256:nope".into()),
            admin: false,
        };
        for (entry, index) in [(both, 1), (neither, 1), (bad, 1)] {
            let keys = vec![ApiKey::plain("ok", "legacy-key-0123456789"), entry];
            assert_eq!(KeyRing::new(&auth(keys)).unwrap_err(), BadKeyEntry { index });
        }
    }
}
