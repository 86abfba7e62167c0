//! MIG's actors (Source, MigHelper, Target, Proxy), the operation model they share, and the
//! configuration they run on: properties, grid.info and the application's key.
#![forbid(unsafe_code)]

pub mod auth;
pub mod keys;
pub mod properties;
