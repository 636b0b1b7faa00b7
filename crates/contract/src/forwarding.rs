//! Request forwarding between the two server instances: the operator writes the peer URL
//! template into server.toml, the server fills in the fence holder's instance name.

/// Where the active's instance name goes in `forwarding.peer_url_template`.
pub const INSTANCE_PLACEHOLDER: &str = "{instance}";
