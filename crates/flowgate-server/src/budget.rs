//! The ingest buffer budget (`ingest.max_buffered_bytes`): memory that connections borrow
//! beyond their small fixed buffers, charged before it is allocated.
//!
//! Each connection holds one [`Charge`] that grows as bytes arrive (a frame, line or body
//! is charged for what has arrived, not for what it announces) and shrinks back when the
//! memory is given back. A charge never asks for more than the whole budget, so a valid
//! config cannot wait forever on itself; waits for budget are bounded by the caller's
//! deadline (the frame deadline), which cuts a connection rather than let it stall others.
//!
//! What a charge holds is charged to the process's memory budget too
//! ([`flowgate_memory`]), as the `ingest` component.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A request for more than the whole budget: it could never be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{wanted} bytes exceed the whole ingest buffer budget of {total} bytes (ingest.max_buffered_bytes)")]
pub struct OverBudget {
    /// Bytes the connection would hold.
    pub wanted: usize,
    /// The whole budget.
    pub total: usize,
}

/// Budget held by one connection, shown in `flowgate_ingest_buffered_bytes` for exactly
/// as long as it is held, however the connection ends.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Semaphore>,
    total: usize,
    gauge: Gauge,
    permit: Option<OwnedSemaphorePermit>,
    memory: flowgate_memory::Charge,
}

impl Charge {
    /// An empty charge against `budget`, which holds `total` permits when nothing is borrowed.
    pub fn new(budget: Arc<Semaphore>, total: usize, gauge: Gauge, memory: flowgate_memory::Charge) -> Charge {
        Charge { budget, total, gauge, permit: None, memory }
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn add(&mut self, permit: OwnedSemaphorePermit) {
        self.gauge.inc_by(permit.num_permits() as i64);
        self.memory.grow(permit.num_permits() as u64);
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
    }

    fn extra(&self, bytes: usize) -> Result<u32, OverBudget> {
        if bytes > self.total {
            return Err(OverBudget { wanted: bytes, total: self.total });
        }
        // `total` fits the semaphore, and a u32 covers any single step the listeners take.
        u32::try_from(bytes.saturating_sub(self.held())).map_err(|_| OverBudget { wanted: bytes, total: self.total })
    }

    /// Grows the charge to `bytes` if the budget has room now, without waiting.
    pub fn try_grow_to(&mut self, bytes: usize) -> Result<bool, OverBudget> {
        let extra = self.extra(bytes)?;
        if extra == 0 {
            return Ok(true);
        }
        match self.budget.clone().try_acquire_many_owned(extra) {
            Ok(permit) => {
                self.add(permit);
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Grows the charge to `bytes`, waiting for budget (callers bound the wait with a
    /// deadline). Fails at once for more than the whole budget.
    pub async fn grow_to(&mut self, bytes: usize) -> Result<(), OverBudget> {
        if self.try_grow_to(bytes)? {
            return Ok(());
        }
        let extra = self.extra(bytes)?;
        // The semaphore is never closed, so acquiring only ends by getting the permits.
        if let Ok(permit) = self.budget.clone().acquire_many_owned(extra).await {
            self.add(permit);
        }
        Ok(())
    }

    /// Gives back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        let held = self.held();
        if held <= bytes {
            return;
        }
        let give_back = held - bytes;
        if bytes == 0 {
            self.permit = None;
        } else if let Some(permit) = &mut self.permit {
            drop(permit.split(give_back));
        }
        self.gauge.dec_by(give_back as i64);
        self.memory.set(bytes as u64);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauge.dec_by(self.held() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> flowgate_memory::MemoryGovernor {
        flowgate_memory::MemoryGovernor::new(1000, 80)
    }

    #[tokio::test]
    async fn charges_grow_shrink_and_return_everything_on_drop() {
        let budget = Arc::new(Semaphore::new(100));
        let gauge = Gauge::default();
        let memory = memory();
        let ingest = || memory.empty(flowgate_memory::Component::Ingest);
        let mut a = Charge::new(budget.clone(), 100, gauge.clone(), ingest());
        a.grow_to(60).await.unwrap();
        assert_eq!((a.held(), budget.available_permits(), gauge.get(), memory.used()), (60, 40, 60, 60));
        let mut b = Charge::new(budget.clone(), 100, gauge.clone(), ingest());
        assert_eq!(b.try_grow_to(50), Ok(false), "only 40 are left");
        assert_eq!(b.try_grow_to(101), Err(OverBudget { wanted: 101, total: 100 }));
        a.shrink_to(10);
        assert_eq!((a.held(), budget.available_permits(), gauge.get(), memory.used()), (10, 90, 10, 10));
        assert_eq!(b.try_grow_to(90), Ok(true));
        assert_eq!(memory.used(), 100);
        drop(b);
        a.shrink_to(0);
        assert_eq!((a.held(), budget.available_permits(), gauge.get()), (0, 100, 0));
        a.grow_to(100).await.unwrap();
        drop(a);
        assert_eq!((budget.available_permits(), gauge.get(), memory.used(), memory.peak()), (100, 0, 0, 100));
    }

    #[tokio::test]
    async fn a_waiting_charge_is_granted_when_another_gives_back() {
        let budget = Arc::new(Semaphore::new(100));
        let gauge = Gauge::default();
        let memory = memory();
        let mut a = Charge::new(budget.clone(), 100, gauge.clone(), memory.empty(flowgate_memory::Component::Ingest));
        a.grow_to(100).await.unwrap();
        let mut b = Charge::new(budget.clone(), 100, gauge.clone(), memory.empty(flowgate_memory::Component::Ingest));
        let waiter = tokio::spawn(async move {
            b.grow_to(30).await.unwrap();
            b.held()
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.shrink_to(70);
        assert_eq!(waiter.await.unwrap(), 30);
    }
}
