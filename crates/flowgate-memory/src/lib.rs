//! flowgate's memory governor: one byte budget for the process
//! (`server.memory_limit_bytes`), charged by everything that holds events or state —
//! listener buffers, pipeline reads, processor state, sink batches — and the pressure
//! level that tells each of them when to hold back (`docs/memory.md`).
//!
//! - [`governor`]: [`MemoryGovernor`], its RAII [`Charge`]s and the [`Level`] they make.
//! - [`limit`]: the default budget, from the cgroup limit or the machine's memory.

#![warn(missing_docs)]

pub mod governor;
pub mod limit;

pub use governor::{Charge, Component, Level, MemoryGovernor, MemoryStats};
