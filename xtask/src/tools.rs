//! `cargo xtask tools`: builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! kubectl and helm from their Go modules (through the consumer modules in tests/controlplane)
//! into `~/.cache/identitymesh/k8s/<kubernetes version>/bin`. Idempotent: a stamp of the inputs
//! (versions, go.mod/go.sum, flags) skips the build when nothing changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub const BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "helm",
];

/// Environment variable through which tests find the tools (read by the harness).
pub const BIN_DIR_ENV: &str = "IDENTITYMESH_K8S_BIN";

pub struct Versions {
    pub kubernetes: String,
    pub etcd: String,
    pub helm: String,
}

pub fn controlplane_dir(root: &Path) -> PathBuf {
    root.join("tests/controlplane")
}

pub fn read_versions(root: &Path) -> Result<Versions> {
    let path = controlplane_dir(root).join("versions.env");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let map: BTreeMap<String, String> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |k: &str| {
        map.get(k)
            .cloned()
            .with_context(|| format!("{} lacks {k}=", path.display()))
    };
    Ok(Versions {
        kubernetes: get("KUBERNETES")?,
        etcd: get("ETCD")?,
        helm: get("HELM")?,
    })
}

pub fn cache_dir(v: &Versions) -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home)
        .join(".cache/identitymesh/k8s")
        .join(&v.kubernetes)
}

pub fn bin_dir(v: &Versions) -> PathBuf {
    cache_dir(v).join("bin")
}

fn go() -> Result<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/local/go/bin")])
    {
        let p = dir.join("go");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "the `go` command is not installed (needed to build the control plane); install Go >= 1.26 (etcd v3.6.16 and helm v3.22.0 need it)"
    )
}

/// The staging modules k8s.io/kubernetes replaces with ./staging/..., from its own go.mod.
fn upstream_staging_modules(go: &Path, dir: &Path, version: &str) -> Result<Vec<String>> {
    let out = Command::new(go)
        .args([
            "mod",
            "download",
            "-json",
            &format!("k8s.io/kubernetes@{version}"),
        ])
        .current_dir(dir)
        .output()
        .context("run go mod download")?;
    if !out.status.success() {
        bail!(
            "go mod download k8s.io/kubernetes@{version} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parse go mod download output")?;
    let gomod = info["GoMod"]
        .as_str()
        .context("go mod download gave no GoMod path")?;
    let text = std::fs::read_to_string(gomod).with_context(|| format!("read {gomod}"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (from, to) = l.trim().split_once("=>")?;
            to.trim()
                .starts_with("./staging/")
                .then(|| from.trim().to_string())
        })
        .collect())
}

/// Fails unless tests/controlplane/kubernetes/go.mod replaces every staging module with the
/// published v0.<minor>.<patch>; prints the lines to paste when it does not.
fn check_replaces(go: &Path, dir: &Path, version: &str) -> Result<()> {
    let staging_version = format!("v0.{}", version.trim_start_matches("v1."));
    let ours = std::fs::read_to_string(dir.join("go.mod")).context("read kubernetes go.mod")?;
    let missing: Vec<String> = upstream_staging_modules(go, dir, version)?
        .into_iter()
        .map(|m| format!("\t{m} => {m} {staging_version}"))
        .filter(|line| !ours.contains(line.trim_start()))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{}/go.mod does not replace every staging module of k8s.io/kubernetes@{version}; add to its replace block:\n{}",
            dir.display(),
            missing.join("\n")
        );
    }
    if !ours.contains(&format!("k8s.io/kubernetes {version}")) {
        bail!(
            "{}/go.mod does not require k8s.io/kubernetes {version} (versions.env says so)",
            dir.display()
        );
    }
    Ok(())
}

struct Build {
    dir: &'static str,
    packages: Vec<String>,
    ldflags: String,
    /// `-o` target: a file for one package, the bin dir for several.
    output: Option<&'static str>,
}

fn builds(v: &Versions) -> Vec<Build> {
    let minor = v
        .kubernetes
        .trim_start_matches('v')
        .split('.')
        .nth(1)
        .unwrap_or("0")
        .to_string();
    let mut k8s = String::from("-s -w");
    for pkg in [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ] {
        k8s.push_str(&format!(
            " -X {pkg}.gitVersion={} -X {pkg}.gitMajor=1 -X {pkg}.gitMinor={minor} -X {pkg}.gitTreeState=clean",
            v.kubernetes
        ));
    }
    vec![
        Build {
            dir: "etcd",
            packages: vec!["go.etcd.io/etcd/server/v3".into()],
            ldflags: format!("-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA={}", v.etcd),
            output: Some("etcd"),
        },
        Build {
            dir: "kubernetes",
            packages: [
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kubectl",
            ]
            .iter()
            .map(|c| format!("k8s.io/kubernetes/cmd/{c}"))
            .collect(),
            ldflags: k8s,
            output: None,
        },
        Build {
            dir: "helm",
            packages: vec!["helm.sh/helm/v3/cmd/helm".into()],
            ldflags: format!(
                "-s -w -X helm.sh/helm/v3/internal/version.version={} -X helm.sh/helm/v3/internal/version.gitTreeState=clean",
                v.helm
            ),
            output: Some("helm"),
        },
    ]
}

/// Everything that should trigger a rebuild when it changes.
fn stamp(root: &Path, v: &Versions) -> Result<String> {
    let cp = controlplane_dir(root);
    let mut s = format!("{} {} {}\n", v.kubernetes, v.etcd, v.helm);
    for b in builds(v) {
        s.push_str(&format!("{} {:?} {}\n", b.dir, b.packages, b.ldflags));
        for f in ["go.mod", "go.sum"] {
            let p = cp.join(b.dir).join(f);
            s.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    // A short digest keeps the stamp file readable.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    Ok(format!("{h:016x}"))
}

/// Builds the tools when needed; returns the bin dir.
pub fn ensure(root: &Path, force: bool) -> Result<PathBuf> {
    let v = read_versions(root)?;
    let bin = bin_dir(&v);
    let stamp_file = bin.join(".stamp");
    let want = stamp(root, &v)?;
    let have = std::fs::read_to_string(&stamp_file).unwrap_or_default();
    let complete = BINARIES.iter().all(|b| bin.join(b).is_file());
    if !force && complete && have.trim() == want {
        println!("xtask tools: up to date in {}", bin.display());
        return Ok(bin);
    }
    std::fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    let go = go()?;
    let cp = controlplane_dir(root);
    check_replaces(&go, &cp.join("kubernetes"), &v.kubernetes)?;
    let started = Instant::now();
    for b in builds(&v) {
        let dir = cp.join(b.dir);
        let out = match b.output {
            Some(name) => bin.join(name),
            None => bin.clone(),
        };
        println!(
            "xtask tools: go build {} (in {})",
            b.packages.join(" "),
            dir.display()
        );
        let t = Instant::now();
        let status = Command::new(&go)
            .arg("build")
            .arg("-trimpath")
            .arg(format!("-ldflags={}", b.ldflags))
            .arg("-o")
            .arg(&out)
            .args(&b.packages)
            .current_dir(&dir)
            // go.sum is generated: let the go command complete it.
            .env("GOFLAGS", "-mod=mod")
            .status()
            .context("run go build")?;
        if !status.success() {
            bail!(
                "go build in {} failed ({status}); see the errors above",
                dir.display()
            );
        }
        println!("xtask tools:   done in {:.0}s", t.elapsed().as_secs_f64());
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "xtask tools: built all tools in {secs:.0}s into {}",
        bin.display()
    );
    // The bench prints this; "cold" is only true when the Go build cache held none of it, which
    // the first build on a machine is, so keep the first figure and add the latest.
    let record = cache_dir(&v).join("build-time.json");
    let mut doc: serde_json::Value = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|v: &serde_json::Value| v.is_object())
        .unwrap_or_else(|| serde_json::json!({ "first_build_seconds": secs }));
    doc["last_build_seconds"] = serde_json::json!(secs);
    std::fs::write(&record, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("write {}", record.display()))?;
    std::fs::write(&stamp_file, want).with_context(|| format!("write {}", stamp_file.display()))?;
    for b in BINARIES {
        if !bin.join(b).is_file() {
            bail!("{b} missing from {} after the build", bin.display());
        }
    }
    Ok(bin)
}
