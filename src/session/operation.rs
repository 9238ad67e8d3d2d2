//! One completion handle for every call that may wait (a publish's acknowledgement, a subscription's
//! grant, a close, a batch, the rows of a frame): an `Operation` is a future that either the caller
//! drives to the end on its own thread (`wait`: the sync call style), or that runs on the network
//! runtime and announces its end on a `Completions` list (`start`: the async call style). The list
//! rings one doorbell descriptor when it turns non-empty, so an event loop in another runtime
//! (Python's asyncio) watches one descriptor for all of a session's operations, and a burst of
//! completions costs it one wake-up, not one per operation. No thread of ours enters that runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

enum Stage<T> {
    /// Not started: the future, for whoever runs it first.
    Idle(BoxFuture<T>),
    /// A `wait` or a started task runs it now.
    Running,
    /// Finished: the value, for whoever takes it first.
    Done(T),
    /// The value was taken.
    Taken,
}

struct State<T> {
    stage: Stage<T>,
    /// Where to announce the end (set by `start`).
    announce: Option<Arc<Completions>>,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    finished: Notify,
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores the value of a finished run: announced when the operation was started for an event
    /// loop, else handed back to the one who ran it.
    fn finish(&self, id: u64, value: T) -> Option<T> {
        let mut state = self.lock();
        let Some(completions) = state.announce.clone() else {
            state.stage = Stage::Taken;
            drop(state);
            self.finished.notify_waiters();
            return Some(value);
        };
        state.stage = Stage::Done(value);
        drop(state);
        self.finished.notify_waiters();
        completions.announce(id);
        None
    }
}

/// A call's completion: waited on by the caller, or started and announced.
pub struct Operation<T> {
    id: u64,
    inner: Arc<Inner<T>>,
}

impl<T: Send + 'static> std::fmt::Debug for Operation<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operation")
            .field("id", &self.id)
            .field("done", &self.is_done())
            .finish_non_exhaustive()
    }
}

/// Puts the future back when a `wait` is dropped before it finished (a timeout, Ctrl-C), so that a
/// later `wait` or `start` goes on with it.
struct Driving<T: Send + 'static> {
    id: u64,
    inner: Arc<Inner<T>>,
    future: Option<BoxFuture<T>>,
}

impl<T: Send + 'static> Drop for Driving<T> {
    fn drop(&mut self) {
        if let Some(future) = self.future.take() {
            let mut state = self.inner.lock();
            if state.announce.is_some() {
                // Started meanwhile: the runtime takes it over.
                drop(state);
                spawn(self.id, Arc::clone(&self.inner), future);
            } else {
                state.stage = Stage::Idle(future);
                drop(state);
                self.inner.finished.notify_waiters();
            }
        }
    }
}

/// `future`'s value, or `on_panic`'s for the panic it raised (then it is not polled again).
struct CatchPanic<T> {
    future: BoxFuture<T>,
    on_panic: fn(String) -> T,
}

impl<T> Future for CatchPanic<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let this = &mut *self;
        let future = &mut this.future;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                log::error!(
                    "an operation failed on a bug in capture-mqtt (please report it): {message}"
                );
                std::task::Poll::Ready((this.on_panic)(message))
            }
        }
    }
}

fn spawn<T: Send + 'static>(id: u64, inner: Arc<Inner<T>>, future: BoxFuture<T>) {
    super::runtime().spawn(async move {
        let value = future.await;
        inner.finish(id, value);
    });
}

impl<T: Send + 'static> Operation<T> {
    /// Its number on its `Completions` list.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether it finished (its value may have been taken).
    pub fn is_done(&self) -> bool {
        matches!(self.inner.lock().stage, Stage::Done(_) | Stage::Taken)
    }

    /// The value when it finished and nobody took it yet.
    pub fn take(&self) -> Option<T> {
        let mut state = self.inner.lock();
        match std::mem::replace(&mut state.stage, Stage::Taken) {
            Stage::Done(value) => Some(value),
            other => {
                state.stage = other;
                None
            }
        }
    }

    /// Runs it to the end on the caller's task and returns its value; None when another caller
    /// took the value. Cancel-safe: dropped early, the operation stays pending.
    pub async fn wait(&self) -> Option<T> {
        loop {
            let finished = self.inner.finished.notified();
            let taken = {
                let mut state = self.inner.lock();
                match std::mem::replace(&mut state.stage, Stage::Running) {
                    Stage::Idle(future) => Some(future),
                    Stage::Done(value) => {
                        state.stage = Stage::Taken;
                        return Some(value);
                    }
                    Stage::Taken => {
                        state.stage = Stage::Taken;
                        return None;
                    }
                    Stage::Running => None,
                }
            };
            let Some(future) = taken else {
                finished.await; // another caller runs it
                continue;
            };
            let mut driving = Driving {
                id: self.id,
                inner: Arc::clone(&self.inner),
                future: Some(future),
            };
            let value = match driving.future.as_mut() {
                Some(future) => future.await,
                None => unreachable!("the future is set just above"),
            };
            driving.future = None;
            if let Some(value) = self.inner.finish(self.id, value) {
                return Some(value);
            }
            // Started for an event loop meanwhile: the value was announced there; go on waiting
            // for it like any other caller.
        }
    }

    /// Runs it in the background on the network runtime; its id is announced on `completions` when
    /// it finished (at once if it already has).
    pub fn start(&self, completions: &Arc<Completions>) {
        let mut state = self.inner.lock();
        state.announce = Some(Arc::clone(completions));
        match std::mem::replace(&mut state.stage, Stage::Running) {
            Stage::Idle(future) => {
                drop(state);
                spawn(self.id, Arc::clone(&self.inner), future);
            }
            Stage::Running => {} // a `wait` runs it, and announces its end
            done @ (Stage::Done(_) | Stage::Taken) => {
                state.stage = done;
                drop(state);
                completions.announce(self.id);
            }
        }
    }
}

/// A session's list of finished operations, and the doorbell that rings when it turns non-empty.
#[derive(Debug, Default)]
pub struct Completions {
    ready: Mutex<Vec<u64>>,
    next: AtomicU64,
    #[cfg(unix)]
    bell: std::sync::OnceLock<std::io::Result<super::queue::Doorbell>>,
}

impl Completions {
    pub fn new() -> Arc<Completions> {
        Arc::new(Completions::default())
    }

    /// An operation that runs `future` when waited on or started.
    pub fn operation<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Operation<T> {
        self.make(Stage::Idle(Box::pin(future)))
    }

    /// Like `operation`, but a panic in `future` (a bug) finishes the operation with
    /// `on_panic(message)`, logged as an error. A started operation runs in a task of its own, whose
    /// panic would otherwise end only that task and leave the operation pending for ever.
    pub fn operation_or<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
        on_panic: fn(String) -> T,
    ) -> Operation<T> {
        self.make(Stage::Idle(Box::pin(CatchPanic {
            future: Box::pin(future),
            on_panic,
        })))
    }

    /// An operation that already finished with `value` (nothing to wait for).
    pub fn finished<T: Send + 'static>(&self, value: T) -> Operation<T> {
        self.make(Stage::Done(value))
    }

    fn make<T>(&self, stage: Stage<T>) -> Operation<T> {
        Operation {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    stage,
                    announce: None,
                }),
                finished: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u64>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn announce(&self, id: u64) {
        let mut ready = self.lock();
        let ring = ready.is_empty();
        ready.push(id);
        drop(ready);
        #[cfg(unix)]
        if ring {
            if let Some(Ok(bell)) = self.bell.get() {
                bell.ring_now();
            }
        }
        #[cfg(not(unix))]
        let _ = ring;
    }

    /// The ids announced since the last call, oldest first. Take them after emptying the doorbell:
    /// an id announced later rings it again.
    pub fn take_ready(&self) -> Vec<u64> {
        std::mem::take(&mut *self.lock())
    }

    /// The doorbell, made on first use; it rings whenever the list turns non-empty.
    ///
    /// # Errors
    /// When the system refuses a socket pair.
    #[cfg(unix)]
    pub fn bell(&self) -> Result<&super::queue::Doorbell, String> {
        let fresh = self.bell.get().is_none();
        let bell = self
            .bell
            .get_or_init(super::queue::Doorbell::new)
            .as_ref()
            .map_err(|e| format!("could not make the client's wake-up socket: {e}"))?;
        if fresh && !self.lock().is_empty() {
            bell.ring_now(); // announced before the bell existed: ring for those
        }
        Ok(bell)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn run<T>(future: impl Future<Output = T>) -> T {
        super::super::runtime().block_on(future)
    }

    #[test]
    fn a_waited_operation_returns_its_value_once() {
        let completions = Completions::new();
        let op = completions.operation(async { 7 });
        assert!(!op.is_done());
        assert_eq!(run(op.wait()), Some(7));
        assert!(op.is_done());
        assert_eq!(run(op.wait()), None);
        assert!(
            completions.take_ready().is_empty(),
            "a wait announces nothing"
        );
    }

    #[test]
    fn a_panic_fails_its_operation_instead_of_leaving_it_pending() {
        let completions = Completions::new();
        let failing = |message: String| -> Result<u8, String> { Err(message) };
        // Waited on by the caller, and started in a task of its own (where a panic would end only
        // the task): both finish, with the panic's message.
        let waited = completions.operation_or(async { panic!("waited") }, failing);
        assert_eq!(run(waited.wait()), Some(Err("waited".to_owned())));
        let started = completions.operation_or(
            async {
                tokio::task::yield_now().await;
                panic!("started {}", 1)
            },
            failing,
        );
        started.start(&completions);
        let value = run(async {
            tokio::time::timeout(Duration::from_secs(10), started.wait())
                .await
                .expect("the started operation finished")
        });
        assert_eq!(value, Some(Err("started 1".to_owned())));
        assert_eq!(completions.take_ready(), vec![started.id()]);
        let fine = completions.operation_or(async { Ok(3) }, failing);
        assert_eq!(run(fine.wait()), Some(Ok(3)));
    }

    #[test]
    fn a_timed_out_wait_leaves_the_operation_pending() {
        let completions = Completions::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let op = completions.operation(async move { rx.await.unwrap_or(0) });
        let early = run(async { tokio::time::timeout(Duration::from_millis(20), op.wait()).await });
        assert!(early.is_err());
        assert!(!op.is_done());
        tx.send(5).unwrap();
        assert_eq!(run(op.wait()), Some(5));
    }

    #[cfg(unix)]
    #[test]
    fn started_operations_are_announced_with_one_ring_per_burst() {
        use std::io::Read;
        let completions = Completions::new();
        let bell = completions.bell().unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let ops: Vec<_> = (0..100)
            .map(|i| {
                let gate = Arc::clone(&gate);
                completions.operation(async move {
                    let _permit = gate.acquire().await;
                    i
                })
            })
            .collect();
        for op in &ops {
            op.start(&completions);
        }
        assert!(completions.take_ready().is_empty());
        gate.add_permits(100);
        run(async {
            while ops.iter().any(|op| !op.is_done()) {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut rung = [0u8; 256];
        let n = (&bell_listener(bell)).read(&mut rung).unwrap();
        assert_eq!(n, 1, "one ring for the burst, not one per operation");
        let mut ready = completions.take_ready();
        ready.sort_unstable();
        assert_eq!(ready, ops.iter().map(Operation::id).collect::<Vec<_>>());
        let values: Vec<_> = ops.iter().map(|op| op.take().unwrap()).collect();
        assert_eq!(values, (0..100).collect::<Vec<_>>());
        // An operation started after it finished is announced at once.
        let done = completions.finished("ok");
        done.start(&completions);
        assert_eq!(completions.take_ready(), vec![done.id()]);
    }

    #[cfg(unix)]
    fn bell_listener(bell: &super::super::queue::Doorbell) -> std::fs::File {
        use std::os::fd::BorrowedFd;
        // SAFETY: the descriptor is open for the test's length; the duplicate is closed on drop.
        let fd = unsafe { BorrowedFd::borrow_raw(bell.fd()) };
        std::fs::File::from(fd.try_clone_to_owned().unwrap())
    }
}
