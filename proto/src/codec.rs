//! The protobuf codec of every berth service: prost's, with small per-call
//! buffers.
//!
//! tonic allocates its buffer size up front for each direction of each call
//! (8 KiB by default), so a dispatcher holding ten thousand streams (each
//! client's and each run's) spent over 30 KiB per session on buffers that
//! mostly carry small events, and most held streams are idle. Here each
//! starts at 256 bytes. A larger message still gets room for all of itself
//! in one allocation when it comes: decoding reserves its whole length
//! from its header, and encoding reserves its encoded length before it
//! writes (prost alone would grow the buffer 64 bytes at a time).

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each call's encode and decode buffers start with.
pub const BUFFER_BYTES: usize = 256;
/// Encoded bytes a stream sends before it yields to the runtime (tonic's
/// default).
pub const YIELD_BYTES: usize = 32 * 1024;

/// prost encoding with [`BUFFER_BYTES`] buffers.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LeanEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LeanEncoder(ProstCodec::<T, U>::raw_encoder(settings()))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}

/// prost's encoder, reserving room for the whole message before it writes.
#[derive(Debug, Clone)]
pub struct LeanEncoder<T>(ProstEncoder<T>);

impl<T: prost::Message> Encoder for LeanEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
