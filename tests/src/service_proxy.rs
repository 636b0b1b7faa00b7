//! A Service proxy, as kube-proxy would be: for every Service port a TCP listener on
//! 127.0.0.1:<free port> (for the tests) and, in every node's Service namespace (see
//! [`crate::netns`]), one on the Service's ClusterIP and port (for pods, which reach it by its
//! cluster DNS name), each
//! forwarding to a ready endpoint from the Service's EndpointSlices. A node whose link is cut
//! reaches no Service, as on a real cluster.
//!
//! Endpoints are chosen per connection (round robin over the ready ones, re-resolved on every
//! new connection). A forwarded connection whose endpoint leaves the ready set is closed
//! [`REMOVED_ENDPOINT_GRACE`] later: kube-proxy flushes the conntrack entries of a removed
//! endpoint for UDP only (iptables and nftables modes; IPVS drains it gracefully), so a request
//! in flight to a pod that still runs completes; the bound keeps a connection to an endpoint
//! that will never answer from hanging a test.
//!
//! A change of Services or EndpointSlices reaches the listeners `delay` after the proxy saw it
//! ([`ServiceProxy::start`]): on a real cluster kube-proxy programs its rules on a sync period
//! (about 1 s), so a cutover's clients see the swing that much later. Each change keeps its own
//! delay (a snapshot per change, applied when due), so a burst is not applied early.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cluster_dns::{self, ClusterDns};
use crate::netns::NodeNet;

/// (namespace, service, port) → listener address.
type Listeners = HashMap<(String, String, u16), ListenerEntry>;

struct ListenerEntry {
    addr: SocketAddr,
    cluster_ip: Option<IpAddr>,
    /// Current ready endpoints; forwarding tasks watch it.
    endpoints: watch::Sender<BTreeSet<SocketAddr>>,
    /// The loopback listener's task, then one per node namespace (ClusterIP:port).
    tasks: Vec<JoinHandle<()>>,
}

impl ListenerEntry {
    fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct ServiceProxy {
    listeners: Arc<Mutex<Listeners>>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ServiceProxy {
    /// Watches Services and EndpointSlices and applies what they say `delay` after each change,
    /// for the tests on loopback and for the pods in the namespaces of `nodes`; keeps `dns`
    /// current (at once: cluster DNS has no sync period to speak of).
    pub fn start(
        client: kube::Client,
        delay: Duration,
        nodes: Vec<NodeNet>,
        dns: ClusterDns,
    ) -> ServiceProxy {
        let listeners: Arc<Mutex<Listeners>> = Arc::default();
        let task = tokio::spawn(sync_loop(client, listeners.clone(), delay, nodes, dns));
        ServiceProxy { listeners, task }
    }

    /// The local address for a Service port, if the proxy has a listener for it yet.
    pub fn addr(&self, ns: &str, name: &str, port: u16) -> Option<SocketAddr> {
        lock(&self.listeners)
            .get(&(ns.to_string(), name.to_string(), port))
            .map(|e| e.addr)
    }

    /// A handle that finds the current listener of a Service port later.
    pub fn lookup(&self) -> ProxyLookup {
        ProxyLookup(self.listeners.clone())
    }

    /// Every (namespace, name, port) → address.
    pub fn all(&self) -> Vec<((String, String, u16), SocketAddr)> {
        lock(&self.listeners)
            .iter()
            .map(|(k, v)| (k.clone(), v.addr))
            .collect()
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.task.abort();
        for (_, e) in lock(&self.listeners).drain() {
            e.stop();
        }
    }
}

/// What one Service port should forward to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Want {
    cluster_ip: Option<IpAddr>,
    ready: BTreeSet<SocketAddr>,
}

/// What the listeners should forward to: (namespace, service, port) → its ClusterIP and ready
/// endpoints.
type Wanted = HashMap<(String, String, u16), Want>;

async fn sync_loop(
    client: kube::Client,
    listeners: Arc<Mutex<Listeners>>,
    delay: Duration,
    nodes: Vec<NodeNet>,
    dns: ClusterDns,
) {
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (eps_reader, eps_writer) = reflector::store::<EndpointSlice>();
    let (tx, mut rx) = watch::channel(0u64);
    let tx2 = tx.clone();
    let svc_api: Api<Service> = Api::all(client.clone());
    let eps_api: Api<EndpointSlice> = Api::all(client);
    let w1 = tokio::spawn(async move {
        let s = reflector::reflector(
            svc_writer,
            watcher(svc_api, watcher::Config::default()).default_backoff(),
        );
        let mut s = std::pin::pin!(s);
        while s.next().await.is_some() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    let w2 = tokio::spawn(async move {
        let s = reflector::reflector(
            eps_writer,
            watcher(eps_api, watcher::Config::default()).default_backoff(),
        );
        let mut s = std::pin::pin!(s);
        while s.next().await.is_some() {
            tx2.send_modify(|n| *n = n.wrapping_add(1));
        }
    });
    struct AbortOnDrop(Vec<JoinHandle<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let _guard = AbortOnDrop(vec![w1, w2]);
    let mut pending = Delayed::new(delay);
    loop {
        tokio::select! {
            r = rx.changed() => {
                if r.is_err() { return }
                pending.push(Instant::now(), wanted(&svc_reader, &eps_reader));
                let (svcs, slices) = (svc_reader.state(), eps_reader.state());
                dns.set(cluster_dns::records(
                    svcs.iter().map(|s| s.as_ref()),
                    slices.iter().map(|s| s.as_ref()),
                ));
            }
            _ = sleep_until(pending.next_due()) => {}
            // A periodic resync, as kube-proxy's, in case a notification was coalesced.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                pending.push(Instant::now(), wanted(&svc_reader, &eps_reader));
            }
        }
        if let Some(w) = pending.take_due(Instant::now()) {
            apply(w, &listeners, &nodes);
        }
    }
}

/// Snapshots taken when a change was seen, each due `delay` later.
struct Delayed<T> {
    delay: Duration,
    queue: VecDeque<(Instant, T)>,
}

impl<T> Delayed<T> {
    fn new(delay: Duration) -> Self {
        Delayed {
            delay,
            queue: VecDeque::new(),
        }
    }

    fn push(&mut self, seen: Instant, snapshot: T) {
        self.queue.push_back((seen + self.delay, snapshot));
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(due, _)| *due)
    }

    /// The newest snapshot that is due at `now` (older due ones are superseded by it).
    fn take_due(&mut self, now: Instant) -> Option<T> {
        let mut due = None;
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            due = self.queue.pop_front().map(|(_, w)| w);
        }
        due
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Pure: the forwarding the Services and their slices ask for now.
fn wanted(svcs: &Store<Service>, eps: &Store<EndpointSlice>) -> Wanted {
    let mut wanted = Wanted::new();
    for svc in svcs.state() {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let port_name = port.name.clone().unwrap_or_default();
            let mut ready = BTreeSet::new();
            for slice in eps.state() {
                let owned = slice.metadata.namespace.as_deref() == Some(ns.as_str())
                    && slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&name);
                if !owned {
                    continue;
                }
                let Some(target) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.clone().unwrap_or_default() == port_name)
                    .and_then(|p| p.port)
                    .and_then(|p| u16::try_from(p).ok())
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    // nil means ready, as in kube-proxy.
                    let is_ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                    if !is_ready {
                        continue;
                    }
                    for a in &ep.addresses {
                        if let Ok(ip) = a.parse::<IpAddr>() {
                            ready.insert(SocketAddr::new(ip, target));
                        }
                    }
                }
            }
            let cluster_ip = spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok());
            if let Ok(p) = u16::try_from(port.port) {
                wanted.insert((ns.clone(), name.clone(), p), Want { cluster_ip, ready });
            }
        }
    }
    wanted
}

fn apply(wanted: Wanted, listeners: &Mutex<Listeners>, nodes: &[NodeNet]) {
    let mut map = lock(listeners);
    map.retain(|k, e| {
        // A Service deleted, or recreated with another ClusterIP: its listeners go.
        let keep = wanted.get(k).is_some_and(|w| w.cluster_ip == e.cluster_ip);
        if !keep {
            e.stop();
        }
        keep
    });
    for (key, Want { cluster_ip, ready }) in wanted {
        if let Some(e) = map.get(&key) {
            e.endpoints.send_if_modified(|cur| {
                if *cur != ready {
                    *cur = ready;
                    true
                } else {
                    false
                }
            });
            continue;
        }
        // Bind synchronously so the address is known now (no race for the port).
        let std_listener = match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("service proxy bind: {e}");
                continue;
            }
        };
        let _ = std_listener.set_nonblocking(true);
        let Ok(addr) = std_listener.local_addr() else {
            continue;
        };
        let Ok(listener) = TcpListener::from_std(std_listener) else {
            continue;
        };
        let (tx, rx) = watch::channel(ready);
        let mut tasks = vec![tokio::spawn(serve(listener, rx.clone(), None))];
        if let Some(ip) = cluster_ip {
            let at = SocketAddr::new(ip, key.2);
            for node in nodes {
                tasks.push(tokio::spawn(serve_in_node(node.clone(), at, rx.clone())));
            }
        }
        map.insert(
            key,
            ListenerEntry {
                addr,
                cluster_ip,
                endpoints: tx,
                tasks,
            },
        );
    }
}

/// The ClusterIP listener of one node, in its Service namespace (where a `local` route makes
/// every ClusterIP bindable); connections are forwarded from the host, while the node's link is
/// up.
async fn serve_in_node(
    node: NodeNet,
    at: SocketAddr,
    endpoints: watch::Receiver<BTreeSet<SocketAddr>>,
) {
    match crate::netns::bind_in_netns(&node.svc_netns_path(), at).await {
        Ok(l) => serve(l, endpoints, Some(LinkGate(node.host_veth.clone()))).await,
        Err(e) => tracing::warn!(node = %node.node, "service proxy: {e}"),
    }
}

/// Whether a node's link is up (its host-side veth is not down): a pod on a cut node reaches
/// no Service through its in-namespace listener either.
#[derive(Clone)]
struct LinkGate(String);

impl LinkGate {
    fn is_up(&self) -> bool {
        std::fs::read_to_string(format!("/sys/class/net/{}/operstate", self.0))
            .is_ok_and(|s| s.trim() != "down")
    }

    async fn down(gate: &Option<LinkGate>) {
        match gate {
            None => std::future::pending().await,
            Some(g) => {
                while g.is_up() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn serve(
    listener: TcpListener,
    endpoints: watch::Receiver<BTreeSet<SocketAddr>>,
    gate: Option<LinkGate>,
) {
    let next = AtomicUsize::new(0);
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    struct AbortAll<'a>(&'a mut Vec<JoinHandle<()>>);
    impl Drop for AbortAll<'_> {
        fn drop(&mut self) {
            for t in self.0.iter() {
                t.abort();
            }
        }
    }
    let guard = AbortAll(&mut conns);
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        guard.0.retain(|t| !t.is_finished());
        if gate.as_ref().is_some_and(|g| !g.is_up()) {
            drop(client);
            continue;
        }
        // Re-resolve on every connection.
        let ready: Vec<SocketAddr> = endpoints.borrow().iter().copied().collect();
        if ready.is_empty() {
            // No ready endpoint: refuse, as kube-proxy's REJECT rule does.
            drop(client);
            continue;
        }
        let target = ready[next.fetch_add(1, Ordering::Relaxed) % ready.len()];
        let mut rx = endpoints.clone();
        let gate = gate.clone();
        guard.0.push(tokio::spawn(async move {
            let Ok(Ok(upstream)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await
            else {
                return;
            };
            tokio::select! {
                _ = forward(client, upstream, &mut rx, target) => {}
                // The node's link was cut: its connections break, as packets stop.
                _ = LinkGate::down(&gate) => {}
            }
        }));
    }
}

/// How long a connection may go on after its endpoint left the ready set (see the module doc).
pub const REMOVED_ENDPOINT_GRACE: Duration = Duration::from_secs(5);

async fn forward(
    mut client: TcpStream,
    mut upstream: TcpStream,
    endpoints: &mut watch::Receiver<BTreeSet<SocketAddr>>,
    target: SocketAddr,
) {
    let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            r = endpoints.changed() => {
                if r.is_err() || !endpoints.borrow().contains(&target) {
                    // Endpoint removed: let what is in flight finish, then close both sides.
                    let _ = tokio::time::timeout(REMOVED_ENDPOINT_GRACE, &mut copy).await;
                    return;
                }
            }
        }
    }
}

/// Forwards every connection accepted on `listener` to `target` (used to let pods reach the
/// apiserver at their node's host-side address, and host loopback ports at the same address
/// inside the node namespaces). The connections are tasks of the returned one: aborting it
/// closes them too.
pub fn forward_all(listener: TcpListener, target: SocketAddr) -> JoinHandle<()> {
    forward_each(listener, move || Some(target))
}

/// Forwards every connection accepted on `listener` to the address `target` names at that
/// moment (none: the connection is refused by closing it). Aborting the returned task closes
/// the connections it forwards.
pub fn forward_each<F>(listener: TcpListener, target: F) -> JoinHandle<()>
where
    F: Fn() -> Option<SocketAddr> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut client, _)) = accepted else {
                        // e.g. out of file descriptors: do not spin.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let Some(to) = target() else { continue };
                    conns.spawn(async move {
                        if let Ok(Ok(mut up)) =
                            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// Looks up the proxy's current listener for a Service port from anywhere (e.g. a front door's
/// task), while the proxy runs.
#[derive(Clone)]
pub struct ProxyLookup(Arc<Mutex<Listeners>>);

impl ProxyLookup {
    pub fn addr(&self, ns: &str, name: &str, port: u16) -> Option<SocketAddr> {
        lock(&self.0)
            .get(&(ns.to_string(), name.to_string(), port))
            .map(|e| e.addr)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("no answer"))??;
        Ok(buf.to_vec())
    }

    /// Each connection goes where the target names at that moment; none closes it; aborting
    /// the task closes the connections it forwards too.
    #[test]
    fn a_change_is_applied_only_once_its_delay_has_passed() {
        let t0 = Instant::now();
        let s = Duration::from_millis;
        let mut d = Delayed::new(s(1000));
        assert_eq!(d.take_due(t0), None);
        d.push(t0, "swing");
        d.push(t0 + s(400), "swing again");
        assert_eq!(d.next_due(), Some(t0 + s(1000)));
        assert_eq!(d.take_due(t0 + s(999)), None, "not before its delay");
        assert_eq!(d.take_due(t0 + s(1000)), Some("swing"));
        assert_eq!(
            d.take_due(t0 + s(1000)),
            None,
            "the later change keeps its own delay"
        );
        assert_eq!(d.take_due(t0 + s(1400)), Some("swing again"));
        // Both due at once: the newer one is what the proxy applies.
        d.push(t0, "a");
        d.push(t0 + s(1), "b");
        assert_eq!(d.take_due(t0 + s(5000)), Some("b"));
        assert_eq!(d.next_due(), None);
        // No delay: due at once.
        let mut z = Delayed::new(Duration::ZERO);
        z.push(t0, 1);
        assert_eq!(z.take_due(t0), Some(1));
    }

    #[tokio::test]
    async fn forward_each_follows_the_target_and_stops_with_its_task() {
        let up = echo().await;
        let open = Arc::new(AtomicBool::new(false));
        let o = open.clone();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = l.local_addr().unwrap();
        let task = forward_each(l, move || o.load(Ordering::SeqCst).then_some(up));
        assert!(
            round_trip(front).await.is_err(),
            "no target: the connection is closed"
        );
        open.store(true, Ordering::SeqCst);
        assert_eq!(round_trip(front).await.unwrap(), b"ping");
        let mut held = TcpStream::connect(front).await.unwrap();
        held.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        held.read_exact(&mut buf).await.unwrap();
        task.abort();
        let n = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf))
            .await
            .expect("the forwarded connection is closed when the task stops");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert!(TcpStream::connect(front).await.is_err(), "nothing listens");
    }
}
