//! Fault injection on a running [`Cluster`].

use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::process;

impl Cluster {
    /// SIGKILLs the processes of a pod's running containers (the node agent then restarts them
    /// per restartPolicy, as after a crash). Returns the pids killed.
    pub fn kill_pod_process(&self, ns: &str, pod: &str) -> Result<Vec<u32>> {
        let shared = self.registry().get(ns, pod).ok_or_else(|| {
            Error::Other(format!("pod {ns}/{pod} is not running on a harness node"))
        })?;
        let pids = shared.pids();
        if pids.is_empty() {
            return Err(Error::Other(format!(
                "pod {ns}/{pod} has no running process"
            )));
        }
        for pid in &pids {
            process::signal(*pid, libc::SIGKILL);
        }
        Ok(pids)
    }

    /// The node stops renewing its Lease and status and stops acting on the API (its pods keep
    /// running): the node-lifecycle controller marks it NotReady after the grace period.
    pub fn stop_node_heartbeat(&self, node: &str) -> Result<()> {
        if self.agent().stop_heartbeat(node) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "no node named {node} in this harness"
            )))
        }
    }

    /// Heartbeats resume; the node re-syncs with the API (pods deleted meanwhile are killed).
    pub fn resume_node_heartbeat(&self, node: &str) -> Result<()> {
        if self.agent().resume_heartbeat(node) {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "no node named {node} in this harness"
            )))
        }
    }

    /// Takes the node's veth link down: its pods are unreachable (and reach nothing) while their
    /// processes keep running. The node's heartbeat is not affected; see [`Cluster::partition_node`].
    pub fn cut_node_link(&self, node: &str) -> Result<()> {
        self.net()?.cut_link(node)
    }

    pub fn restore_node_link(&self, node: &str) -> Result<()> {
        self.net()?.restore_link(node)
    }

    /// A full partition: link cut and heartbeats stopped.
    pub fn partition_node(&self, node: &str) -> Result<()> {
        self.cut_node_link(node)?;
        self.stop_node_heartbeat(node)
    }

    /// Ends a partition made by [`Cluster::partition_node`].
    pub fn heal_node(&self, node: &str) -> Result<()> {
        self.restore_node_link(node)?;
        self.resume_node_heartbeat(node)
    }

    fn net(&self) -> Result<&crate::netns::Network> {
        self.network()
            .ok_or_else(|| Error::Other("the harness has no node network".into()))
    }
}
