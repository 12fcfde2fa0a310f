//! One retry pacing for everything that retries: a failing `accept()`, a CA that cannot be
//! reached, a control-plane stream that broke. Exponential, capped, and jittered — each pause
//! is between half and all of the current step — so a fleet of sidecars that lost the same CA
//! or control plane does not come back in lockstep, and a listener out of file descriptors
//! never spins a core.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Exponential backoff with jitter (see the module docs).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

/// A failing accept: first retry after 10 ms, doubled per failure up to 1 s.
const ACCEPT_MIN: Duration = Duration::from_millis(10);
const ACCEPT_MAX: Duration = Duration::from_secs(1);

impl Backoff {
    /// Steps from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let min = min.max(Duration::from_millis(1));
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// For a listener whose `accept()` fails (EMFILE/ENFILE: out of file descriptors).
    pub fn for_accept() -> Self {
        Self::new(ACCEPT_MIN, ACCEPT_MAX)
    }

    /// After a success: the next failure waits the shortest step again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The pause before the next attempt (between half and all of the current step), then the
    /// step doubles.
    pub fn pause(&mut self) -> Duration {
        let mut random = [0u8; 4];
        crate::tls::random_bytes(&mut random);
        let fraction = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
        let pause = self.next.mul_f64(0.5 + fraction / 2.0);
        self.next = (self.next * 2).min(self.max);
        pause
    }

    /// The next connection of `listener`. An accept error is logged (with the usual fix) and
    /// retried after [`Backoff::pause`], so a loop over this never spins; a success resets the
    /// pacing. Every listener without its own admission control accepts through this.
    pub async fn accept(&mut self, listener: &TcpListener, name: &str) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.reset();
                    return accepted;
                }
                Err(e) => {
                    let pause = self.pause();
                    tracing::warn!(
                        event = "listener.accept_failed",
                        listener = name,
                        error = %e,
                        retry_in_ms = pause.as_millis() as u64,
                        "cannot accept connections; if the error is \"too many open files\", raise `ulimit -n`"
                    );
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_is_capped_and_resets() {
        let mut b = Backoff::for_accept();
        let first = b.pause();
        assert!(first >= ACCEPT_MIN / 2 && first <= ACCEPT_MIN, "{first:?}");
        let pauses: Vec<Duration> = (0..20).map(|_| b.pause()).collect();
        assert!(pauses.iter().all(|p| *p <= ACCEPT_MAX), "{pauses:?}");
        assert!(pauses[19] >= ACCEPT_MAX / 2, "reaches the cap: {pauses:?}");
        b.reset();
        assert!(b.pause() <= ACCEPT_MIN);
    }

    #[test]
    fn pauses_are_jittered() {
        let mut pauses = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            pauses.insert(b.pause());
        }
        assert!(
            pauses.len() > 10,
            "50 fresh backoffs gave only {} distinct pauses",
            pauses.len()
        );
    }

    #[tokio::test]
    async fn accept_returns_a_connection_and_resets() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut b = Backoff::for_accept();
        b.pause();
        b.pause();
        let client = tokio::spawn(async move { TcpStream::connect(addr).await.unwrap() });
        let (_server, peer) = b.accept(&listener, "test").await;
        let client = client.await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(b.pause() <= ACCEPT_MIN, "a success resets the pacing");
    }
}
