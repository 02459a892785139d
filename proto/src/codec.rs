//! The server's codec: tonic-prost's [`ProstCodec`] with a decoder that
//! answers a request that does not decode (random bytes, a truncated
//! message, invalid UTF-8 in a string, nesting past prost's recursion limit)
//! with `INVALID_ARGUMENT` and a short fixed message, as `auth.proto`
//! promises, instead of tonic-prost's `INTERNAL` carrying the decoder's
//! description (which names message types and fields).
//!
//! Only the generated server uses it; the generated client keeps
//! [`ProstCodec`], for which a response that does not decode is the
//! server's fault (`INTERNAL`).

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The message of every request that does not decode.
pub const MALFORMED_REQUEST: &str = "malformed request";

/// [`ProstCodec`] whose decode errors are `INVALID_ARGUMENT`
/// [`MALFORMED_REQUEST`].
#[derive(Debug, Clone)]
pub struct ServerCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ServerCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for ServerCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ServerDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ServerDecoder(self.0.decoder())
    }
}

/// The decoder of [`ServerCodec`].
#[derive(Debug, Clone)]
pub struct ServerDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ServerDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The decoder's description stays out of the answer: it names the
        // schema's fields and helps no legitimate client.
        self.0.decode(buf).map_err(|_| Status::invalid_argument(MALFORMED_REQUEST))
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
