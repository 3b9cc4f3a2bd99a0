//! Checks of single fields: lengths, env, container paths, git options.

use std::collections::BTreeMap;

use super::{FieldError, limits};

/// Fails when `value` has more than `max` characters.
pub fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("longer than {max} characters"),
        ));
    }
    Ok(())
}

/// Env names are shell identifiers (`[A-Za-z_][A-Za-z0-9_]*`), values hold
/// no NUL, and the whole fits the count and size limits.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), FieldError> {
    if env.len() > limits::ENV_VARS {
        return Err(FieldError::new(
            "spec.env",
            format!("at most {} variables", limits::ENV_VARS),
        ));
    }
    let mut bytes = 0;
    for (k, v) in env {
        let ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(FieldError::new(
                "spec.env",
                format!("bad variable name `{k}`: use [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        if v.contains('\0') {
            return Err(FieldError::new(
                "spec.env",
                format!("`{k}` contains a NUL byte"),
            ));
        }
        bytes += k.len() + v.len();
    }
    if bytes > limits::ENV_BYTES {
        return Err(FieldError::new(
            "spec.env",
            format!("{bytes} bytes; the limit is {}", limits::ENV_BYTES),
        ));
    }
    Ok(())
}

/// A path inside the container: absolute, without `..` or NUL, not too long.
pub fn validate_path(field: &'static str, p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') || p.split('/').any(|seg| seg == "..") || p.contains('\0') {
        return Err(FieldError::new(
            field,
            format!("`{p}` must be an absolute path without `..`"),
        ));
    }
    check_len(field, p, limits::PATH_CHARS)
}

/// A git resource's URL and ref: neither may pass for a git option.
pub fn validate_git(
    url_field: &'static str,
    ref_field: &'static str,
    url: &str,
    git_ref: &str,
) -> Result<(), FieldError> {
    if url.is_empty() || url.starts_with('-') {
        return Err(FieldError::new(
            url_field,
            "must be a repository URL or path",
        ));
    }
    check_len(url_field, url, limits::GIT_URL_CHARS)?;
    if git_ref.starts_with('-') {
        return Err(FieldError::new(ref_field, "must not start with `-`"));
    }
    Ok(())
}
