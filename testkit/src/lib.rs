//! What the workspace's tests would otherwise each write again: the lab of real grids
//! ([`lab::Lab`], brought up by `gridctl lab up` and down on drop), a free port, a polling wait,
//! SSH keys, the headless browser of the GUI tests (feature `browser`) and a sample operation
//! plan (feature `mig`).
//!
//! A dev-dependency only (`publish = false`). It may depend on `actors` (with its
//! `test-support` feature) but no product crate depends on it, so the arrows of
//! docs/architecture.md still run one way. The unit tests inside `actors` and `web` cannot use
//! it (it would be a second copy of `actors`); they call `actors::test_support` directly, which
//! this crate re-exports.
#![forbid(unsafe_code)]

pub mod data;
pub mod keys;
pub mod lab;
pub mod net;
#[cfg(feature = "mig")]
pub mod ops;
pub mod wait;

#[cfg(feature = "browser")]
pub mod browser;

#[cfg(feature = "mig")]
pub use actors::memory_lab::MemoryLab;
#[cfg(feature = "mig")]
pub use actors::test_support::{sample_plan, shop_lab};

pub use keys::{fingerprint, keygen, keygen_type};
pub use net::{free_port, free_port_on};
pub use wait::wait_for;
