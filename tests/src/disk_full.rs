//! The disk-full fault: a small tmpfs the test mounts itself, filled to ENOSPC and freed.
//!
//! Needs root (CAP_SYS_ADMIN). The mount carries a source name unique to this process and
//! handle, and is unmounted on drop only if that very mount is still at the path, so no other
//! mount is ever touched.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

static NEXT: AtomicU64 = AtomicU64::new(0);

/// File name of the filler inside the mount.
const FILLER: &str = ".im-chaos-filler";

#[derive(Debug)]
pub struct FullDisk {
    dir: PathBuf,
    /// The tmpfs source name, unique per handle: how our mount is told from any other.
    source: String,
    created_dir: bool,
    mounted: bool,
}

fn cstring(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Other(format!("{} contains a NUL byte", p.display())))
}

impl FullDisk {
    /// Mounts a tmpfs of `size_bytes` at `dir`, creating it if missing. An existing `dir` must
    /// be empty, so nothing is hidden under the mount.
    pub fn mount(dir: &Path, size_bytes: u64) -> Result<FullDisk> {
        let created_dir = !dir.exists();
        if created_dir {
            std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        } else if std::fs::read_dir(dir)
            .ctx(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
        {
            return Err(Error::Other(format!(
                "{} is not empty: a tmpfs mounted there would hide its contents",
                dir.display()
            )));
        }
        let source = format!(
            "im-chaos-fill-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut disk = FullDisk {
            dir: dir.to_path_buf(),
            source,
            created_dir,
            mounted: false,
        };
        let target = cstring(dir)?;
        let src = CString::new(disk.source.as_str()).map_err(|e| Error::Other(e.to_string()))?;
        let fstype = c"tmpfs";
        let data = CString::new(format!("size={size_bytes},mode=0755"))
            .map_err(|e| Error::Other(e.to_string()))?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(Error::Io {
                context: format!(
                    "mounting a {size_bytes}-byte tmpfs at {} (needs root with CAP_SYS_ADMIN)",
                    dir.display()
                ),
                source: err,
            });
        }
        disk.mounted = true;
        Ok(disk)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a filler file until the filesystem reports ENOSPC; returns the bytes written.
    pub fn fill(&self) -> Result<u64> {
        let path = self.dir.join(FILLER);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        let chunk = vec![0u8; 1 << 20];
        let mut size = chunk.len();
        let mut written = 0u64;
        // Shrinking chunks fill the last partial page too, so any later write of data fails.
        while size > 0 {
            match file.write(&chunk[..size]) {
                Ok(0) => size /= 2,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => size /= 2,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Io {
                        context: format!("filling {}", path.display()),
                        source: e,
                    })
                }
            }
        }
        Ok(written)
    }

    /// Removes the filler: the space is free again.
    pub fn free(&self) -> Result<()> {
        let path = self.dir.join(FILLER);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                context: format!("removing {}", path.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// True while our tmpfs (by its unique source) is mounted at the path.
    pub fn is_mounted(&self) -> bool {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return false;
        };
        info.lines()
            .any(|l| mount_matches(l, &self.dir, &self.source))
    }

    /// Unmounts our tmpfs (only if it is still ours at the path) and removes the directory if
    /// it was created here.
    pub fn unmount(&mut self) -> Result<()> {
        if self.mounted && self.is_mounted() {
            let target = cstring(&self.dir)?;
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EBUSY) {
                    return Err(Error::Io {
                        context: format!("unmounting {}", self.dir.display()),
                        source: err,
                    });
                }
                // Still in use (an open file): detach; the kernel frees it when unused.
                // SAFETY: as above.
                if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                    return Err(Error::Io {
                        context: format!("detaching {}", self.dir.display()),
                        source: std::io::Error::last_os_error(),
                    });
                }
            }
        }
        self.mounted = false;
        if self.created_dir {
            self.created_dir = false;
            let _ = std::fs::remove_dir(&self.dir);
        }
        Ok(())
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!("disk-full fault: {e}");
        }
    }
}

/// mountinfo: `id parent major:minor root mountpoint options... - fstype source superopts`,
/// with spaces and the like in paths escaped as `\ooo`.
fn mount_matches(line: &str, dir: &Path, source: &str) -> bool {
    let mut halves = line.splitn(2, " - ");
    let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
        return false;
    };
    let mountpoint = left.split(' ').nth(4).map(unescape);
    let mut r = right.split(' ');
    let (fstype, src) = (r.next(), r.next());
    fstype == Some("tmpfs")
        && src == Some(source)
        && mountpoint.is_some_and(|m| Path::new(&m) == dir)
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::scratch_dir;

    fn write_file(path: &Path, bytes: usize) -> std::io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&vec![1u8; bytes])?;
        f.sync_all()
    }

    #[test]
    fn writes_fail_while_full_and_succeed_after_freeing() {
        let scratch = scratch_dir("disk-full").unwrap();
        let dir = scratch.path().join("data");
        let mut disk = FullDisk::mount(&dir, 8 << 20).unwrap();
        assert!(disk.is_mounted());

        write_file(&dir.join("before"), 4096).unwrap();
        let filled = disk.fill().unwrap();
        assert!(
            filled > 7 << 20 && filled <= 8 << 20,
            "filled {filled} bytes"
        );
        let err = write_file(&dir.join("during"), 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

        disk.free().unwrap();
        write_file(&dir.join("after"), 1 << 20).unwrap();

        disk.unmount().unwrap();
        assert!(!disk.is_mounted());
        assert!(
            !dir.exists(),
            "the directory this handle created is removed"
        );
    }

    #[test]
    fn drop_unmounts_only_its_own_mount() {
        let scratch = scratch_dir("disk-full-drop").unwrap();
        let dir = scratch.path().join("data");
        let disk = FullDisk::mount(&dir, 1 << 20).unwrap();
        let (path, source) = (disk.path().to_path_buf(), disk.source.clone());
        drop(disk);
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.lines().any(|l| mount_matches(l, &path, &source)));

        // A handle whose mount is not (or no longer) at the path leaves the path alone.
        let other = FullDisk::mount(&dir, 1 << 20).unwrap();
        let stranger = FullDisk {
            dir: dir.clone(),
            source: "im-chaos-fill-not-this-one".into(),
            created_dir: false,
            mounted: true,
        };
        drop(stranger);
        assert!(other.is_mounted(), "someone else's mount survives");
        drop(other);
    }

    #[test]
    fn refuses_a_non_empty_directory() {
        let scratch = scratch_dir("disk-full-nonempty").unwrap();
        std::fs::write(scratch.path().join("keep"), b"x").unwrap();
        let err = FullDisk::mount(scratch.path(), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    #[test]
    fn mountinfo_lines_are_matched_by_path_and_source() {
        let line = r"46 27 0:40 / /tmp/a\040b rw,relatime - tmpfs im-chaos-fill-1-0 rw,size=8192k";
        assert!(mount_matches(
            line,
            Path::new("/tmp/a b"),
            "im-chaos-fill-1-0"
        ));
        assert!(!mount_matches(
            line,
            Path::new("/tmp/a b"),
            "im-chaos-fill-1-1"
        ));
        assert!(!mount_matches(
            line,
            Path::new("/tmp/a"),
            "im-chaos-fill-1-0"
        ));
        let ext4 = "29 1 8:1 / / rw - ext4 /dev/sda1 rw";
        assert!(!mount_matches(ext4, Path::new("/"), "/dev/sda1"));
    }
}
