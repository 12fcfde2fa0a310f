//! The log writer: lines gathered in memory and written to stderr in batches by one thread.
//!
//! At the default level a sidecar logs one decision line per request. Written by the request's
//! thread, each line was a `write(2)` on the request path (14 % of saturation throughput).
//! tracing-appender's non-blocking writer moved the write to a thread but still made one
//! allocation, one channel send, one wake-up of that thread and one `write(2)` per line: kernel
//! time that instruction counts do not show, on the core the sidecar shares with its app.
//!
//! [`LogWriter`] appends each line to a shared buffer under a mutex (a copy, no allocation once
//! the buffer has grown). Its thread writes at most once per [`Limits::flush_every`]: a line
//! after a quiet spell is written at once (a person or script reading the log sees it as
//! before), and lines that follow within `flush_every` of a write gather until it is over or
//! [`Limits::batch`] bytes are pending, then leave with one call. At saturation that is one
//! `write(2)` and one wake-up per hundred or more lines instead of one per line.
//!
//! Lines are never dropped and never split. When [`Limits::cap`] bytes are pending (stderr is
//! slower than the logging), loggers wait for the writer: memory stays bounded and the log
//! stays complete. A failing stderr (closed pipe) discards lines rather than blocking loggers.
//! The [`Guard`] returned with the writer writes what is pending when dropped (end of `main`).

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// When the writer thread writes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The shortest time between two writes, and so the longest a line waits in memory.
    pub flush_every: Duration,
    /// Pending bytes that are written at once, without waiting for `flush_every`.
    pub batch: usize,
    /// Pending bytes at which loggers wait for the writer.
    pub cap: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_millis(10),
            batch: 64 * 1024,
            cap: 2 * 1024 * 1024,
        }
    }
}

/// Hands lines to the writer thread; a `MakeWriter` for tracing-subscriber (the fmt layer
/// writes each event with one `write_all`, so a line arrives whole).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer: the first pending line, a full batch, closing.
    to_writer: Condvar,
    /// Wakes loggers waiting at the cap.
    to_loggers: Condvar,
    limits: Limits,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A logger that panicked mid-append left whole lines before it: keep logging.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Writes the pending lines when dropped and stops the writer thread.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogWriter {
    /// Starts the writer thread (`meshgate-log`) writing to `out`.
    pub fn spawn<W: Write + Send + 'static>(out: W, limits: Limits) -> (LogWriter, Guard) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            to_writer: Condvar::new(),
            to_loggers: Condvar::new(),
            limits,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("meshgate-log".into())
                .spawn(move || write_batches(&shared, out))
                .expect("cannot start the log writer thread")
        };
        (
            LogWriter {
                shared: shared.clone(),
            },
            Guard {
                shared,
                thread: Some(thread),
            },
        )
    }
}

/// The writer thread: waits for a line; unless `flush_every` has passed since the last write,
/// gathers until it has (or a batch fills); writes everything pending with one call; until
/// closed and drained.
fn write_batches<W: Write>(shared: &Shared, mut out: W) {
    let limits = shared.limits;
    let mut batch = Vec::new();
    let mut out_failed = false;
    let mut last_write: Option<Instant> = None;
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && !state.closing {
            state = shared
                .to_writer
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        if state.pending.is_empty() {
            return; // closing, nothing left
        }
        let deadline = last_write.map_or_else(Instant::now, |at| at + limits.flush_every);
        while !state.closing && state.pending.len() < limits.batch {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = shared
                .to_writer
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        std::mem::swap(&mut state.pending, &mut batch);
        drop(state);
        last_write = Some(Instant::now());
        shared.to_loggers.notify_all();
        if !out_failed {
            // Nowhere left to report a failing stderr: stop writing, keep loggers moving.
            out_failed = out.write_all(&batch).and_then(|()| out.flush()).is_err();
        }
        batch.clear();
        // A burst (a long stall of stderr) must not keep its buffer for good.
        if batch.capacity() > 2 * limits.batch {
            batch.shrink_to(limits.batch);
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = &*self.shared;
        let mut state = shared.lock();
        while state.pending.len() >= shared.limits.cap && !state.closing {
            state = shared
                .to_loggers
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        let after = state.pending.len();
        drop(state);
        // One wake-up per batch, not per line: when the first line arrives, and when a batch
        // fills while the writer is gathering.
        if before == 0 || (before < shared.limits.batch && after >= shared.limits.batch) {
            shared.to_writer.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.to_writer.notify_one();
        self.shared.to_loggers.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that records each `write` call (one call = one batch) and can be held shut.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        gate: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Recorder {
        fn hold(&self, held: bool) {
            *self.gate.0.lock().unwrap() = held;
            self.gate.1.notify_all();
        }
        fn bytes(&self) -> Vec<u8> {
            self.writes.lock().unwrap().concat()
        }
        fn calls(&self) -> usize {
            self.writes.lock().unwrap().len()
        }
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut held = self.gate.0.lock().unwrap();
            while *held {
                held = self.gate.1.wait(held).unwrap();
            }
            self.writes.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(thread: usize, i: usize) -> String {
        format!("thread={thread} line={i} {}\n", "x".repeat(100))
    }

    /// Every line from every thread arrives, whole and in each thread's order, and a burst is
    /// written in a few calls rather than one per line.
    #[test]
    fn lines_arrive_whole_in_order_and_in_batches() {
        let out = Recorder::default();
        let (writer, guard) = LogWriter::spawn(
            out.clone(),
            Limits {
                flush_every: Duration::from_secs(5),
                batch: 16 * 1024,
                cap: 1024 * 1024,
            },
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        (&writer).write_all(line(t, i).as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(out.bytes()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4000, "lines lost or split");
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread={t} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| line(t, i)).collect();
            let expected: Vec<&str> = expected.iter().map(|l| l.trim_end()).collect();
            assert_eq!(mine, expected, "thread {t}'s lines out of order or altered");
        }
        // 4000 lines of ~120 bytes = ~480 KB in batches of 16 KiB: ~30 writes, not 4000.
        assert!(
            out.calls() <= 100,
            "{} writes for 4000 lines: the writer is not batching",
            out.calls()
        );
    }

    /// A line after a quiet spell is written at once, not after `flush_every` and not when a
    /// batch fills; a line right after it waits for the interval.
    #[test]
    fn a_line_at_rest_is_written_at_once_and_the_next_one_waits() {
        let out = Recorder::default();
        let (writer, guard) = LogWriter::spawn(
            out.clone(),
            Limits {
                flush_every: Duration::from_secs(30),
                ..Limits::default()
            },
        );
        (&writer).write_all(b"one line\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.bytes().is_empty() {
            assert!(
                Instant::now() < deadline,
                "a line at rest waited for the flush interval"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.bytes(), b"one line\n");
        (&writer).write_all(b"two\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            out.calls(),
            1,
            "the second line did not wait for the interval"
        );
        drop(guard);
        assert_eq!(
            out.bytes(),
            b"one line\ntwo\n",
            "the guard did not write what was pending"
        );
    }

    /// With stderr stuck, memory stops at the cap: the logger waits instead of growing the
    /// buffer or dropping lines, and everything arrives once stderr moves again.
    #[test]
    fn loggers_wait_at_the_cap_and_lose_nothing() {
        let out = Recorder::default();
        out.hold(true);
        let (writer, guard) = LogWriter::spawn(
            out.clone(),
            Limits {
                flush_every: Duration::from_millis(1),
                batch: 1024,
                cap: 4096,
            },
        );
        let (progress_tx, progress) = mpsc::channel();
        let logger = {
            let writer = writer.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    (&writer).write_all(line(0, i).as_bytes()).unwrap();
                    progress_tx.send(i).unwrap();
                }
            })
        };
        // The writer thread holds one batch (stuck in `write`), the buffer takes up to the cap:
        // the logger must stall well before 200 lines of ~120 bytes.
        let mut written = 0;
        while let Ok(i) = progress.recv_timeout(Duration::from_millis(500)) {
            written = i + 1;
        }
        assert!(
            written < 100,
            "{written} lines accepted while stderr was stuck: the buffer is not capped"
        );
        {
            let state = writer.shared.lock();
            assert!(state.pending.len() <= 4096 + 200, "pending beyond the cap");
        }
        out.hold(false);
        logger.join().unwrap();
        drop(guard);
        let text = String::from_utf8(out.bytes()).unwrap();
        assert_eq!(text.lines().count(), 200, "lines lost");
    }
}
