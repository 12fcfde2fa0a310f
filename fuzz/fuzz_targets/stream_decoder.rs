//! The control-plane stream decoder: `LineBuffer` fed the input in fuzzer-chosen chunks returns
//! exactly the lines a plain split of the whole input gives, refuses any line longer than the
//! limit wherever the chunk boundaries fall, and decoding each line as a `Push` or an `Ack` never
//! panics (and what decodes re-encodes to the same value).
//!
//! Input layout: `[limit, n, size_1 .. size_n, payload...]`: the line limit is `limit²` bytes
//! (0..=65025, dense at the small end so that limits are actually hit), the payload is cut into chunks of `size_1`..`size_n`
//! bytes (0 is an empty chunk), and what is left is the last chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshgate_xds::wire::{Ack, LineBuffer, Push};

fuzz_target!(|data: &[u8]| {
    let [limit, n, rest @ ..] = data else {
        return;
    };
    let max = usize::from(*limit).pow(2);
    let n = usize::from(*n).min(rest.len());
    let (sizes, payload) = rest.split_at(n);

    // Reference: the complete lines of the whole payload, and the unterminated tail.
    let mut want: Vec<&[u8]> = payload.split(|b| *b == b'\n').collect();
    let tail = want.pop().expect("split yields at least one piece");
    let within_limit = want.iter().all(|l| l.len() <= max) && tail.len() <= max;

    let mut buffer = LineBuffer::default();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut refused = false;
    let mut at = 0;
    let chunks = sizes
        .iter()
        .map(|s| usize::from(*s))
        .chain(std::iter::once(usize::MAX));
    for size in chunks {
        let end = at + size.min(payload.len() - at);
        match buffer.push(&payload[at..end], max) {
            Ok(lines) => got.extend(lines),
            Err(e) => {
                assert_eq!(e.limit, max, "{e}");
                refused = true;
                break;
            }
        }
        at = end;
    }

    if within_limit {
        assert!(
            !refused,
            "refused although every line is within {max} bytes"
        );
        assert_eq!(got, want);
    } else {
        assert!(refused, "a line longer than {max} bytes was accepted");
        // Before refusing, only whole lines within the limit came out, in order.
        assert!(got.len() <= want.len());
        assert_eq!(got, want[..got.len()]);
        assert!(got.iter().all(|l| l.len() <= max));
    }

    for line in &got {
        if let Ok(push) = serde_json::from_slice::<Push>(line) {
            let again = serde_json::to_vec(&push).expect("a push serializes");
            assert_eq!(
                serde_json::from_slice::<Push>(&again).ok().as_ref(),
                Some(&push)
            );
            let _ = push.into_set();
        }
        if let Ok(ack) = serde_json::from_slice::<Ack>(line) {
            let again = serde_json::to_vec(&ack).expect("an ack serializes");
            assert_eq!(
                serde_json::from_slice::<Ack>(&again).ok().as_ref(),
                Some(&ack)
            );
        }
    }
});
