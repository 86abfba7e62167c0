//! tmp

pub mod proxy;
