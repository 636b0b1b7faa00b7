//! The contract between IdentityMesh's processes, written once: the server serves and the
//! operator calls the internal API ([`internal`]), the relay answers the hub methods the server
//! invokes ([`hub`]), and administrators and the tests set the annotations the operator reads
//! ([`annotations`]); the operator tells the servers how to reach each other ([`forwarding`]). A change here is a change to every side at once, which is the point.

pub mod annotations;
pub mod forwarding;
pub mod hub;
pub mod internal;
