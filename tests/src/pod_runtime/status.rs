//! Pod status as kubelet writes it.

use super::*;

/// How often the status is written even when nothing changed, as kubelet's status manager
/// resyncs: someone else (the node-lifecycle controller marking pods NotReady after a missed
/// heartbeat, possibly just after ours resumed) may have overwritten it.
pub(super) const STATUS_RESYNC: Duration = Duration::from_secs(10);

/// Publishes pod status when it changes (and only while the node is connected).
pub(super) struct StatusWriter {
    ctx: Arc<RuntimeCtx>,
    node: NodeCtx,
    pod: Arc<Pod>,
    start_time: Timestamp,
    last_written: Option<String>,
    last_write_at: Option<Instant>,
    was_connected: bool,
    transitions: HashMap<String, (String, Timestamp)>,
}

impl StatusWriter {
    pub(super) fn new(
        ctx: Arc<RuntimeCtx>,
        node: NodeCtx,
        pod: Arc<Pod>,
        start_time: Timestamp,
    ) -> Self {
        StatusWriter {
            ctx,
            node,
            pod,
            start_time,
            last_written: None,
            last_write_at: None,
            was_connected: true,
            transitions: HashMap::new(),
        }
    }

    fn condition(&mut self, kind: &str, ok: bool) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_string();
        let entry = self
            .transitions
            .entry(kind.to_string())
            .or_insert_with(|| (status.clone(), Timestamp::now()));
        if entry.0 != status {
            *entry = (status.clone(), Timestamp::now());
        }
        PodCondition {
            type_: kind.to_string(),
            status,
            last_transition_time: Some(Time(entry.1)),
            ..Default::default()
        }
    }

    pub(super) async fn write(&mut self, shared: &PodShared, volumes_ready: bool) {
        if self.ctx.is_shut_down() {
            return;
        }
        let connected = self.node.is_connected();
        if !connected {
            self.was_connected = false;
            return;
        }
        let runs = lock(&shared.containers).clone();
        let all_ready = !runs.is_empty() && runs.iter().all(|c| c.ready);
        let all_done = !runs.is_empty() && runs.iter().all(|c| c.done);
        let phase = if all_done {
            if runs
                .iter()
                .all(|c| c.last_exit.as_ref().is_some_and(|e| e.code == 0))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if runs
            .iter()
            .any(|c| c.pid.is_some() || c.last_exit.is_some())
        {
            "Running"
        } else {
            "Pending"
        };
        // A signature without timestamps decides whether anything changed.
        let signature = format!(
            "{phase}|{volumes_ready}|{}",
            runs.iter()
                .map(|c| format!(
                    "{}:{:?}:{}:{}:{:?}:{:?}:{}",
                    c.name,
                    c.pid,
                    c.ready,
                    c.restart_count,
                    c.waiting.as_ref().map(|w| &w.0),
                    c.last_exit.as_ref().map(|e| e.code),
                    c.done
                ))
                .collect::<Vec<_>>()
                .join(",")
        );
        // After a heartbeat pause the node controller may have rewritten our conditions.
        let forced = !self.was_connected
            || self
                .last_write_at
                .is_some_and(|t| t.elapsed() >= STATUS_RESYNC);
        if !forced && self.last_written.as_deref() == Some(signature.as_str()) {
            return;
        }
        let conditions = vec![
            self.condition("PodReadyToStartContainers", volumes_ready),
            self.condition("Initialized", true),
            self.condition("ContainersReady", all_ready),
            self.condition("Ready", all_ready),
            self.condition("PodScheduled", true),
        ];
        let container_statuses = runs.iter().map(container_status).collect();
        let node_ip = self.node.net.node_ip.to_string();
        let status = PodStatus {
            phase: Some(phase.into()),
            conditions: Some(conditions),
            container_statuses: Some(container_statuses),
            host_ip: Some(node_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: node_ip.clone(),
            }]),
            pod_ip: Some(node_ip.clone()),
            pod_ips: Some(vec![PodIP { ip: node_ip }]),
            start_time: Some(Time(self.start_time)),
            ..Default::default()
        };
        let (ns, name) = pod_ns_name(&self.pod);
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &ns);
        let patch = serde_json::json!({
            "metadata": {"uid": self.pod.metadata.uid},
            "status": status,
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.last_written = Some(signature);
                self.last_write_at = Some(Instant::now());
                self.was_connected = true;
            }
            Err(e) => tracing::debug!(pod = %name, "status update: {e}"),
        }
    }
}

pub(super) fn container_status(c: &ContainerRun) -> ContainerStatus {
    let terminated = |e: &Exit| ContainerStateTerminated {
        exit_code: e.code,
        reason: Some(e.reason.clone()),
        started_at: e.started.map(Time),
        finished_at: Some(Time(e.finished)),
        ..Default::default()
    };
    let state = if let (Some(_), Some(since)) = (c.pid, c.running_since) {
        ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(since)),
            }),
            ..Default::default()
        }
    } else if let (true, Some(e)) = (c.done, &c.last_exit) {
        ContainerState {
            terminated: Some(terminated(e)),
            ..Default::default()
        }
    } else {
        let (reason, message) = c
            .waiting
            .clone()
            .unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
        ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason),
                message: (!message.is_empty()).then_some(message),
            }),
            ..Default::default()
        }
    };
    let last_state = match (&c.last_exit, c.done) {
        (Some(e), false) => Some(ContainerState {
            terminated: Some(terminated(e)),
            ..Default::default()
        }),
        _ => None,
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("harness://{}", c.image),
        container_id: c.pid.map(|p| format!("harness://{p}")),
        ready: c.ready,
        started: Some(c.pid.is_some()),
        restart_count: c.restart_count,
        state: Some(state),
        last_state,
        ..Default::default()
    }
}
