//! The operator's end-to-end environment, shared by the operator tests and the cutover bench:
//! a harness with the real `identitymesh-server` behind the operator's image, the operator as a
//! local process, an IdentityMeshCluster whose two pods share one SQLite file, and probes of
//! what clients see.

use std::path::{Path, PathBuf};
use std::time::Duration;

use identitymesh_test_support::net::free_port;

mod crd;
mod env;
mod https;
mod operator;
mod poller;
mod relay;
mod slices;
mod sqlite;

pub use crd::*;
pub use env::*;
pub use https::*;
pub use operator::*;
pub use poller::*;
pub use relay::*;
pub use slices::*;
pub use sqlite::*;

/// The operator's default image repository (spec.image.repository); the harness runs the
/// server binary for it.
pub const SERVER_IMAGE: &str = "identitymesh/server";
pub const CLUSTER: &str = "im";
/// Service port of the client Service (spec.service.port default).
pub const SERVICE_PORT: u16 = 443;
pub const CONTAINER: &str = "server";
/// Short on purpose: the bench measures against the targets with it.
pub const UNHEALTHY_AFTER_SECONDS: u32 = 2;

pub use identitymesh_contract::annotations::SWITCHOVER as SWITCHOVER_ANNOTATION;

/// Generous bound for anything the operator does by itself (timings are the bench's job).
pub const WAIT: Duration = Duration::from_secs(90);

/// One e2e run at a time: each starts a control plane and three node namespaces, and the host
/// has two cores shared with other work.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The operator tests log the harness's warnings only: their cutovers are many.
pub fn init_tracing() {
    crate::init_test_tracing("identitymesh_tests=warn");
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn crd_path() -> PathBuf {
    workspace_root().join("crds/identitymeshclusters.identitymesh.io.yaml")
}

/// A workspace binary next to this test executable (`<target>/<profile>/deps/x` →
/// `<target>/<profile>/<name>`): Cargo gives integration tests CARGO_BIN_EXE_* of their own
/// package only.
/// `IDENTITYMESH_BIN_DIR` overrides the directory (e.g. release tests against debug binaries).
pub fn workspace_bin(name: &str) -> PathBuf {
    let profile_dir = match std::env::var_os("IDENTITYMESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("test executable lives in <target>/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (with the same CARGO_TARGET_DIR and profile as the tests)",
        path.display()
    );
    path
}

fn need_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install it (apt-get install -y {name}); `cargo xtask test` should list it among its Debian packages")
}
