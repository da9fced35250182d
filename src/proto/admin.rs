//! The admin endpoint's request path, sans IO: what a request head asks for,
//! or how it is refused.
//!
//! Invariant: a head is judged from at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers; anything else about it (method, path, query) is
//! read, never stored.

/// The most request-head bytes a client may send (8 KiB).
pub const MAX_HEAD: usize = 8 * 1024;
/// The most headers a request may carry.
pub const MAX_HEADERS: usize = 32;

/// What a request head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The head is not complete yet: wait for more bytes.
    Incomplete,
    /// `GET /healthz`.
    Healthz,
    /// `GET /status`.
    Status,
    /// `GET /metrics`.
    Metrics,
    /// Refused, with this answer.
    Refused(Refusal),
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not HTTP/1.x (`400`).
    BadRequest,
    /// A method other than GET (`405`).
    MethodNotAllowed,
    /// A path that is not served (`404`).
    NotFound,
    /// A head over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] headers (`431`).
    TooLarge,
}

impl Refusal {
    /// The status line's code and reason.
    pub fn status(self) -> &'static str {
        match self {
            Refusal::BadRequest => "400 Bad Request",
            Refusal::MethodNotAllowed => "405 Method Not Allowed",
            Refusal::NotFound => "404 Not Found",
            Refusal::TooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// Judge the request head received so far (`head`: everything the client
/// sent, of which only the first [`MAX_HEAD`] bytes are kept).
pub fn route(head: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => {
            Route::Refused(Refusal::TooLarge)
        }
        Ok(httparse::Status::Partial) => Route::Incomplete,
        Err(httparse::Error::TooManyHeaders) => Route::Refused(Refusal::TooLarge),
        Err(_) => Route::Refused(Refusal::BadRequest),
        Ok(httparse::Status::Complete(_)) => {
            if req.method != Some("GET") {
                return Route::Refused(Refusal::MethodNotAllowed);
            }
            let path = req.path.unwrap_or_default();
            match path.split('?').next().unwrap_or_default() {
                "/healthz" => Route::Healthz,
                "/status" => Route::Status,
                "/metrics" => Route::Metrics,
                _ => Route::Refused(Refusal::NotFound),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_routed_or_refused() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = format!("GET /status HTTP/1.1\r\n{many}\r\n");
        let long = format!("GET /status HTTP/1.1\r\nX: {}", "y".repeat(MAX_HEAD));
        let cases: &[(&[u8], Route)] = &[
            (b"GET /healthz HTTP/1.1\r\n\r\n", Route::Healthz),
            (
                b"GET /healthz?x=1 HTTP/1.0\r\nHost: a\r\n\r\n",
                Route::Healthz,
            ),
            (b"GET /status HTTP/1.1\r\n\r\n", Route::Status),
            (b"GET /metrics HTTP/1.1\r\n\r\n", Route::Metrics),
            (b"GET /metrics HTTP/1.1\r\n", Route::Incomplete),
            (b"GE", Route::Incomplete),
            (b"", Route::Incomplete),
            (
                b"GET /nope HTTP/1.1\r\n\r\n",
                Route::Refused(Refusal::NotFound),
            ),
            (
                b"GET /status/ HTTP/1.1\r\n\r\n",
                Route::Refused(Refusal::NotFound),
            ),
            (
                b"POST /status HTTP/1.1\r\n\r\n",
                Route::Refused(Refusal::MethodNotAllowed),
            ),
            (
                b"HEAD /healthz HTTP/1.1\r\n\r\n",
                Route::Refused(Refusal::MethodNotAllowed),
            ),
            (
                b"GET /status HTTP/9.9\r\n\r\n",
                Route::Refused(Refusal::BadRequest),
            ),
            (b"\x00\x01\x02\r\n\r\n", Route::Refused(Refusal::BadRequest)),
            (many.as_bytes(), Route::Refused(Refusal::TooLarge)),
            (long.as_bytes(), Route::Refused(Refusal::TooLarge)),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), *want, "{:?}", String::from_utf8_lossy(head));
        }
    }
}
