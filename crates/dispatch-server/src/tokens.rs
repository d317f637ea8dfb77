//! The API tokens the server knows (by hash, kept in step with the store) and how a new one
//! is drawn. What a request may do with one is the HTTP edge's business (`auth.rs`).

use parking_lot::RwLock;
use std::collections::HashMap;

use dispatch_core::auth::{ApiToken, TOKEN_PREFIX};

/// Tokens by hash, loaded at start and kept in step with the store.
#[derive(Default)]
pub struct Tokens {
    by_hash: RwLock<HashMap<String, ApiToken>>,
}

impl Tokens {
    pub fn replace_all(&self, all: Vec<ApiToken>) {
        let map = all.into_iter().map(|t| (t.hash.clone(), t)).collect();
        *self.by_hash.write() = map;
    }

    pub fn insert(&self, t: ApiToken) {
        self.by_hash.write().insert(t.hash.clone(), t);
    }

    pub fn remove(&self, name: &str) {
        self.by_hash.write().retain(|_, t| t.name != name);
    }

    pub(crate) fn find(&self, hash: &str) -> Option<ApiToken> {
        self.by_hash.read().get(hash).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.read().is_empty()
    }
}

/// A new random token: `dsp_` + 43 base64url characters (256 bits from the OS).
pub fn generate_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    Ok(format!("{TOKEN_PREFIX}{encoded}"))
}
