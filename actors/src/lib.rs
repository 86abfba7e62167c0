//! tmp

pub mod controller;
pub mod ssh;
