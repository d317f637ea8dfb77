//! Secrets at rest (DESIGN §9): ChaCha20-Poly1305 with a 256-bit key kept in
//! `DATA_DIR/secret.key` (0600, created on first start). Each secret's data is sealed with a
//! fresh random nonce and its `namespace/name` as associated data (a ciphertext copied onto
//! another secret does not open). The store holds the key names and the ciphertext only.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use dispatch_core::SealedSecret;

pub struct SecretBox {
    cipher: ChaCha20Poly1305,
    /// Tells keys apart without telling anything of them (servers sharing a store compare
    /// theirs): the SHA-256 of a label and the key.
    fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "secret key file {0} is not 32 bytes: restore it from a backup, or the secrets cannot be read"
    )]
    KeyLength(String),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("secret {0} cannot be decrypted (wrong key file, or a corrupted record)")]
    Open(String),
}

fn random<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(b)
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

impl SecretBox {
    /// Loads the key file, creating it (0600) when missing; without a path the key lives in
    /// memory only (tests).
    pub fn load_or_create(path: Option<&Path>) -> Result<SecretBox, SecretError> {
        let key: [u8; 32] = match path {
            None => random()?,
            Some(p) => {
                let err = |source| SecretError::KeyFile {
                    path: p.display().to_string(),
                    source,
                };
                match std::fs::read(p) {
                    Ok(bytes) => bytes
                        .try_into()
                        .map_err(|_| SecretError::KeyLength(p.display().to_string()))?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        use std::os::unix::fs::OpenOptionsExt;
                        let key: [u8; 32] = random()?;
                        std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(0o600)
                            .open(p)
                            .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
                            .map_err(err)?;
                        key
                    }
                    Err(e) => return Err(err(e)),
                }
            }
        };
        Ok(SecretBox {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            fingerprint: dispatch_core::digest::sha256_parts([
                b"dispatch secret key\0".as_slice(),
                key.as_slice(),
            ]),
        })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn seal(
        &self,
        ns: &str,
        name: &str,
        data: &BTreeMap<String, String>,
    ) -> Result<SealedSecret, SecretError> {
        let nonce: [u8; 12] = random()?;
        let plain = serde_json::to_vec(data).unwrap_or_default();
        let aad = format!("{ns}/{name}");
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Open(aad.clone()))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(SealedSecret {
            keys: data.keys().cloned().collect(),
            sealed: b64(&blob),
        })
    }

    pub fn open(
        &self,
        ns: &str,
        name: &str,
        sealed: &SealedSecret,
    ) -> Result<BTreeMap<String, String>, SecretError> {
        let aad = format!("{ns}/{name}");
        let blob = unb64(&sealed.sealed).ok_or_else(|| SecretError::Open(aad.clone()))?;
        if blob.len() < 12 {
            return Err(SecretError::Open(aad));
        }
        let (nonce, ct) = blob.split_at(12);
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Open(aad.clone()))?;
        serde_json::from_slice(&plain).map_err(|_| SecretError::Open(aad))
    }
}

/// Replaces every secret value (4 characters or more: shorter ones would mangle ordinary text)
/// in `text` with `[redacted]`.
pub fn redact(text: &str, values: &[String]) -> String {
    let mut out = text.to_string();
    for v in values.iter().filter(|v| v.len() >= 4) {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), "[redacted]");
        }
    }
    out
}

impl SecretBox {
    /// The data of a stored Secret object.
    pub fn open_object(
        &self,
        o: &dispatch_core::Object,
    ) -> Result<BTreeMap<String, String>, SecretError> {
        let sealed: SealedSecret = serde_json::from_value(o.spec.clone())
            .map_err(|_| SecretError::Open(format!("{}/{}", o.namespace(), o.name())))?;
        self.open(o.namespace(), o.name(), &sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_binds_to_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let b = SecretBox::load_or_create(Some(&path)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let data = BTreeMap::from([("password".to_string(), "hunter2-very-secret".to_string())]);
        let s = b.seal("default", "db", &data).unwrap();
        assert_eq!(s.keys, ["password"]);
        assert!(!s.sealed.contains("hunter2"));
        // Same key file → opens; another name → refused.
        let again = SecretBox::load_or_create(Some(&path)).unwrap();
        assert_eq!(again.open("default", "db", &s).unwrap(), data);
        assert!(again.open("default", "other", &s).is_err());
        assert!(
            SecretBox::load_or_create(None)
                .unwrap()
                .open("default", "db", &s)
                .is_err()
        );
        assert_eq!(
            redact(
                "pw=hunter2-very-secret!",
                &["hunter2-very-secret".into(), "ab".into()]
            ),
            "pw=[redacted]!"
        );
    }
}
