//! The harness of the browser tests: a real headless Chromium driven over WebDriver, and scripted
//! stand-ins for the three MIG instances an operation visits (see [`fake_mig`]).

#![allow(dead_code)] // each test binary uses a part of the harness

pub mod fake_mig;

// The browser lives in the test kit; `common::Browser` stays.
#[allow(unused_imports)] // the stream tests use no browser
pub use testkit::browser::*;
