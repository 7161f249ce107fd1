//! Per-model admission without locks: at most `max_concurrent` requests in flight, at most
//! `max_queue_size` waiting, slots handed FIFO across cores through a lock-free queue.
//!
//! The counters only move through `SlotGuard` and `QueuedSlot`, whose `Drop` gives back what
//! they hold, so every exit path (success, error, timeout, client gone, task dropped) returns
//! them to zero.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;

#[derive(Debug, Default)]
struct SlotWaiter {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl SlotWaiter {
    /// Exactly one of `grant` and `cancel` succeeds for each waiter.
    fn grant(&self) -> bool {
        self.state
            .compare_exchange(WAITING, GRANTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn cancel(&self) -> bool {
        self.state
            .compare_exchange(WAITING, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

#[derive(Debug, Default)]
pub struct Admission {
    in_flight: AtomicUsize,
    queued: AtomicUsize,
    waiters: SegQueue<Arc<SlotWaiter>>,
}

/// The outcome of asking for a slot.
pub enum Acquire<'a> {
    Granted(SlotGuard<'a>),
    Queued(QueuedSlot<'a>),
    Full { queued: usize },
}

impl Admission {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Step 1 and 2 of the contract: a free slot now, a place in the queue, or full.
    pub fn acquire(&self, max_concurrent: usize, max_queue_size: usize) -> Acquire<'_> {
        // Only take a slot directly when nobody is waiting: slots go FIFO.
        if self.queued.load(Ordering::SeqCst) == 0 && self.reserve(max_concurrent) {
            return Acquire::Granted(SlotGuard {
                admission: self,
                max_concurrent,
            });
        }
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        if before >= max_queue_size {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Acquire::Full { queued: before };
        }
        let waiter = Arc::new(SlotWaiter::default());
        self.waiters.push(waiter.clone());
        fence(Ordering::SeqCst);
        // A slot may have been freed before we were visible in the queue.
        self.dispatch(max_concurrent);
        Acquire::Queued(QueuedSlot {
            admission: self,
            waiter,
            max_concurrent,
            done: false,
        })
    }

    /// Count a request as queued before it may even ask for a slot (a cold start).
    /// The returned guard undoes it on drop.
    pub fn hold_queue_place(&self, max_queue_size: usize) -> Result<QueuePlace<'_>, usize> {
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        if before >= max_queue_size {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(before);
        }
        Ok(QueuePlace { admission: self })
    }

    fn reserve(&self, max_concurrent: usize) -> bool {
        let mut current = self.in_flight.load(Ordering::SeqCst);
        while current < max_concurrent {
            match self.in_flight.compare_exchange_weak(
                current,
                current + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
        false
    }

    /// Hand the slot we hold to the first live waiter. True if one took it.
    fn hand_off(&self) -> bool {
        while let Some(waiter) = self.waiters.pop() {
            if waiter.grant() {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                waiter.waker.wake();
                return true;
            }
            // Cancelled waiters already took themselves off `queued`.
        }
        false
    }

    fn release(&self, max_concurrent: usize) {
        if self.hand_off() {
            return;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // A waiter may have queued itself after our hand_off looked.
        self.dispatch(max_concurrent);
    }

    /// While there are waiters and free slots, grant slots.
    fn dispatch(&self, max_concurrent: usize) {
        while !self.waiters.is_empty() {
            if !self.reserve(max_concurrent) {
                return;
            }
            if !self.hand_off() {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
            }
        }
    }
}

/// One in-flight slot. Dropping it releases the slot, to the next waiter if there is one.
#[must_use]
pub struct SlotGuard<'a> {
    admission: &'a Admission,
    max_concurrent: usize,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.admission.release(self.max_concurrent);
    }
}

/// A place in the queue; resolves to a slot. Dropping it before then leaves the queue.
#[must_use]
pub struct QueuedSlot<'a> {
    admission: &'a Admission,
    waiter: Arc<SlotWaiter>,
    max_concurrent: usize,
    done: bool,
}

impl<'a> Future for QueuedSlot<'a> {
    type Output = SlotGuard<'a>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SlotGuard<'a>> {
        if self.waiter.state.load(Ordering::Acquire) != GRANTED {
            self.waiter.waker.register(cx.waker());
            if self.waiter.state.load(Ordering::Acquire) != GRANTED {
                return Poll::Pending;
            }
        }
        self.done = true;
        Poll::Ready(SlotGuard {
            admission: self.admission,
            max_concurrent: self.max_concurrent,
        })
    }
}

impl Drop for QueuedSlot<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.waiter.cancel() {
            self.admission.queued.fetch_sub(1, Ordering::SeqCst);
        } else {
            // Granted between our last poll and now: the slot is ours, so pass it on.
            self.admission.release(self.max_concurrent);
        }
    }
}

/// A queue place held while waiting for something other than a slot (a model to start).
#[must_use]
pub struct QueuePlace<'a> {
    admission: &'a Admission,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::task::{Wake, Waker};

    struct NoopWake;
    impl Wake for NoopWake {
        fn wake(self: Arc<Self>) {}
    }

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let waker = Waker::from(Arc::new(NoopWake));
        let mut cx = Context::from_waker(&waker);
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn grants_up_to_max_then_queues_then_rejects() {
        let adm = Admission::default();
        let a = adm.acquire(2, 1);
        let b = adm.acquire(2, 1);
        assert!(matches!(a, Acquire::Granted(_)));
        assert!(matches!(b, Acquire::Granted(_)));
        let c = adm.acquire(2, 1);
        assert!(matches!(c, Acquire::Queued(_)));
        assert!(matches!(adm.acquire(2, 1), Acquire::Full { queued: 1 }));
        assert_eq!((adm.in_flight(), adm.queued()), (2, 1));
        drop(a);
        // The slot went straight to the waiter.
        assert_eq!((adm.in_flight(), adm.queued()), (2, 0));
        let Acquire::Queued(mut c) = c else {
            unreachable!()
        };
        let Poll::Ready(guard) = poll_once(&mut c) else {
            panic!("waiter was not granted")
        };
        drop((b, guard, c));
        assert_eq!((adm.in_flight(), adm.queued()), (0, 0));
    }

    #[test]
    fn waiters_are_served_in_order() {
        let adm = Admission::default();
        let first = adm.acquire(1, 10);
        let mut queued: Vec<QueuedSlot> = (0..3)
            .map(|_| match adm.acquire(1, 10) {
                Acquire::Queued(q) => q,
                _ => panic!("expected to queue"),
            })
            .collect();
        drop(first);
        let Poll::Ready(second) = poll_once(&mut queued[0]) else {
            panic!("the first waiter was not served first")
        };
        assert!(poll_once(&mut queued[1]).is_pending());
        assert!(poll_once(&mut queued[2]).is_pending());
        drop(second);
        let Poll::Ready(third) = poll_once(&mut queued[1]) else {
            panic!("the second waiter was not served second")
        };
        assert!(poll_once(&mut queued[2]).is_pending());
        drop(third);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Acquire,
        /// Complete the n-th held slot.
        Complete(usize),
        /// Abort the n-th waiter (timeout or client gone).
        Abort(usize),
        /// Abort the n-th waiter right after it was granted, before it polled.
        AbortAfterGrant(usize),
        Poll,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Acquire),
            2 => (0usize..8).prop_map(Op::Complete),
            1 => (0usize..8).prop_map(Op::Abort),
            1 => (0usize..8).prop_map(Op::AbortAfterGrant),
            2 => Just(Op::Poll),
        ]
    }

    proptest! {
        #[test]
        fn counters_respect_limits_and_return_to_zero(
            max_c in 1usize..4, max_q in 0usize..4, ops in proptest::collection::vec(op(), 1..80)
        ) {
            let adm = Admission::default();
            let mut held: Vec<SlotGuard> = Vec::new();
            let mut waiting: Vec<QueuedSlot> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire => match adm.acquire(max_c, max_q) {
                        Acquire::Granted(g) => held.push(g),
                        Acquire::Queued(q) => waiting.push(q),
                        Acquire::Full { .. } => {}
                    },
                    Op::Complete(i) if !held.is_empty() => drop(held.remove(i % held.len())),
                    Op::Abort(i) | Op::AbortAfterGrant(i) if !waiting.is_empty() => {
                        drop(waiting.remove(i % waiting.len()));
                    }
                    Op::Poll => {
                        let mut still = Vec::new();
                        for mut q in waiting.drain(..) {
                            match poll_once(&mut q) {
                                Poll::Ready(g) => held.push(g),
                                Poll::Pending => still.push(q),
                            }
                        }
                        waiting = still;
                    }
                    _ => {}
                }
                prop_assert!(adm.in_flight() <= max_c);
                prop_assert!(adm.queued() <= max_q);
                // Nobody waits while a slot is free.
                if adm.in_flight() < max_c {
                    prop_assert_eq!(adm.queued(), 0);
                }
            }
            drop(held);
            drop(waiting);
            prop_assert_eq!(adm.in_flight(), 0);
            prop_assert_eq!(adm.queued(), 0);
        }
    }

    #[test]
    fn two_threads_hammering_leave_zero() {
        let adm = Arc::new(Admission::default());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let adm = adm.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000 {
                        match adm.acquire(1, 4) {
                            Acquire::Granted(g) => drop(g),
                            Acquire::Queued(mut q) => {
                                if i % 3 == 0 {
                                    drop(q);
                                    continue;
                                }
                                loop {
                                    if let Poll::Ready(g) = poll_once(&mut q) {
                                        drop(g);
                                        break;
                                    }
                                    std::thread::yield_now();
                                }
                            }
                            Acquire::Full { .. } => {}
                        }
                        assert!(adm.in_flight() <= 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((adm.in_flight(), adm.queued()), (0, 0));
    }
}
