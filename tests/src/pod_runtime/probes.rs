//! Readiness and liveness probes.

use super::*;

pub(super) struct ProbeState {
    spec: ProbeSpec,
    probe: Probe,
    successes: i32,
    failures: i32,
    next: Instant,
}

pub(super) fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => c
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

pub(super) fn probe_of(spec: &ProbeSpec, c: &Container, pod_ip: IpAddr) -> Probe {
    if let Some(h) = &spec.http_get {
        let Some(port) = resolve_port(&h.port, c) else {
            return Probe::Unsupported(format!("unknown probe port {:?}", h.port));
        };
        let ip = h
            .host
            .as_deref()
            .and_then(|h| h.parse().ok())
            .unwrap_or(pod_ip);
        return Probe::Http {
            addr: SocketAddr::new(ip, port),
            https: h.scheme.as_deref() == Some("HTTPS"),
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            headers: h
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        };
    }
    if let Some(t) = &spec.tcp_socket {
        return match resolve_port(&t.port, c) {
            Some(port) => Probe::Tcp {
                addr: SocketAddr::new(pod_ip, port),
            },
            None => Probe::Unsupported(format!("unknown probe port {:?}", t.port)),
        };
    }
    Probe::Unsupported("the harness runs only httpGet and tcpSocket probes".into())
}

/// Readiness and liveness probes of one container; liveness failures kill the process (the
/// container loop then restarts it per restartPolicy).
pub(super) async fn run_probes(
    node: NodeCtx,
    pod: Arc<Pod>,
    idx: usize,
    c: Container,
    shared: Arc<PodShared>,
) {
    let pod_ip = IpAddr::V4(node.net.node_ip);
    let netns = node.net.netns_path();
    let mk = |s: &Option<ProbeSpec>| {
        s.as_ref().map(|s| ProbeState {
            probe: probe_of(s, &c, pod_ip),
            spec: s.clone(),
            successes: 0,
            failures: 0,
            next: Instant::now(),
        })
    };
    let mut readiness = mk(&c.readiness_probe);
    let mut liveness = mk(&c.liveness_probe);
    let mut current_pid: Option<u32> = None;
    let name = pod.metadata.name.clone().unwrap_or_default();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (pid, since) = {
            let g = lock(&shared.containers);
            match g.get(idx) {
                Some(c) => (c.pid, c.running_since),
                None => return,
            }
        };
        if pid != current_pid {
            // New process incarnation: probes start over with their initial delay.
            current_pid = pid;
            let started = Instant::now();
            for p in [&mut readiness, &mut liveness].into_iter().flatten() {
                p.successes = 0;
                p.failures = 0;
                p.next = started
                    + Duration::from_secs(p.spec.initial_delay_seconds.unwrap_or(0).max(0) as u64);
            }
            if readiness.is_none() {
                let ready = pid.is_some();
                if let Some(c) = lock(&shared.containers).get_mut(idx) {
                    c.ready = ready;
                }
            }
        }
        let Some(pid) = pid else { continue };
        let _ = since;
        let now = Instant::now();
        for (is_liveness, p) in [(false, &mut readiness), (true, &mut liveness)] {
            let Some(p) = p else { continue };
            if now < p.next {
                continue;
            }
            let period = p.spec.period_seconds.unwrap_or(10).max(1) as u64;
            p.next = now + Duration::from_secs(period);
            let timeout = Duration::from_secs(p.spec.timeout_seconds.unwrap_or(1).max(1) as u64);
            let result = probe::run(&netns, &p.probe, timeout).await;
            match result {
                Ok(()) => {
                    p.successes += 1;
                    p.failures = 0;
                }
                Err(why) => {
                    tracing::debug!(pod = %name, container = %c.name, liveness = is_liveness, "probe failed: {why}");
                    p.failures += 1;
                    p.successes = 0;
                }
            }
            let success_threshold = p.spec.success_threshold.unwrap_or(1).max(1);
            let failure_threshold = p.spec.failure_threshold.unwrap_or(3).max(1);
            if is_liveness {
                if p.failures >= failure_threshold {
                    tracing::info!(pod = %name, container = %c.name, pid, "liveness probe failed; killing");
                    process::signal(pid, libc::SIGKILL);
                    p.failures = 0;
                }
            } else {
                let mut g = lock(&shared.containers);
                if let Some(cs) = g.get_mut(idx) {
                    if cs.pid == Some(pid) {
                        if p.successes >= success_threshold {
                            cs.ready = true;
                        } else if p.failures >= failure_threshold {
                            cs.ready = false;
                        }
                    }
                }
            }
        }
    }
}
