//! Strait: an L4/L7 proxy and service-discovery bridge that speaks Apache APISIX's configuration.
//!
//! `main.rs` is thin: CLI -> [`config::Config::load`] -> [`server::Running::start`] -> wait for a
//! signal -> drain. Tests start the same [`server::Running`] in-process on `127.0.0.1:0`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod gateway;
pub mod route;
pub mod server;
pub mod stream;
pub mod transcode;
pub mod upstream;

pub use config::Config;
pub use server::{Options, Running};
