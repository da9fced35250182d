//! The admin endpoint's request path (`switchboard::proto::admin::route`) on
//! any bytes, arriving in any pieces, kept as the admin role keeps them (at
//! most `MAX_HEAD` bytes): no panic, a head that fills `MAX_HEAD` is never
//! left waiting, and a decided head stays decided the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::proto::admin::{MAX_HEAD, Refusal, Route, route};

fuzz_target!(|data: &[u8]| {
    // Byte 0 sets the piece size; the rest is the stream, repeated to pass
    // MAX_HEAD when it is short and has no end of head.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1) * 64;
    let mut head = Vec::new();
    let mut decided = None;
    let mut at = 0;
    while !stream.is_empty() && head.len() < MAX_HEAD && at < 4 * MAX_HEAD {
        let take = piece.min(MAX_HEAD - head.len());
        for _ in 0..take {
            head.push(stream[at % stream.len()]);
            at += 1;
        }
        let r = route(&head);
        if head.len() >= MAX_HEAD {
            assert_ne!(r, Route::Incomplete, "a full head is never left waiting");
        }
        if r != Route::Incomplete {
            decided = Some(r);
            break;
        }
    }
    if let Some(r) = decided {
        // Judging the same bytes again gives the same answer.
        assert_eq!(route(&head), r);
        if let Route::Refused(why) = r {
            assert!(matches!(
                why,
                Refusal::BadRequest
                    | Refusal::MethodNotAllowed
                    | Refusal::NotFound
                    | Refusal::TooLarge
            ));
        }
    }
});
