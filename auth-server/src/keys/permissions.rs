//! Who else can read a private key file: the signing keys (`keys.signing`,
//! `keys.publish`) and the TLS keys (`tls.key`, `http_tls.key`) are checked
//! each time they are read.
//!
//! - **Other users** can read or write it (`o+r` or `o+w`): refused, unless
//!   `keys.allow_readable_key_files = true`, which starts anyway with a
//!   warning. Such a file is readable by every account on the host; the
//!   fix is one `chmod`, or one `defaultMode` in a Kubernetes Secret
//!   volume (whose default, 0644, is exactly this).
//! - **Its group** can read or write it, and the server does not run with
//!   that group: a warning naming the file, its mode and the `chmod` that
//!   fixes it. Group access by the server's own group is what a Kubernetes
//!   Secret volume with `defaultMode: 0440` and the pod's `fsGroup` gives
//!   (the files belong to root, so the server reads them through its
//!   group), and what a host install with a dedicated group does: that is
//!   not reported.
//!
//! The server's groups come from `/proc/self/status`; where that cannot be
//! read, every group counts as foreign (a warning, never a refusal).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// What the check found acceptable but worth a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFileWarning(pub String);

impl std::fmt::Display for KeyFileWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks private key file `path`, named `key` (its config key) in
/// messages. `Err` (a message naming the file, its mode and the fix): other
/// users can read or write it and `allow_readable` is off. `Ok(Some(_))`:
/// start, and log the warning. A file that cannot be read at all is left to
/// the reader's own error.
pub fn check_key_file(key: &str, path: &Path, allow_readable: bool) -> Result<Option<KeyFileWarning>, String> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok(None) };
    judge(key, path, meta.mode(), meta.gid(), &own_groups(), allow_readable)
}

/// The decision of [`check_key_file`] for a file of `mode` and group `gid`,
/// read by a process with groups `own`.
fn judge(
    key: &str,
    path: &Path,
    mode: u32,
    gid: u32,
    own: &[u32],
    allow_readable: bool,
) -> Result<Option<KeyFileWarning>, String> {
    let mode = mode & 0o7777;
    let shown = path.display();
    if mode & 0o006 != 0 {
        let problem = format!(
            "{key}: {shown} has mode {mode:04o}: other users can read or write this private key. Fix: \
             `chmod 600 {shown}` (owned by the server's user), or `chmod 640` with the server's own group; in \
             Kubernetes, set the Secret volume's `defaultMode: 0440` with the pod's `fsGroup`"
        );
        return if allow_readable {
            Ok(Some(KeyFileWarning(format!("{problem} (starting anyway: keys.allow_readable_key_files = true)"))))
        } else {
            Err(format!("{problem}; or set keys.allow_readable_key_files = true to start anyway"))
        };
    }
    if mode & 0o060 != 0 && !own.contains(&gid) {
        return Ok(Some(KeyFileWarning(format!(
            "{key}: {shown} has mode {mode:04o} and group {gid}, which this server does not run with: members of \
             that group can read this private key. Fix: `chmod 600 {shown}`, or give the file the server's own group"
        ))));
    }
    Ok(None)
}

/// The group ids this process runs with (real, effective, saved,
/// filesystem and supplementary), from `/proc/self/status`; empty where
/// that cannot be read.
fn own_groups() -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return Vec::new() };
    status
        .lines()
        .filter_map(|line| line.strip_prefix("Gid:").or_else(|| line.strip_prefix("Groups:")))
        .flat_map(str::split_whitespace)
        .filter_map(|id| id.parse().ok())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn key_with_mode(dir: &Path, mode: u32) -> std::path::PathBuf {
        let path = dir.join(format!("key-{mode:o}.pem"));
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_key_other_users_can_read_is_refused_naming_file_mode_and_fix_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o604, 0o602] {
            let path = key_with_mode(dir.path(), mode);
            let err = check_key_file("tls.key", &path, false).unwrap_err();
            let shown = path.display().to_string();
            assert!(err.starts_with(&format!("tls.key: {shown} has mode 0{mode:o}")), "{err}");
            assert!(err.contains(&format!("chmod 600 {shown}")), "{err}");
            assert!(err.contains("defaultMode: 0440") && err.contains("keys.allow_readable_key_files"), "{err}");
            let warning = check_key_file("tls.key", &path, true).unwrap().unwrap();
            assert!(warning.0.contains("starting anyway"), "{warning}");
        }
    }

    #[test]
    fn owner_only_and_own_group_files_pass() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            assert_eq!(check_key_file("keys.signing.path", &key_with_mode(dir.path(), mode), false), Ok(None));
        }
        // The file gets this process's group: group access is the server's
        // own (the Kubernetes fsGroup layout).
        let own = key_with_mode(dir.path(), 0o640);
        assert!(own_groups().contains(&std::fs::metadata(&own).unwrap().gid()));
        assert_eq!(check_key_file("keys.signing.path", &own, false), Ok(None));
        assert_eq!(check_key_file("keys.signing.path", &key_with_mode(dir.path(), 0o440), false), Ok(None));
    }

    #[test]
    fn group_access_by_a_group_the_server_does_not_run_with_is_warned_about() {
        let path = Path::new("/etc/auth/signing.pem");
        let warning = judge("keys.signing.path", path, 0o100640, 50, &[1000, 27], false).unwrap().unwrap();
        assert_eq!(
            warning.0,
            "keys.signing.path: /etc/auth/signing.pem has mode 0640 and group 50, which this server does not run \
             with: members of that group can read this private key. Fix: `chmod 600 /etc/auth/signing.pem`, or \
             give the file the server's own group"
        );
        assert_eq!(judge("keys.signing.path", path, 0o640, 27, &[1000, 27], false), Ok(None));
        // Where the groups are unknown, group access is warned about, never refused.
        assert!(judge("tls.key", path, 0o440, 65532, &[], false).unwrap().is_some());
    }

    #[test]
    fn a_missing_file_is_left_to_the_reader() {
        assert_eq!(check_key_file("tls.key", Path::new("/nonexistent/key.pem"), false), Ok(None));
    }
}
