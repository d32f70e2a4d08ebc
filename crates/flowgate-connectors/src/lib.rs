//! flowgate's connectors: the sinks, one module each under [`sinks`] (the [`Connectors`]
//! factory builds them from pipeline configs for the engine), and the sources under
//! [`sources`] (`[[sources]]`: external systems read into topics).

#![warn(missing_docs)]

pub mod sinks;
pub mod sources;

pub use sinks::Connectors;
