//! Wire validation: size limits on what a request carries, checked by the
//! handlers before any flow runs.

use crate::error::AuthError;

/// Largest accepted string field (bytes).
pub const MAX_FIELD_BYTES: usize = 8 * 1024;
/// Largest accepted list (scopes).
pub const MAX_LIST_LEN: usize = 64;
/// Most audiences one Login may ask for (as the proto says).
pub const MAX_LOGIN_AUDIENCES: usize = 16;
/// Largest accepted list item (bytes).
pub const MAX_ITEM_BYTES: usize = 256;

/// Checks a string field's size.
pub(crate) fn check_field(value: &str, what: &'static str) -> Result<(), AuthError> {
    if value.len() > MAX_FIELD_BYTES { Err(AuthError::InvalidArgument(what)) } else { Ok(()) }
}

/// Checks a list's length (at most [`MAX_LIST_LEN`]) and each item's size.
pub(crate) fn check_list(values: &[String], what: &'static str) -> Result<(), AuthError> {
    check_list_of(values, MAX_LIST_LEN, what)
}

/// Checks a list's length (at most `max`) and each item's size.
pub(crate) fn check_list_of(values: &[String], max: usize, what: &'static str) -> Result<(), AuthError> {
    if values.len() > max || values.iter().any(|v| v.is_empty() || v.len() > MAX_ITEM_BYTES) {
        Err(AuthError::InvalidArgument(what))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_bounded() {
        assert!(check_field(&"a".repeat(MAX_FIELD_BYTES), "f").is_ok());
        assert!(matches!(check_field(&"a".repeat(MAX_FIELD_BYTES + 1), "f"), Err(AuthError::InvalidArgument("f"))));
    }

    #[test]
    fn lists_are_bounded_and_hold_no_empty_or_huge_items() {
        let ok: Vec<String> = (0..MAX_LIST_LEN).map(|i| i.to_string()).collect();
        assert!(check_list(&ok, "l").is_ok());
        let long: Vec<String> = (0..=MAX_LIST_LEN).map(|i| i.to_string()).collect();
        assert!(check_list(&long, "l").is_err());
        assert!(check_list(&[String::new()], "l").is_err());
        assert!(check_list(&["a".repeat(MAX_ITEM_BYTES + 1)], "l").is_err());
        let audiences: Vec<String> = (0..=MAX_LOGIN_AUDIENCES).map(|i| i.to_string()).collect();
        assert!(check_list_of(&audiences[..MAX_LOGIN_AUDIENCES], MAX_LOGIN_AUDIENCES, "a").is_ok());
        assert!(check_list_of(&audiences, MAX_LOGIN_AUDIENCES, "a").is_err());
    }
}
