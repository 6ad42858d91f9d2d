
pub mod protocol;
pub mod backend;
pub mod frontend;
pub mod config;
pub mod shard_map;
pub mod app;
pub mod demo;
pub mod local_cluster;
