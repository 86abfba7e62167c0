//! The lab of grids and the application's data, from the test kit (`testkit::lab`,
//! `testkit::data`); this module keeps the names the `mig` package's tests import.
//!
//! Address plan: the `mig` package's tests own bases 200..=253, handed out per test binary by a
//! counter (`static BASES: AtomicU8`); see `testkit::lab`.
// Each test binary uses a part of these.
#![allow(unused_imports, dead_code)]

pub use testkit::data::{curl, fault_points, get, off, on, put, random_bytes, small_shop, Data};
pub use testkit::lab::{names, Lab};
pub use testkit::ops::{op_at, start_op, step};
pub use testkit::wait_for;

/// The `gridctl` binary beside `mig`, built on demand (it is another package's binary).
pub fn gridctl() -> std::path::PathBuf {
    testkit::lab::gridctl_bin()
}
