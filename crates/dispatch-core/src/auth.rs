//! API tokens and roles (DESIGN §9): `Authorization: Bearer <token>`, stored as SHA-256
//! hashes, one role per token, scoped to one namespace or all.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What a token may do. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads resources, runs, executions and logs.
    Viewer,
    /// Also creates, updates, deletes and executes.
    Developer,
    /// Also manages secrets, tokens, namespaces; reads the audit log; runs gc.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "developer" => Some(Role::Developer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every namespace (an admin token made at first start has this scope).
pub const ALL_NAMESPACES: &str = "*";

/// A token as stored: the secret itself is never kept, only its hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    /// One namespace, or `*`.
    pub namespace: String,
    /// `sha256:<hex>` of the token; never sent to clients.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
    pub created_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

impl ApiToken {
    pub fn covers(&self, namespace: &str) -> bool {
        self.namespace == ALL_NAMESPACES || self.namespace == namespace
    }

    pub fn expired(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }

    /// The record without its hash (what the API shows).
    pub fn public(&self) -> ApiToken {
        ApiToken {
            hash: String::new(),
            ..self.clone()
        }
    }
}

/// Tokens look like `dsp_` + 43 base64url characters (256 random bits).
pub const TOKEN_PREFIX: &str = "dsp_";

/// The stored form of a presented token.
pub fn token_hash(token: &str) -> String {
    crate::digest::sha256(token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_scopes_checked() {
        assert!(Role::Admin > Role::Developer && Role::Developer > Role::Viewer);
        assert_eq!(Role::parse("Developer"), Some(Role::Developer));
        let t = ApiToken {
            name: "ci".into(),
            role: Role::Viewer,
            namespace: "team-a".into(),
            hash: token_hash("dsp_x"),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: Some(Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(60)),
        };
        assert!(t.covers("team-a") && !t.covers("team-b"));
        assert!(!t.expired(Timestamp::UNIX_EPOCH));
        assert!(t.expired(Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(60)));
        assert!(
            serde_json::to_string(&t.public())
                .unwrap()
                .find("hash")
                .is_none()
        );
    }
}

/// One mutating API call, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntry {
    pub at: Timestamp,
    /// The token's name (`-` when auth is off).
    pub who: String,
    pub method: String,
    pub path: String,
    pub status: u16,
}
