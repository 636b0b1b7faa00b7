//! Mount paths and the rewriting of references to them.

use super::*;

/// A container's volume mounts: (mountPath, local path, readOnly).
fn mounts_of(c: &Container, volumes: &HashMap<String, PathBuf>) -> Vec<(String, PathBuf, bool)> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let base = volumes.get(&m.name)?;
            let local = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => base.join(sub),
                _ => base.clone(),
            };
            Some((m.mount_path.clone(), local, m.read_only == Some(true)))
        })
        .collect()
}

/// Windows-form mountPath → local path for one container, longest mountPath first: these
/// cannot exist on a Linux host, so references to them in env, args and workingDir are
/// rewritten to the local directory instead.
pub(super) fn container_mounts(
    c: &Container,
    volumes: &HashMap<String, PathBuf>,
) -> Vec<(String, PathBuf)> {
    let mut mounts: Vec<(String, PathBuf)> = mounts_of(c, volumes)
        .into_iter()
        .filter(|(p, _, _)| is_windows_path(p))
        .map(|(p, local, _)| (p, local))
        .collect();
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    mounts
}

/// Linux-form mounts as bind mounts at their real paths, parents before what is mounted
/// inside them, so the process finds them where the pod spec says (e.g. the service-account
/// token at /var/run/secrets/kubernetes.io/serviceaccount).
pub(super) fn linux_binds(
    c: &Container,
    volumes: &HashMap<String, PathBuf>,
) -> Vec<crate::process::Bind> {
    let mut binds: Vec<crate::process::Bind> = mounts_of(c, volumes)
        .into_iter()
        .filter(|(p, _, _)| !is_windows_path(p) && p.starts_with('/'))
        .map(|(p, local, read_only)| crate::process::Bind {
            source: local,
            target: PathBuf::from(p),
            read_only,
        })
        .collect();
    binds.sort_by_key(|b| b.target.components().count());
    binds
}

pub(super) fn is_windows_path(p: &str) -> bool {
    let b = p.as_bytes();
    p.contains('\\') || (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':')
}

/// Canonical form of a mount path for matching: Windows paths lower-cased with `/`
/// separators, trailing separators dropped.
pub(super) fn canonical_mount(p: &str) -> (String, bool) {
    let win = is_windows_path(p);
    let mut s = if win {
        p.replace('\\', "/").to_ascii_lowercase()
    } else {
        p.to_string()
    };
    while s.len() > 1 && s.ends_with('/') {
        s.pop();
    }
    (s, win)
}

/// Rewrites references to mount paths in `s`: the mount path becomes the local directory and
/// the rest of that path (up to whitespace, a quote, `;` or `,`) gets `/` separators.
/// An environment value: a `;`-separated list of Windows paths (a Windows PATH-style list, as
/// `IM_CONNECTORS__CSV_ROOTS` is for a Windows pod) becomes a `:`-separated list of local paths,
/// since the process reading it runs on Linux here; anything else as [`rewrite_paths`].
pub fn rewrite_env_value(v: &str, mounts: &[(String, PathBuf)]) -> String {
    let is_windows_path = |p: &str| {
        let b = p.as_bytes();
        b.len() >= 3 && b[0].is_ascii_alphabetic() && b[1] == b':' && matches!(b[2], b'\\' | b'/')
    };
    if v.contains(';') && v.split(';').all(is_windows_path) {
        return v
            .split(';')
            .map(|p| rewrite_paths(p, mounts))
            .collect::<Vec<_>>()
            .join(":");
    }
    rewrite_paths(v, mounts)
}

pub fn rewrite_paths(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let canon: Vec<(String, bool, String)> = mounts
        .iter()
        .map(|(m, local)| {
            let (c, win) = canonical_mount(m);
            (c, win, local.display().to_string())
        })
        .collect();
    let bytes = s.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < bytes.len() {
        for (m, win, local) in &canon {
            let mb = m.as_bytes();
            if i + mb.len() > bytes.len() {
                continue;
            }
            let matches = bytes[i..i + mb.len()].iter().zip(mb).all(|(a, b)| {
                if *win {
                    let a = if *a == b'\\' {
                        b'/'
                    } else {
                        a.to_ascii_lowercase()
                    };
                    a == *b
                } else {
                    a == b
                }
            });
            let end = i + mb.len();
            let boundary = end == bytes.len()
                || matches!(bytes[end], b'/' | b'\\')
                || is_delimiter(bytes[end]);
            if matches && boundary {
                out.extend_from_slice(local.as_bytes());
                let mut j = end;
                while j < bytes.len() && !is_delimiter(bytes[j]) {
                    out.push(if bytes[j] == b'\\' { b'/' } else { bytes[j] });
                    j += 1;
                }
                i = j;
                continue 'outer;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_string())
}

pub(super) fn is_delimiter(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b';' | b',')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_paths_are_bind_mounted_and_windows_paths_rewritten() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "volumeMounts": [
                {"name": "sa", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                {"name": "cfg", "mountPath": "/etc/app"},
                {"name": "cfg", "mountPath": "/etc/app/extra/one.toml", "subPath": "one.toml"},
                {"name": "tls", "mountPath": "C:\\identitymesh\\tls"},
                {"name": "missing", "mountPath": "/nowhere"}
            ]
        }))
        .unwrap();
        let volumes: HashMap<String, PathBuf> = [
            ("sa", "/p/volumes/sa"),
            ("cfg", "/p/volumes/cfg"),
            ("tls", "/p/volumes/tls"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
        .collect();
        assert_eq!(
            container_mounts(&c, &volumes),
            vec![(
                "C:\\identitymesh\\tls".to_string(),
                PathBuf::from("/p/volumes/tls")
            )],
            "only the Windows path is rewritten"
        );
        let binds = linux_binds(&c, &volumes);
        let got: Vec<(&str, &str, bool)> = binds
            .iter()
            .map(|b| {
                (
                    b.target.to_str().unwrap(),
                    b.source.to_str().unwrap(),
                    b.read_only,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("/etc/app", "/p/volumes/cfg", false),
                ("/etc/app/extra/one.toml", "/p/volumes/cfg/one.toml", false),
                (
                    "/var/run/secrets/kubernetes.io/serviceaccount",
                    "/p/volumes/sa",
                    true
                ),
            ],
            "parents first; a volume the pod does not declare is not mounted"
        );
    }

    #[test]
    fn a_windows_path_list_becomes_a_local_one() {
        let mounts = vec![
            (
                "C:\\identitymesh\\drop\\hr".to_string(),
                PathBuf::from("/run/p/volumes/hr"),
            ),
            (
                "C:\\identitymesh\\drop\\it".to_string(),
                PathBuf::from("/run/p/volumes/it"),
            ),
        ];
        let v = "C:\\identitymesh\\drop\\hr;C:\\identitymesh\\drop\\it";
        assert_eq!(
            rewrite_env_value(v, &mounts),
            "/run/p/volumes/hr:/run/p/volumes/it"
        );
        let split: Vec<_> = std::env::split_paths(&rewrite_env_value(v, &mounts)).collect();
        assert_eq!(split.len(), 2);
        // Not a path list: unchanged apart from the mounts.
        assert_eq!(rewrite_env_value("a;b", &mounts), "a;b");
    }

    #[test]
    fn rewrites_windows_and_linux_mount_paths() {
        let mounts = vec![
            (
                "C:\\identitymesh\\tls".to_string(),
                PathBuf::from("/run/p/volumes/tls"),
            ),
            ("/etc/cfg".to_string(), PathBuf::from("/run/p/volumes/cfg")),
        ];
        assert_eq!(
            rewrite_paths("--cert=C:\\identitymesh\\tls\\tls.crt --x", &mounts),
            "--cert=/run/p/volumes/tls/tls.crt --x"
        );
        assert_eq!(
            rewrite_paths("c:/IdentityMesh/TLS/ca.crt", &mounts),
            "/run/p/volumes/tls/ca.crt"
        );
        assert_eq!(
            rewrite_paths("/etc/cfg/a.toml;/etc/cfgx", &mounts),
            "/run/p/volumes/cfg/a.toml;/etc/cfgx"
        );
        assert_eq!(rewrite_paths("nothing here", &mounts), "nothing here");
    }
}
