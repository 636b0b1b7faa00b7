//! Drop-folder roots: the folders a CSV connector may read from. A connector's folder, and
//! every file it reads, must resolve (after following symlinks) inside one of them, so a
//! connector cannot be pointed at the server's own files (its token, key ring or `/proc`).

use std::path::{Component, Path, PathBuf};

/// The allowed roots, resolved once. Roots that do not exist are kept as given (nothing can
/// resolve inside them until they do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropRoots {
    roots: Vec<PathBuf>,
    /// Where the roots are configured, for messages; None: the server's setting.
    origin: Option<Origin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    /// E.g. "the relay setting csv_roots in relay.toml".
    setting: String,
    /// E.g. "this relay".
    host: String,
}

impl DropRoots {
    pub fn new(roots: &[PathBuf]) -> Self {
        let roots = roots
            .iter()
            .map(|r| std::fs::canonicalize(r).unwrap_or_else(|_| r.clone()))
            .collect();
        Self {
            roots,
            origin: None,
        }
    }

    /// Names another place the roots come from in messages (the server's setting otherwise):
    /// `setting` says how to change them, `host` what runs the connectors ("this relay").
    pub fn configured_by(mut self, setting: &str, host: &str) -> Self {
        self.origin = Some(Origin {
            setting: setting.into(),
            host: host.into(),
        });
        self
    }

    fn setting(&self) -> &str {
        self.origin
            .as_ref()
            .map_or("the server setting connectors.csv_roots", |o| &o.setting)
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The roots as error messages list them.
    pub fn describe(&self) -> String {
        if self.roots.is_empty() {
            let host = self.origin.as_ref().map_or("this server", |o| &o.host);
            return format!("none (CSV connectors are disabled on {host})");
        }
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Where `folder` really is, if that is inside a root. A relative folder is taken inside
    /// the first root. A folder that does not exist yet is resolved through its nearest
    /// existing ancestor, so it can be created after the connector is saved.
    pub fn resolve(&self, folder: &Path) -> Result<PathBuf, String> {
        let refuse = |why: &str| {
            Err(format!(
                "{} {why}; CSV drop folders must be inside one of the allowed roots: {} \
                 ({})",
                folder.display(),
                self.describe(),
                self.setting()
            ))
        };
        let Some(first) = self.roots.first() else {
            return refuse("cannot be read");
        };
        if folder.components().any(|c| c == Component::ParentDir) {
            return refuse("contains '..'");
        }
        let joined = if folder.is_absolute() {
            folder.to_path_buf()
        } else {
            first.join(folder)
        };
        let resolved = resolve_existing_prefix(&joined);
        if self.contains_resolved(&resolved) {
            Ok(resolved)
        } else {
            refuse("resolves outside them")
        }
    }

    /// Whether an existing `path` (a file about to be read) is inside a root once resolved.
    pub fn contains(&self, path: &Path) -> bool {
        self.confine(path).is_some()
    }

    /// Where an existing `path` really is (symlinks followed), if that is inside a root: the
    /// path to open, so what is read is what was checked.
    pub fn confine(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path)
            .ok()
            .filter(|p| self.contains_resolved(p))
    }

    fn contains_resolved(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }
}

/// `path` with its longest existing prefix canonicalised (symlinks followed) and the rest
/// appended as written (it has no `..`, checked by the caller).
fn resolve_existing_prefix(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path.to_path_buf();
    loop {
        if let Ok(real) = std::fs::canonicalize(&cur) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (cur.file_name().map(|n| n.to_os_string()), cur.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                cur = parent.to_path_buf();
            }
            // Nothing of it exists (not even the filesystem root): keep it as written.
            _ => return path.to_path_buf(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        roots: DropRoots,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("drop");
        let outside = dir.path().join("data");
        std::fs::create_dir_all(root.join("hr")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("admin.token"), "imb_secret").unwrap();
        let roots = DropRoots::new(std::slice::from_ref(&root));
        let root = std::fs::canonicalize(&root).unwrap();
        Fixture {
            _dir: dir,
            root,
            outside,
            roots,
        }
    }

    #[test]
    fn folders_inside_a_root_resolve() {
        let f = fixture();
        assert_eq!(
            f.roots.resolve(&f.root.join("hr")).unwrap(),
            f.root.join("hr")
        );
        assert_eq!(f.roots.resolve(Path::new("hr")).unwrap(), f.root.join("hr"));
        assert_eq!(f.roots.resolve(&f.root).unwrap(), f.root);
        // Not created yet: resolved through the existing part.
        assert_eq!(
            f.roots.resolve(&f.root.join("later/x")).unwrap(),
            f.root.join("later/x")
        );
    }

    #[cfg(unix)]
    #[test]
    fn escapes_are_refused_naming_the_roots() {
        let f = fixture();
        std::os::unix::fs::symlink(&f.outside, f.root.join("link")).unwrap();
        let cases = [
            f.outside.clone(),
            f.root.join("../data"),
            PathBuf::from("../data"),
            f.root.join("link"),
            f.root.join("link/sub"),
            PathBuf::from("/proc/self"),
        ];
        for folder in cases {
            let e = f.roots.resolve(&folder).unwrap_err();
            assert!(
                e.contains(&f.root.display().to_string()) && e.contains("csv_roots"),
                "{folder:?}: {e}"
            );
        }
    }

    #[test]
    fn no_roots_means_no_csv_folders() {
        let e = DropRoots::new(&[])
            .resolve(Path::new("/srv/drop"))
            .unwrap_err();
        assert!(e.contains("disabled"), "{e}");
        assert!(
            e.contains("this server") && e.contains("connectors.csv_roots"),
            "{e}"
        );
    }

    #[test]
    fn messages_name_where_the_roots_are_configured() {
        let setting = "the relay setting csv_roots in relay.toml";
        let e = DropRoots::new(&[])
            .configured_by(setting, "this relay")
            .resolve(Path::new("/srv/drop"))
            .unwrap_err();
        assert!(
            e.contains("disabled on this relay") && e.contains(setting),
            "{e}"
        );
        assert!(!e.contains("connectors.csv_roots"), "{e}");
        let f = fixture();
        let e = f
            .roots
            .clone()
            .configured_by(setting, "this relay")
            .resolve(&f.outside)
            .unwrap_err();
        assert!(
            e.contains(setting) && e.contains(&f.root.display().to_string()),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_file_linking_out_of_the_root_is_not_contained() {
        let f = fixture();
        std::fs::write(f.root.join("hr/a.csv"), "id\n1\n").unwrap();
        std::os::unix::fs::symlink(f.outside.join("admin.token"), f.root.join("hr/b.csv")).unwrap();
        assert!(f.roots.contains(&f.root.join("hr/a.csv")));
        assert!(!f.roots.contains(&f.root.join("hr/b.csv")));
        assert!(!f.roots.contains(&f.outside.join("admin.token")));
    }
}
