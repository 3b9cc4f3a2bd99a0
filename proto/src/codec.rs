//! The protobuf codec of every berth service: prost's, with smaller
//! per-call buffers.
//!
//! tonic allocates its buffer size up front for each direction of each call
//! (8 KiB by default), so a dispatcher holding ten thousand streams (each
//! client's and each run's) spent over 30 KiB per session on buffers that
//! mostly carry small events. Here each starts at 1 KiB; a larger message
//! still gets room for all of itself when it comes (decoding reserves its
//! whole length, encoding grows in steps of the buffer size).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes each call's encode and decode buffers start with.
pub const BUFFER_BYTES: usize = 1024;
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
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
