pub mod app;
pub mod backend;
pub mod config;
pub mod demo;
pub mod frontend;
pub mod local_cluster;
pub mod protocol;
pub mod shard_map;
