//! A watch of the client Service's EndpointSlices: every change of its ready addresses.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher;
use kube::Api;
use tokio::task::JoinHandle;

#[derive(Default, Debug)]
struct SliceState {
    /// slice name → ready addresses
    slices: HashMap<String, Vec<String>>,
    max_ready: usize,
    violations: Vec<String>,
    /// (when, ready addresses) at every change of the union.
    history: Vec<(Instant, Vec<String>)>,
}

/// Watches the client Service's EndpointSlices from before the cluster exists and records every
/// moment more than one endpoint was ready.
pub struct SliceMonitor {
    state: Arc<Mutex<SliceState>>,
    task: JoinHandle<()>,
}

fn ready_addresses(s: &EndpointSlice) -> Vec<String> {
    s.endpoints
        .iter()
        // nil means ready, as kube-proxy reads it.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.clone())
        .collect()
}

impl SliceMonitor {
    pub fn start(client: kube::Client, ns: &str, service: &str) -> SliceMonitor {
        let api: Api<EndpointSlice> = Api::namespaced(client, ns);
        let cfg =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let state: Arc<Mutex<SliceState>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, cfg);
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                        let name = s.metadata.name.clone().unwrap_or_default();
                        g.slices.insert(name, ready_addresses(&s));
                    }
                    watcher::Event::Delete(s) => {
                        let name = s.metadata.name.clone().unwrap_or_default();
                        g.slices.remove(&name);
                    }
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
                let mut all: Vec<String> = g.slices.values().flatten().cloned().collect();
                all.sort();
                if g.history.last().map(|(_, a)| a) != Some(&all) {
                    g.history.push((Instant::now(), all.clone()));
                }
                g.max_ready = g.max_ready.max(all.len());
                if all.len() > 1 {
                    let msg = format!("ready endpoints {all:?} in slices {:?}", g.slices);
                    g.violations.push(msg);
                }
            }
        });
        SliceMonitor { state, task }
    }

    /// Panics if the Service ever had more than one ready endpoint.
    pub fn assert_never_two(&self, when: &str) {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            g.violations.is_empty(),
            "{when}: the client Service routed to more than one pod: {:?}",
            g.violations
        );
    }

    pub fn max_ready(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .max_ready
    }

    /// Number of changes of the ready set seen so far (proves the watch saw the swings).
    pub fn changes(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .len()
    }

    pub fn current(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .last()
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

impl Drop for SliceMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}
