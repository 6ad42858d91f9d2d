
pub mod protocol;
pub mod backend;
pub mod frontend;
