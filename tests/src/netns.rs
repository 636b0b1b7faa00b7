//! Per-node network namespaces.
//!
//! A harness instance claims a *slot* `s` (0..=255) by holding an exclusive `flock` on
//! `/run/identitymesh-harness/slot-<s>.lock`; the kernel drops the lock when the owner dies, so a
//! free slot whose namespaces still exist belongs to a crashed run and is cleaned up on claim.
//! Node `j` of slot `s` gets namespace `im-<s>-<node>`, a veth pair `imh<s>x<j>` (host,
//! 10.201.s.(4j+1)/30) and `imn<s>x<j>` (namespace, 10.201.s.(4j+2)/30). The namespaces have no
//! default route, and the host gets an `unreachable 10.201.s.0/24` route so that traffic to a
//! node whose link is cut fails instead of leaving through the default route.
//!
//! Each node also has a Service namespace `im-<s>-<node>-svc`, joined to the node's by a veth
//! pair `ims<s>x<j>` (node side, 10.202.s.(4j+1)/30) and `imp<s>x<j>` (10.202.s.(4j+2)/30):
//! the node routes the service CIDR there, where every ClusterIP is local and the Service proxy
//! listens. So pods reach Services by ClusterIP and port, as through kube-proxy's rules, while
//! no Service port is taken in the node's own namespace (where pods bind 0.0.0.0).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::tools::ip_command;

const LOCK_DIR: &str = "/run/identitymesh-harness";
const NETNS_DIR: &str = "/var/run/netns";
/// The apiserver's --service-cluster-ip-range.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The `kubernetes` Service's ClusterIP: the first address of [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";
/// Nodes per slot: each takes a /30 of the slot's /24.
pub const MAX_NODES: usize = 64;

/// One node's namespace and addresses.
#[derive(Debug, Clone)]
pub struct NodeNet {
    pub node: String,
    pub netns: String,
    /// The node's Service namespace (ClusterIP listeners).
    pub svc_netns: String,
    pub host_veth: String,
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
}

impl NodeNet {
    /// The namespace file, for `setns`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.netns)
    }

    /// The Service namespace file, for binding ClusterIP listeners.
    pub fn svc_netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.svc_netns)
    }
}

/// A claimed slot and the namespaces created in it; removed on drop.
#[derive(Debug)]
pub struct Network {
    pub slot: u8,
    pub nodes: Vec<NodeNet>,
    ip: PathBuf,
    _lock: File,
}

fn run_ip(ip: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(ip)
        .args(args)
        .output()
        .ctx(|| format!("run {} {}", ip.display(), args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            command: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn try_lock(path: &Path) -> Result<Option<File>> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a valid fd.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Ok(None);
    }
    // The pid is informational (the lock is what proves ownership).
    file.set_len(0).ok();
    writeln!(file, "{}", std::process::id()).ok();
    Ok(Some(file))
}

impl Network {
    /// Claims a free slot and creates one namespace per node name.
    pub fn create(node_names: &[String]) -> Result<Network> {
        if node_names.len() > MAX_NODES {
            return Err(Error::Other(format!(
                "at most {MAX_NODES} nodes per harness, asked for {}",
                node_names.len()
            )));
        }
        let ip = ip_command()?;
        std::fs::create_dir_all(LOCK_DIR).ctx(|| format!("create {LOCK_DIR}"))?;
        let mut claimed = None;
        for slot in 0..=255u8 {
            if let Some(lock) = try_lock(&Path::new(LOCK_DIR).join(format!("slot-{slot}.lock")))? {
                claimed = Some((slot, lock));
                break;
            }
        }
        let (slot, lock) = claimed
            .ok_or_else(|| Error::Other("all 256 harness network slots are in use".into()))?;
        let mut network = Network {
            slot,
            nodes: Vec::new(),
            ip,
            _lock: lock,
        };
        network.remove_stale();
        run_ip(
            &network.ip,
            &[
                "route",
                "replace",
                "unreachable",
                &format!("10.201.{slot}.0/24"),
            ],
        )?;
        for (j, node) in node_names.iter().enumerate() {
            let base = (j * 4) as u8;
            let net = NodeNet {
                node: node.clone(),
                netns: format!("im-{slot}-{node}"),
                svc_netns: format!("im-{slot}-{node}-svc"),
                host_veth: format!("imh{slot}x{j}"),
                host_ip: Ipv4Addr::new(10, 201, slot, base + 1),
                node_ip: Ipv4Addr::new(10, 201, slot, base + 2),
            };
            let ns_veth = format!("imn{slot}x{j}");
            let ipc = network.ip.clone();
            let r = |args: &[&str]| run_ip(&ipc, args);
            r(&["netns", "add", &net.netns])?;
            // Record it before configuring so a failure below still removes it on drop.
            network.nodes.push(net.clone());
            r(&["netns", "add", &net.svc_netns])?;
            r(&[
                "link",
                "add",
                &net.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &ns_veth,
                "netns",
                &net.netns,
            ])?;
            r(&[
                "addr",
                "add",
                &format!("{}/30", net.host_ip),
                "dev",
                &net.host_veth,
            ])?;
            r(&["link", "set", &net.host_veth, "up"])?;
            r(&[
                "-n",
                &net.netns,
                "addr",
                "add",
                &format!("{}/30", net.node_ip),
                "dev",
                &ns_veth,
            ])?;
            r(&["-n", &net.netns, "link", "set", &ns_veth, "up"])?;
            r(&["-n", &net.netns, "link", "set", "lo", "up"])?;
            // Pod to pod across nodes: through the host, which forwards between this slot's
            // veths only (per-interface forwarding; the host's own setting is left alone).
            r(&[
                "-n",
                &net.netns,
                "route",
                "add",
                &format!("10.201.{slot}.0/24"),
                "via",
                &net.host_ip.to_string(),
            ])?;
            let fwd = format!("/proc/sys/net/ipv4/conf/{}/forwarding", net.host_veth);
            std::fs::write(&fwd, "1").ctx(|| format!("write {fwd}"))?;
            // Services: the node routes the service CIDR to its Service namespace, where every
            // ClusterIP is local.
            let (node_side, svc_side) = (format!("ims{slot}x{j}"), format!("imp{slot}x{j}"));
            let node_addr = Ipv4Addr::new(10, 202, slot, base + 1);
            let svc_addr = Ipv4Addr::new(10, 202, slot, base + 2);
            r(&[
                "-n",
                &net.netns,
                "link",
                "add",
                &node_side,
                "type",
                "veth",
                "peer",
                "name",
                &svc_side,
                "netns",
                &net.svc_netns,
            ])?;
            r(&[
                "-n",
                &net.netns,
                "addr",
                "add",
                &format!("{node_addr}/30"),
                "dev",
                &node_side,
            ])?;
            r(&["-n", &net.netns, "link", "set", &node_side, "up"])?;
            r(&[
                "-n",
                &net.svc_netns,
                "addr",
                "add",
                &format!("{svc_addr}/30"),
                "dev",
                &svc_side,
            ])?;
            r(&["-n", &net.svc_netns, "link", "set", &svc_side, "up"])?;
            r(&["-n", &net.svc_netns, "link", "set", "lo", "up"])?;
            r(&[
                "-n",
                &net.netns,
                "route",
                "add",
                SERVICE_CIDR,
                "via",
                &svc_addr.to_string(),
            ])?;
            r(&[
                "-n",
                &net.svc_netns,
                "route",
                "add",
                "local",
                SERVICE_CIDR,
                "dev",
                "lo",
            ])?;
        }
        Ok(network)
    }

    /// Removes namespaces and veths of this slot left by a crashed run (the slot lock was free,
    /// so their owner is dead).
    fn remove_stale(&self) {
        let prefix = format!("im-{}-", self.slot);
        if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(&prefix) {
                    let _ = run_ip(&self.ip, &["netns", "del", &name]);
                }
            }
        }
        let veth_prefix = format!("imh{}x", self.slot);
        if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with(&veth_prefix) {
                    let _ = run_ip(&self.ip, &["link", "del", &name]);
                }
            }
        }
    }

    pub fn node(&self, node: &str) -> Option<&NodeNet> {
        self.nodes.iter().find(|n| n.node == node)
    }

    /// Takes the node's link down (both veth ends lose carrier); processes keep running.
    pub fn cut_link(&self, node: &str) -> Result<()> {
        let net = self.node_or_err(node)?;
        run_ip(&self.ip, &["link", "set", &net.host_veth, "down"])
    }

    pub fn restore_link(&self, node: &str) -> Result<()> {
        let net = self.node_or_err(node)?;
        run_ip(&self.ip, &["link", "set", &net.host_veth, "up"])
    }

    fn node_or_err(&self, node: &str) -> Result<&NodeNet> {
        self.node(node)
            .ok_or_else(|| Error::Other(format!("no node named {node} in this harness")))
    }
}

/// Binds a TCP listener on `addr` inside the network namespace at `netns`.
///
/// A socket keeps the namespace it was created in, so a short-lived thread enters the namespace
/// (setns affects only the calling thread), binds, and hands the listener back.
pub async fn bind_in_netns(netns: &Path, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = (|| {
            let ns = File::open(&path)?;
            // SAFETY: setns on a valid namespace fd; affects only this thread, which ends below.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })();
        let _ = tx.send(result);
    });
    let what = || format!("bind {addr} in {}", netns.display());
    let l = rx
        .await
        .map_err(|_| std::io::Error::other("bind thread vanished"))
        .ctx(what)?
        .ctx(what)?;
    tokio::net::TcpListener::from_std(l).ctx(what)
}

impl Drop for Network {
    fn drop(&mut self) {
        for net in &self.nodes {
            // Deleting a namespace destroys its veth pairs with it.
            for ns in [&net.netns, &net.svc_netns] {
                if let Err(e) = run_ip(&self.ip, &["netns", "del", ns]) {
                    eprintln!("harness: removing {ns}: {e}");
                }
            }
        }
        let _ = run_ip(
            &self.ip,
            &[
                "route",
                "del",
                "unreachable",
                &format!("10.201.{}.0/24", self.slot),
            ],
        );
    }
}
