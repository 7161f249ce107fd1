//! Cross-thread wake-ups without locks: a one-shot cell and a broadcast notifier.
//! The control plane (tokio) and other workers wake monoio tasks through these.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

/// Fires once; the waiting task is woken from any thread.
#[derive(Debug, Default)]
pub struct WaitCell {
    fired: AtomicBool,
    waker: AtomicWaker,
}

impl WaitCell {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    pub fn wait(self: &Arc<Self>) -> CellFuture {
        CellFuture { cell: self.clone() }
    }
}

pub struct CellFuture {
    cell: Arc<WaitCell>,
}

impl Future for CellFuture {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.cell.is_fired() {
            return Poll::Ready(());
        }
        self.cell.waker.register(cx.waker());
        // Re-check after registering, so a fire between the check and the register is seen.
        if self.cell.is_fired() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// Wakes every task that subscribed before `notify_all`. A waiter subscribes, then
/// re-checks its condition, then waits: no notification can fall between the two.
#[derive(Debug, Default)]
pub struct Notifier {
    subscribers: SegQueue<Arc<WaitCell>>,
}

impl Notifier {
    pub fn subscribe(&self) -> Arc<WaitCell> {
        let cell = Arc::new(WaitCell::default());
        self.subscribers.push(cell.clone());
        cell
    }

    pub fn notify_all(&self) {
        // Only drain what is there now; later subscribers re-check the condition themselves.
        let mut remaining = self.subscribers.len();
        while remaining > 0 {
            match self.subscribers.pop() {
                Some(cell) => cell.fire(),
                None => break,
            }
            remaining -= 1;
        }
    }
}
