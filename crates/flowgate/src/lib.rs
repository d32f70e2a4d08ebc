//! The parts of the `flowgate` command that its tests drive directly: the HTTP client
//! of the commands that use the engine's HTTP API, and `flowgate top`.

pub mod http;
pub mod top;
