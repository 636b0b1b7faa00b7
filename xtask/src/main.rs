//! Project tasks: `cargo xtask <tools|cluster up|test|bench-harness>`.

mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// Debian packages the tests need: (command or file that proves it is there, package).
/// Append here when a test needs another real peer (e.g. slapd).
const APT_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("sqlite3", "sqlite3"),
    ("slapd", "slapd"),
    ("ldapsearch", "ldap-utils"),
    // The Keycloak fixture (crates/test-support): fetched with mvn, unpacked with unzip.
    ("mvn", "maven"),
    ("unzip", "unzip"),
    // The browser tests (crates/test-support/src/browser.rs): Debian's chromium, headless,
    // driven from node by playwright-core (which never downloads a browser).
    ("chromium", "chromium"),
    ("node", "nodejs"),
    ("npm", "npm"),
];

/// Folders (relative to the workspace root) whose npm dependencies the tests need; `npm ci` (or
/// `npm install` without a lockfile) runs in each that exists.
const NPM_DIRS: &[&str] = &["crates/signalr/interop", "tests/browser"];

#[derive(Parser)]
#[command(about = "IdentityMesh project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build (or confirm cached) etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
    /// kubectl and helm under ~/.cache/identitymesh/k8s/<version>/bin.
    Tools {
        /// Rebuild even when the stamp says the tools are up to date.
        #[arg(long)]
        force: bool,
    },
    /// Start or manage a harness cluster for manual use.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// The project test command: system packages, npm packages, tools, then
    /// `cargo test --workspace --no-fail-fast [ARGS]` (benches are compiled, not run).
    Test {
        /// Passed to `cargo test` (e.g. `-- --nocapture`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Print harness figures: tools build time, warm start time, control-plane memory.
    BenchHarness,
    /// A fault campaign on the harness (tests/tests/chaos_campaign.rs) with this seed and
    /// number of faults; it prints the schedule, the report and, on a violation, the history
    /// excerpt. The test command runs the default campaign.
    Chaos {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        faults: usize,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Start a harness (2 windows nodes by default), print the kubeconfig path, run until Ctrl-C.
    Up {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    // xtask/ is one level below the workspace root. `cargo run` says where the manifest is at
    // run time; the compile-time path is only a fallback, because a binary reused from a shared
    // target directory may have been built from another checkout.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn package_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn on_path(cmd: &str) -> bool {
    let extra = ["/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(extra)
        .any(|d| d.join(cmd).is_file())
}

fn ensure_apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(probe, pkg)| !on_path(probe) && !package_installed(pkg))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    let mut update = Command::new("apt-get");
    update.arg("update");
    run(update, "apt-get update")?;
    // Daemons such as slapd must not start as system services on install: the tests start
    // their own on loopback ports. policy-rc.d exit 101 is Debian's "do not start" (kept if
    // the machine already has one).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    let r = run(install, "apt-get install");
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn ensure_npm(root: &Path) -> Result<()> {
    for dir in NPM_DIRS {
        let dir = root.join(dir);
        if !dir.join("package.json").is_file() {
            continue;
        }
        let mut cmd = Command::new("npm");
        let verb = if dir.join("package-lock.json").is_file() {
            "ci"
        } else {
            "install"
        };
        cmd.arg(verb).current_dir(&dir);
        run(cmd, &format!("npm {verb} in {}", dir.display()))?;
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.cmd {
        Cmd::Tools { force } => {
            tools::ensure(&root, force)?;
        }
        Cmd::Cluster {
            cmd: ClusterCmd::Up { args },
        } => {
            ensure_apt_packages()?;
            let bin = tools::ensure(&root, false)?;
            let mut cmd = cargo();
            cmd.args([
                "run",
                "--quiet",
                "-p",
                "identitymesh-tests",
                "--bin",
                "im-cluster",
                "--",
            ])
            .args(args)
            .env(tools::BIN_DIR_ENV, bin)
            .current_dir(&root);
            run(cmd, "im-cluster")?;
        }
        Cmd::Test { args } => {
            ensure_apt_packages()?;
            ensure_npm(&root)?;
            let bin = tools::ensure(&root, false)?;
            // End-to-end tests run other packages' binaries (the server, the operator) from the
            // target dir; `cargo test` builds only the binaries of packages with integration tests.
            let mut build = cargo();
            // Benches are built too, so a broken bench fails here, but they are run only by
            // `cargo bench` / `cargo xtask bench-harness`: in debug they take minutes.
            build
                .args(["build", "--workspace", "--bins", "--benches"])
                .current_dir(&root);
            run(build, "cargo build --workspace --bins --benches")?;
            let mut cmd = cargo();
            // --no-fail-fast: one failing test binary must not hide the results of the others.
            // `cargo xtask test -p X` narrows to package X instead of the whole workspace.
            let narrowed = args
                .iter()
                .take_while(|a| *a != "--")
                .any(|a| a == "-p" || a == "--package" || a.starts_with("--package="));
            cmd.arg("test");
            if !narrowed {
                cmd.arg("--workspace");
            }
            cmd.arg("--no-fail-fast")
                .args(args)
                .env(tools::BIN_DIR_ENV, bin)
                .current_dir(&root);
            run(cmd, "cargo test")?;
        }
        Cmd::Chaos { seed, faults } => {
            if faults == 0 {
                bail!("--faults must be at least 1");
            }
            ensure_apt_packages()?;
            let bin = tools::ensure(&root, false)?;
            let mut build = cargo();
            build
                .args(["build", "--workspace", "--bins"])
                .current_dir(&root);
            run(build, "cargo build --workspace --bins")?;
            let mut cmd = cargo();
            cmd.args([
                "test",
                "-p",
                "identitymesh-tests",
                "--test",
                "chaos_campaign",
                "--",
                "--nocapture",
            ])
            .env("IM_CHAOS_SEED", seed.to_string())
            .env("IM_CHAOS_FAULTS", faults.to_string())
            .env(tools::BIN_DIR_ENV, bin)
            .current_dir(&root);
            run(cmd, "the fault campaign")?;
        }
        Cmd::BenchHarness => {
            ensure_apt_packages()?;
            let bin = tools::ensure(&root, false)?;
            let mut cmd = cargo();
            cmd.args([
                "bench",
                "-p",
                "identitymesh-tests",
                "--bench",
                "controlplane",
            ])
            .env(tools::BIN_DIR_ENV, bin)
            .current_dir(&root);
            run(cmd, "cargo bench")?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
