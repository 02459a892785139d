//! Requests whose gRPC framing is broken get the documented status: a tower
//! layer that watches the request body's length-prefixed frames.
//!
//! A gRPC request body is a sequence of frames, each a 5-byte prefix (a
//! compressed flag and a big-endian length) and that many bytes of message.
//! Every RPC of `auth.v1.Auth` takes exactly one request message (other
//! services, such as reflection, pass unchecked). A body
//! that ends inside a frame, or before any frame, is malformed, and tonic
//! would call it INTERNAL ("Unexpected EOF decoding stream.", "Missing
//! request message."), which pages someone for a client's bug. This layer
//! ends such a body with `INVALID_ARGUMENT` "malformed request" instead, the
//! same answer the codec gives a message that does not decode. A well-formed
//! body passes untouched; the layer only counts bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::Frame;
use tonic::Status;
use tonic::codegen::Bytes;
use tower::{Layer, Service};

/// The RPCs whose bodies are checked.
const AUTH_PATHS: &str = "/auth.v1.Auth/";

/// The layer; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcFramingLayer;

impl<S> Layer<S> for GrpcFramingLayer {
    type Service = GrpcFraming<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcFraming { inner }
    }
}

/// The service of [`GrpcFramingLayer`].
#[derive(Debug, Clone)]
pub struct GrpcFraming<S> {
    inner: S,
}

impl<S> Service<http::Request<tonic::body::Body>> for GrpcFraming<S>
where
    S: Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // Only auth.v1.Auth's RPCs: each takes exactly one message (the
        // reflection service's stream may carry none).
        if !req.uri().path().starts_with(AUTH_PATHS) {
            return self.inner.call(req);
        }
        self.inner.call(req.map(|body| tonic::body::Body::new(Framed { inner: body, frames: Frames::default() })))
    }
}

/// Where the body stands in its sequence of frames.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Frames {
    /// Bytes of the current frame's prefix seen (0 between frames).
    prefix: usize,
    /// The current frame's length, once its prefix is whole.
    len: [u8; 4],
    /// Message bytes of the current frame still to come.
    remaining: u64,
    /// Whole frames seen.
    complete: u64,
    /// The error has been given: the body is over.
    done: bool,
}

impl Frames {
    /// Counts `data` into the frames.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.prefix < 5 {
                // The flag byte, then the four length bytes.
                if self.prefix > 0 {
                    self.len[self.prefix - 1] = data[0];
                }
                self.prefix += 1;
                data = &data[1..];
                if self.prefix == 5 {
                    self.remaining = u64::from(u32::from_be_bytes(self.len));
                    self.end_frame_if_whole();
                }
            } else {
                let n = data.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                self.remaining -= n as u64;
                data = &data[n..];
                self.end_frame_if_whole();
            }
        }
    }

    fn end_frame_if_whole(&mut self) {
        if self.remaining == 0 {
            self.complete += 1;
            self.prefix = 0;
        }
    }

    /// Whether a body ending here held whole frames, at least one.
    fn ends_well(&self) -> bool {
        self.prefix == 0 && self.complete > 0
    }
}

/// A request body whose end is checked against its framing.
struct Framed {
    inner: tonic::body::Body,
    frames: Frames,
}

impl http_body::Body for Framed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.frames.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.frames.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if !self.frames.ends_well() => {
                self.frames.done = true;
                Poll::Ready(Some(Err(Status::invalid_argument("malformed request"))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.done || (self.inner.is_end_stream() && self.frames.ends_well())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&u32::try_from(message.len()).unwrap_or(u32::MAX).to_be_bytes());
        f.extend_from_slice(message);
        f
    }

    fn after(chunks: &[&[u8]]) -> Frames {
        let mut frames = Frames::default();
        for chunk in chunks {
            frames.feed(chunk);
        }
        frames
    }

    #[test]
    fn whole_frames_end_well_in_any_chunking() {
        let body = [frame(b"hello"), frame(b""), frame(&[7; 300])].concat();
        for split in 0..body.len() {
            let (a, b) = body.split_at(split);
            let frames = after(&[a, b]);
            assert!(frames.ends_well(), "split at {split}: {frames:?}");
            assert_eq!(frames.complete, 3);
        }
        let one_byte_at_a_time: Vec<&[u8]> = body.chunks(1).collect();
        assert!(after(&one_byte_at_a_time).ends_well());
    }

    #[test]
    fn a_body_ending_inside_a_frame_or_before_any_does_not() {
        let whole = frame(b"hello");
        assert!(!after(&[]).ends_well(), "no frame at all");
        for cut in 1..whole.len() {
            assert!(!after(&[&whole[..cut]]).ends_well(), "cut at {cut}");
        }
        let two = [frame(b"a"), frame(b"bc")].concat();
        assert!(!after(&[&two[..two.len() - 1]]).ends_well(), "the second frame cut short");
    }
}
