//! Resource names: DNS-1123 labels, as Kubernetes requires, so that every name is valid in
//! both backends.

use crate::ValidationError;

/// Longest name accepted (a DNS-1123 label).
pub const MAX_NAME_LEN: usize = 63;

/// Checks that `name` is a DNS-1123 label: 1-63 characters, lower-case letters, digits and
/// `-`, starting and ending with a letter or digit. `what` names the field in the message.
pub fn validate_name(what: &str, name: &str) -> Result<(), ValidationError> {
    let hint =
        "use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit";
    if name.is_empty() {
        return Err(ValidationError::new(format!(
            "{what} name is empty: {hint}"
        )));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ValidationError::new(format!(
            "{what} name {name:?} is {} characters long: {hint}",
            name.len()
        )));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let bytes = name.as_bytes();
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !name.chars().all(ok_char) || !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1]) {
        return Err(ValidationError::new(format!(
            "{what} name {name:?} is not valid: {hint}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_labels() {
        for ok in ["a", "hello", "get-hello", "x1", "1x", &"a".repeat(63)] {
            validate_name("function", ok).unwrap();
        }
    }

    #[test]
    fn rejects_everything_else_with_a_hint() {
        for bad in [
            "",
            "Hello",
            "-a",
            "a-",
            "a_b",
            "a.b",
            "a b",
            &"a".repeat(64),
            "é",
        ] {
            let err = validate_name("function", bad).unwrap_err();
            assert!(err.message.contains("lower-case"), "{bad}: {err}");
        }
    }
}
