//! The `mig` binary's library: start-up checks, logging and the HTTP server that `main` wires to
//! the actors. Kept as a library so that tests start the real server in-process on port 0.
#![forbid(unsafe_code)]

pub mod audit;
pub mod client;
pub mod daemon;
pub mod host_check;
pub mod logging;
pub mod metrics;
pub mod server;
pub mod site;
pub mod webhook;
