//! Secrets: as users write them, and as the server stores them (sealed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// A secret as written by users: string values. The server stores it sealed
/// ([`SealedSecret`]) and shows only the keys unless asked to reveal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretSpec {
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

impl SecretSpec {
    pub(super) fn normalize(self) -> Result<Self, ValidationError> {
        if self.data.is_empty() {
            return Err(ValidationError::new(
                "a secret needs at least one key in spec.data",
            ));
        }
        for k in self.data.keys() {
            let ok = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok {
                return Err(ValidationError::new(format!(
                    "secret key {k:?} is not valid: use letters, digits, '-', '_' and '.'"
                )));
            }
        }
        Ok(self)
    }
}

/// How a secret is stored: its keys in clear, its data as AEAD ciphertext.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecret {
    /// The secret's keys (its values are only in `sealed`).
    pub keys: Vec<String>,
    /// base64 of nonce (12 bytes) + ciphertext of the JSON `data`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed: String,
}
