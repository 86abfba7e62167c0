//! MIG's application side: the actors that carry out an operation (Source, MigHelper and Target;
//! the Proxy actor has its own crate, `proxy`), the operation model they share with the API and the
//! journal, and the configuration they run on: MIG's properties, the application's key, and the
//! grid.info file that says which grids exist and how to reach them. The `mig` binary wires these
//! together; nothing here parses a command line or serves HTTP.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod book;
pub mod cancel;
pub mod controller;
pub mod dry_run;
pub mod faults;
pub mod grid_info;
pub mod handoff;
pub mod journal;
pub mod keys;
#[cfg(any(test, feature = "test-support"))]
pub mod memory_lab;
pub mod mig_helper;
pub mod op;
pub mod properties;
pub mod runner;
pub mod source;
pub mod ssh;
pub mod target;
pub mod telemetry;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;
pub mod units;
