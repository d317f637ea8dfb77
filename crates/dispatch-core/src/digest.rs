//! Content digests in the OCI form `sha256:<hex>`.

use sha2::{Digest as _, Sha256};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:<hex>` of several parts, each length-prefixed so that part boundaries count
/// (`["ab","c"]` and `["a","bc"]` differ).
pub fn sha256_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// True when `s` is `sha256:` followed by 64 lower-case hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The hex part of a `sha256:` digest (for file names).
pub fn hex_part(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_length_prefixed() {
        assert_ne!(
            sha256_parts([b"ab".as_slice(), b"c"]),
            sha256_parts([b"a".as_slice(), b"bc"])
        );
        assert!(is_sha256(&sha256(b"x")));
        assert!(!is_sha256("sha256:xyz"));
    }
}
