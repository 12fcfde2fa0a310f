//! One task for an HTTP/2 client connection, its dispatcher and its requests' futures.
//!
//! Why: hyper's HTTP/2 client runs the connection, the dispatcher that takes requests from
//! `SendRequest`, and a future per request (waiting for the response, piping the body) as
//! separate tasks when given tokio's executor: a task spawned per request (an allocation, the
//! runtime's task list, a scheduling) and wake-ups across tasks between them. Without them
//! the outbound sidecar ran ≈ 4.8k fewer of its 64k instructions per request, but lost its
//! write batching; with the yield below that brings it back, ≈ 1.7k fewer (callgrind,
//! BENCHMARKS.md "sixth session"). No change in CPU time was measurable.
//!
//! [`ConnExecutor`] is the executor hyper is given instead: it queues the futures, and
//! [`WithStreams`] — the dispatcher's future wrapped — runs them inside one task. Wake-ups
//! between them become flags read in the same poll. When the dispatcher takes new requests the
//! task yields once before the connection writes, so requests that other tasks are handing over
//! at the same time leave in one write, as they did when the writer was a task of its own.
//!
//! Only for HTTP/2 client connections ([`crate::h2_conn`]: to a peer sidecar, and h2c to a local
//! app), whose I/O was one task already. Not for the servers: there hyper's task per stream lets one peer's requests spread over the runtime's
//! threads, and running them in the connection's task saved only ≈ 1.1k of 80k instructions.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;

type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of work one poll does before it yields to the runtime (fairness toward the other
/// connections on the same thread; what is left is picked up on the next poll).
const ROUNDS: usize = 32;

/// The executor given to hyper for one HTTP/2 connection: the futures it would spawn are run by
/// the connection's [`WithStreams`] instead.
#[derive(Clone)]
pub struct ConnExecutor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ConnExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnExecutor").finish_non_exhaustive()
    }
}

struct Shared {
    /// Futures handed over since the connection's task last took them.
    spawned: Mutex<Vec<Spawned>>,
    wakes: Wakes,
}

/// What woke the connection's task, and whether it is running now.
struct Wakes {
    /// The connection future itself asked to be polled.
    conn: AtomicBool,
    /// A stream future asked to be polled, or a new one was handed over.
    streams: AtomicBool,
    /// Inside [`WithStreams::poll`]: a wake-up only needs its flag, the loop reads it.
    polling: AtomicBool,
    /// The task that runs the connection.
    task: AtomicWaker,
}

impl Wakes {
    fn set(&self, flag: &AtomicBool) {
        flag.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.task.wake();
        }
    }
}

/// Wakes the connection's task, for the connection future (`conn`) or for its streams.
struct FlagWaker {
    shared: Arc<Shared>,
    conn: bool,
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        let wakes = &self.shared.wakes;
        wakes.set(if self.conn {
            &wakes.conn
        } else {
            &wakes.streams
        });
    }
}

impl ConnExecutor {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                spawned: Mutex::new(Vec::new()),
                wakes: Wakes {
                    // The first poll looks at everything.
                    conn: AtomicBool::new(true),
                    streams: AtomicBool::new(true),
                    polling: AtomicBool::new(false),
                    task: AtomicWaker::new(),
                },
            }),
        }
    }

    /// `conn` (the client's dispatcher), run together with every future hyper hands this
    /// executor.
    pub fn run<C: Future>(&self, conn: C) -> WithStreams<C> {
        self.with(conn, true)
    }

    /// Without the yield before the writer: for the unit tests of the wake-up logic alone.
    #[cfg(test)]
    fn run_unbatched<C: Future>(&self, conn: C) -> WithStreams<C> {
        self.with(conn, false)
    }

    fn with<C: Future>(&self, conn: C, batch: bool) -> WithStreams<C> {
        let waker = |conn| {
            Waker::from(Arc::new(FlagWaker {
                shared: self.shared.clone(),
                conn,
            }))
        };
        WithStreams {
            batch,
            deferred: false,
            conn,
            output: None,
            running: FuturesUnordered::new(),
            handed: Vec::new(),
            conn_waker: waker(true),
            streams_waker: waker(false),
            shared: self.shared.clone(),
        }
    }
}

impl Default for ConnExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl<F> hyper::rt::Executor<F> for ConnExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.shared
            .spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::pin(fut));
        self.shared.wakes.set(&self.shared.wakes.streams);
    }
}

pin_project_lite::pin_project! {
    /// A connection future and the futures its [`ConnExecutor`] was handed, run in one task.
    /// Ends with the connection's output once the connection and every stream have ended.
    pub struct WithStreams<C: Future> {
        // Yield once after the connection took requests (see `run`).
        batch: bool,
        // This poll comes after such a yield: run everything.
        deferred: bool,
        #[pin]
        conn: C,
        output: Option<C::Output>,
        running: FuturesUnordered<Spawned>,
        // Swapped with `Shared::spawned` to take the handed-over futures: no allocation per
        // batch.
        handed: Vec<Spawned>,
        conn_waker: Waker,
        streams_waker: Waker,
        shared: Arc<Shared>,
    }
}

impl<C: Future> Future for WithStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        let wakes = &this.shared.wakes;
        wakes.task.register(cx.waker());
        wakes.polling.store(true, SeqCst);
        // The connection, unless it ended; its output kept until the streams end too.
        let poll_conn = |conn: Pin<&mut C>, output: &mut Option<C::Output>| {
            if output.is_none()
                && let Poll::Ready(out) = conn.poll(&mut Context::from_waker(this.conn_waker))
            {
                *output = Some(out);
            }
        };
        if *this.batch && !std::mem::take(this.deferred) && wakes.conn.swap(false, SeqCst) {
            poll_conn(this.conn.as_mut(), this.output);
            // Back of the run queue: the tasks already woken hand over their requests first.
            *this.deferred = true;
            wakes.polling.store(false, SeqCst);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        for _ in 0..ROUNDS {
            if wakes.conn.swap(false, SeqCst) {
                poll_conn(this.conn.as_mut(), this.output);
            }
            if wakes.streams.swap(false, SeqCst) {
                std::mem::swap(
                    this.handed,
                    &mut *this
                        .shared
                        .spawned
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()),
                );
                this.running.extend(this.handed.drain(..));
                let mut streams_cx = Context::from_waker(this.streams_waker);
                while let Poll::Ready(Some(())) = this.running.poll_next_unpin(&mut streams_cx) {}
            }
            if this.output.is_some() && this.running.is_empty() && !wakes.streams.load(SeqCst) {
                wakes.polling.store(false, SeqCst);
                return Poll::Ready(this.output.take().expect("checked above"));
            }
            if !wakes.conn.load(SeqCst) && !wakes.streams.load(SeqCst) {
                // Leave polling mode, then look once more: a wake-up that saw `polling` set
                // before it was cleared only left its flag.
                wakes.polling.store(false, SeqCst);
                if !wakes.conn.load(SeqCst) && !wakes.streams.load(SeqCst) {
                    return Poll::Pending;
                }
                wakes.polling.store(true, SeqCst);
            }
        }
        wakes.polling.store(false, SeqCst);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    /// Futures handed to the executor run, and finish, before the wrapped connection's output
    /// is returned; wake-ups between them (here oneshot channels both ways) are not lost.
    #[tokio::test]
    async fn streams_run_with_the_connection_and_are_awaited() {
        let exec = ConnExecutor::new();
        let (to_stream, from_conn) = oneshot::channel::<u32>();
        let (to_conn, mut from_stream) = oneshot::channel::<u32>();
        let (done_tx, done_rx) = oneshot::channel::<u32>();
        let spawner = exec.clone();
        let mut handover = Some((to_stream, from_conn, to_conn, done_tx));
        // The "connection": hands over a stream, sends it a request, waits for its answer.
        let conn = std::future::poll_fn(move |cx| {
            if let Some((to_stream, from_conn, to_conn, done)) = handover.take() {
                spawner.execute(async move {
                    let request = from_conn.await.expect("the connection sent a request");
                    to_conn.send(request + 1).expect("the connection listens");
                    tokio::task::yield_now().await;
                    done.send(request + 2).expect("the test listens");
                });
                to_stream.send(41).unwrap();
            }
            Pin::new(&mut from_stream).poll(cx).map(|r| r.unwrap())
        });
        let answer = exec.run(conn).await;
        assert_eq!(answer, 42);
        // The stream future finished before `run` returned.
        assert_eq!(done_rx.await.unwrap(), 43);
    }

    /// A wake-up from another thread while the connection's task is parked reaches it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_from_another_thread_is_not_lost() {
        for round in 0..200 {
            let exec = ConnExecutor::new();
            let (tx, rx) = oneshot::channel::<()>();
            let (stream_tx, stream_rx) = oneshot::channel::<()>();
            exec.execute(async move {
                stream_rx.await.unwrap();
            });
            let sender = std::thread::spawn(move || {
                tx.send(()).unwrap();
                stream_tx.send(()).unwrap();
            });
            let conn = async { rx.await.unwrap() };
            let result = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                // Both with and without the yield after the connection takes requests.
                if round % 2 == 0 {
                    exec.run(conn)
                } else {
                    exec.run_unbatched(conn)
                },
            )
            .await;
            sender.join().unwrap();
            assert!(
                result.is_ok(),
                "a wake-up was lost: the connection never finished"
            );
        }
    }

    /// A stream that is always ready again cannot hold the thread: the connection's task yields,
    /// and another task on a single-threaded runtime gets to run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_busy_stream_does_not_starve_the_thread() {
        let exec = ConnExecutor::new();
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = stop.clone();
        exec.execute(std::future::poll_fn(move |cx| {
            if spinning.load(SeqCst) {
                return Poll::Ready(());
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        }));
        let conn = tokio::spawn(exec.run(std::future::ready(())));
        let other = tokio::spawn(async move {
            stop.store(true, SeqCst);
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), other)
            .await
            .expect("the other task never ran")
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), conn)
            .await
            .expect("the connection never finished")
            .unwrap();
    }
}
