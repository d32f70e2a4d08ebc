//! flowgate's connectors. So far the sinks, one module each under [`sinks`]; the
//! [`Connectors`] factory builds them from pipeline configs for the engine.

#![warn(missing_docs)]

pub mod sinks;

pub use sinks::Connectors;
