//! A lab of real sshd grids for one test, brought down when the test ends (even on failure): the
//! test kit's (`testkit::lab`); this module keeps the names gridctl's tests import.
//!
//! Every test uses its own `--base`, so tests run in parallel without sharing addresses:
//! gridctl's tests own bases 100..=199 (grid n of base B is 127.0.(B+n).x).
#![allow(dead_code, unused_imports)]

pub use testkit::data::{allocated, http};
pub use testkit::lab::{gridctl, info_field, Lab, Run};
pub use testkit::wait::{wait_for, wait_for_every};

pub const GRIDCTL: &str = env!("CARGO_BIN_EXE_gridctl");
