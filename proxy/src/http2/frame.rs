//! HTTP/2 frames (RFC 9113 §4, §6): the nine-byte head, the payloads a
//! connection reads (each checked as §6 says, with the error the RFC names),
//! and the frames it writes, straight into its write buffer.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// What a client sends first (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame's head, in bytes.
pub const HEAD_LEN: usize = 9;
/// The largest payload a peer may send before its settings say more.
pub const DEFAULT_MAX_FRAME: u32 = 16_384;
/// The largest `SETTINGS_MAX_FRAME_SIZE` there is.
pub const MAX_FRAME_LIMIT: u32 = (1 << 24) - 1;
/// The largest flow-control window (RFC 9113 §6.9.1).
pub const MAX_WINDOW: u32 = (1 << 31) - 1;
/// The highest stream ID (31 bits, as a window).
pub const MAX_STREAM_ID: u32 = MAX_WINDOW;
/// The window every stream and the connection start with.
pub const DEFAULT_WINDOW: u32 = 65_535;

/// Frame types, named as RFC 9113 §6 names them.
#[allow(missing_docs)]
pub mod kind {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;
}

/// Frame flags, named as RFC 9113 §6 names them (`ACK` and `END_STREAM`
/// share a bit on different frames).
#[allow(missing_docs)]
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// An error code (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub u32);

/// The codes as §7 names them.
#[allow(missing_docs)]
impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const SETTINGS_TIMEOUT: Reason = Reason(0x4);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const CONNECT_ERROR: Reason = Reason(0xa);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
    pub const INADEQUATE_SECURITY: Reason = Reason(0xc);
    pub const HTTP_1_1_REQUIRED: Reason = Reason(0xd);
}

/// A frame the connection cannot take: `stream` 0 is a connection error
/// (a `GOAWAY`), any other a stream error (an `RST_STREAM` for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/2 error {:#x} on stream {stream}", reason.0)]
pub struct Error {
    /// The code the `GOAWAY` or `RST_STREAM` carries.
    pub reason: Reason,
    /// The stream in error, or 0 for the connection.
    pub stream: u32,
}

impl Error {
    /// An error of the whole connection.
    pub fn connection(reason: Reason) -> Error {
        Error { reason, stream: 0 }
    }

    /// An error of one stream.
    pub fn stream(reason: Reason, stream: u32) -> Error {
        Error { reason, stream }
    }
}

/// A frame's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The payload's length.
    pub len: u32,
    /// One of [`kind`]; unknown kinds are to be ignored (§4.1).
    pub kind: u8,
    /// Bits of [`flag`].
    pub flags: u8,
    /// The stream, its reserved bit cleared (RFC 9113 §4.1).
    pub stream: u32,
}

impl Head {
    /// Reads a head from its nine bytes.
    pub fn parse(b: &[u8; HEAD_LEN]) -> Head {
        Head {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        }
    }

    /// Appends the head's nine bytes.
    pub fn write(self, dst: &mut impl BufMut) {
        let len = self.len.to_be_bytes();
        dst.put_slice(&[len[1], len[2], len[3], self.kind, self.flags]);
        dst.put_u32(self.stream);
    }

    /// Is `flag` set?
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Takes the next whole frame off the front of `buf`: `None` until all of
/// it is in. A payload over `max_frame` (this end's
/// `SETTINGS_MAX_FRAME_SIZE`) is a `FRAME_SIZE_ERROR` (§4.2).
pub fn next(buf: &mut BytesMut, max_frame: u32) -> Result<Option<(Head, Bytes)>, Error> {
    let Some(head) = buf.first_chunk::<HEAD_LEN>() else {
        return Ok(None);
    };
    let head = Head::parse(head);
    if head.len > max_frame {
        return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
    }
    let whole = HEAD_LEN + head.len as usize;
    if buf.len() < whole {
        buf.reserve(whole - buf.len());
        return Ok(None);
    }
    buf.advance(HEAD_LEN);
    Ok(Some((head, buf.split_to(head.len as usize).freeze())))
}

/// A `DATA` or `HEADERS` payload without its padding (§6.1): padding as
/// long as the payload or longer is a `PROTOCOL_ERROR`.
fn unpad(head: &Head, mut payload: Bytes) -> Result<Bytes, Error> {
    if !head.has(flag::PADDED) {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
    };
    let pad = usize::from(pad);
    if pad >= payload.len() {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    payload.truncate(payload.len() - pad);
    payload.advance(1);
    Ok(payload)
}

/// A `DATA` frame's data (stream 0 is a `PROTOCOL_ERROR`). Flow control
/// counts the whole payload, padding and all: `head.len`.
pub fn data(head: &Head, payload: Bytes) -> Result<Bytes, Error> {
    if head.stream == 0 {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    unpad(head, payload)
}

/// A `HEADERS` frame's block fragment: unpadded, its priority fields
/// skipped (§6.2; priority signals are not acted on, RFC 9113 §5.3.2).
pub fn headers(head: &Head, payload: Bytes) -> Result<Bytes, Error> {
    if head.stream == 0 {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    let mut fragment = unpad(head, payload)?;
    if head.has(flag::PRIORITY) {
        let Some(dependency) = fragment.first_chunk::<4>() else {
            return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
        };
        if fragment.len() < 5 {
            return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
        }
        // A stream depending on itself (§5.3.1): a stream error, taken as
        // the connection's (§5.4.1 allows it), since the block it carries
        // would go undecoded and the header tables out of step.
        if u32::from_be_bytes(*dependency) & MAX_WINDOW == head.stream {
            return Err(Error::connection(Reason::PROTOCOL_ERROR));
        }
        fragment.advance(5);
    }
    Ok(fragment)
}

/// Checks a `PRIORITY` frame, which is otherwise ignored (§6.3): a stream
/// depending on itself is a stream error (§5.3.1).
pub fn priority(head: &Head, payload: &[u8]) -> Result<(), Error> {
    match (head.stream, payload.first_chunk::<4>()) {
        (0, _) => Err(Error::connection(Reason::PROTOCOL_ERROR)),
        (stream, Some(_)) if payload.len() != 5 => {
            Err(Error::stream(Reason::FRAME_SIZE_ERROR, stream))
        }
        (stream, None) => Err(Error::stream(Reason::FRAME_SIZE_ERROR, stream)),
        (stream, Some(dependency)) if u32::from_be_bytes(*dependency) & MAX_WINDOW == stream => {
            Err(Error::stream(Reason::PROTOCOL_ERROR, stream))
        }
        _ => Ok(()),
    }
}

/// An `RST_STREAM`'s error code (§6.4).
pub fn rst_stream(head: &Head, payload: &[u8]) -> Result<Reason, Error> {
    if head.stream == 0 {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    match payload.first_chunk::<4>() {
        Some(code) if payload.len() == 4 => Ok(Reason(u32::from_be_bytes(*code))),
        _ => Err(Error::connection(Reason::FRAME_SIZE_ERROR)),
    }
}

/// A `PING`'s opaque data (§6.7).
pub fn ping(head: &Head, payload: &[u8]) -> Result<[u8; 8], Error> {
    if head.stream != 0 {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    match payload.first_chunk::<8>() {
        Some(data) if payload.len() == 8 => Ok(*data),
        _ => Err(Error::connection(Reason::FRAME_SIZE_ERROR)),
    }
}

/// A `GOAWAY` (§6.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoAway {
    /// The highest stream the sender may have processed: those above were
    /// not, and may be sent again.
    pub last_stream: u32,
    /// Why the sender is going away.
    pub reason: Reason,
    /// Opaque data for diagnosis.
    pub debug: Bytes,
}

/// A `GOAWAY`'s fields (§6.8).
pub fn goaway(head: &Head, mut payload: Bytes) -> Result<GoAway, Error> {
    if head.stream != 0 {
        return Err(Error::connection(Reason::PROTOCOL_ERROR));
    }
    if payload.len() < 8 {
        return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
    }
    let last_stream = payload.get_u32() & MAX_WINDOW;
    let reason = Reason(payload.get_u32());
    Ok(GoAway {
        last_stream,
        reason,
        debug: payload,
    })
}

/// A `WINDOW_UPDATE`'s increment (§6.9): 0 is a `PROTOCOL_ERROR` of the
/// stream it names (of the connection on stream 0).
pub fn window_update(head: &Head, payload: &[u8]) -> Result<u32, Error> {
    let Some(increment) = payload.first_chunk::<4>().filter(|_| payload.len() == 4) else {
        return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
    };
    match u32::from_be_bytes(*increment) & MAX_WINDOW {
        0 => Err(Error::stream(Reason::PROTOCOL_ERROR, head.stream)),
        n => Ok(n),
    }
}

/// The settings a `SETTINGS` frame carries (§6.5.2); `None` is a setting
/// not in it. Unknown settings are ignored, as §6.5.2 says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Settings {
    pub header_table_size: Option<u32>,
    pub enable_push: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
    pub initial_window_size: Option<u32>,
    pub max_frame_size: Option<u32>,
    pub max_header_list_size: Option<u32>,
    pub enable_connect_protocol: Option<bool>,
}

const HEADER_TABLE_SIZE: u16 = 0x1;
const ENABLE_PUSH: u16 = 0x2;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
const INITIAL_WINDOW_SIZE: u16 = 0x4;
const MAX_FRAME_SIZE: u16 = 0x5;
const MAX_HEADER_LIST_SIZE: u16 = 0x6;
const ENABLE_CONNECT_PROTOCOL: u16 = 0x8;

impl Settings {
    /// A `SETTINGS` frame: `None` for an acknowledgement (which must be
    /// empty), else the settings, each checked (§6.5).
    pub fn parse(head: &Head, payload: &[u8]) -> Result<Option<Settings>, Error> {
        if head.stream != 0 {
            return Err(Error::connection(Reason::PROTOCOL_ERROR));
        }
        if head.has(flag::ACK) {
            return match payload.is_empty() {
                true => Ok(None),
                false => Err(Error::connection(Reason::FRAME_SIZE_ERROR)),
            };
        }
        if !payload.len().is_multiple_of(6) {
            return Err(Error::connection(Reason::FRAME_SIZE_ERROR));
        }
        let mut settings = Settings::default();
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            let flag = |value| match value {
                0 => Ok(Some(false)),
                1 => Ok(Some(true)),
                _ => Err(Error::connection(Reason::PROTOCOL_ERROR)),
            };
            match id {
                HEADER_TABLE_SIZE => settings.header_table_size = Some(value),
                ENABLE_PUSH => settings.enable_push = flag(value)?,
                MAX_CONCURRENT_STREAMS => settings.max_concurrent_streams = Some(value),
                INITIAL_WINDOW_SIZE if value > MAX_WINDOW => {
                    return Err(Error::connection(Reason::FLOW_CONTROL_ERROR));
                }
                INITIAL_WINDOW_SIZE => settings.initial_window_size = Some(value),
                MAX_FRAME_SIZE if !(DEFAULT_MAX_FRAME..=MAX_FRAME_LIMIT).contains(&value) => {
                    return Err(Error::connection(Reason::PROTOCOL_ERROR));
                }
                MAX_FRAME_SIZE => settings.max_frame_size = Some(value),
                MAX_HEADER_LIST_SIZE => settings.max_header_list_size = Some(value),
                ENABLE_CONNECT_PROTOCOL => settings.enable_connect_protocol = flag(value)?,
                _ => {}
            }
        }
        Ok(Some(settings))
    }

    /// Appends a `SETTINGS` frame of the settings set.
    pub fn write(&self, dst: &mut BytesMut) {
        let flag = |on: Option<bool>| on.map(u32::from);
        let all = [
            (HEADER_TABLE_SIZE, self.header_table_size),
            (ENABLE_PUSH, flag(self.enable_push)),
            (MAX_CONCURRENT_STREAMS, self.max_concurrent_streams),
            (INITIAL_WINDOW_SIZE, self.initial_window_size),
            (MAX_FRAME_SIZE, self.max_frame_size),
            (MAX_HEADER_LIST_SIZE, self.max_header_list_size),
            (ENABLE_CONNECT_PROTOCOL, flag(self.enable_connect_protocol)),
        ];
        let set = all.iter().filter(|(_, value)| value.is_some()).count();
        Head {
            len: 6 * set as u32,
            kind: kind::SETTINGS,
            flags: 0,
            stream: 0,
        }
        .write(dst);
        for (id, value) in all {
            if let Some(value) = value {
                dst.put_u16(id);
                dst.put_u32(value);
            }
        }
    }
}

/// Appends the acknowledgement of the peer's settings.
pub fn write_settings_ack(dst: &mut BytesMut) {
    Head {
        len: 0,
        kind: kind::SETTINGS,
        flags: flag::ACK,
        stream: 0,
    }
    .write(dst);
}

/// Appends a header block as a `HEADERS` frame and as many `CONTINUATION`s
/// as `max_frame` (the peer's `SETTINGS_MAX_FRAME_SIZE`) makes it take.
pub fn write_headers(
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: u32,
    dst: &mut BytesMut,
) {
    let max = max_frame as usize;
    let mut chunks = block.chunks(max.max(1));
    let first = chunks.next().unwrap_or_default();
    let mut flags = if end_stream { flag::END_STREAM } else { 0 };
    let mut kind = kind::HEADERS;
    let mut chunk = first;
    loop {
        let next = chunks.next();
        if next.is_none() {
            flags |= flag::END_HEADERS;
        }
        Head {
            len: chunk.len() as u32,
            kind,
            flags,
            stream,
        }
        .write(dst);
        dst.put_slice(chunk);
        match next {
            Some(more) => {
                chunk = more;
                kind = self::kind::CONTINUATION;
                flags = 0;
            }
            None => return,
        }
    }
}

/// Finishes a header block encoded in place: `buf[start..]` is nine bytes
/// of room for a frame head, then the block. One frame's worth gets its
/// `HEADERS` head written into the room; a longer block is split into
/// `CONTINUATION`s as [`write_headers`] does.
pub fn finish_headers(
    buf: &mut BytesMut,
    start: usize,
    stream: u32,
    end_stream: bool,
    max_frame: u32,
) {
    let len = buf.len() - start - HEAD_LEN;
    if len <= max_frame as usize {
        let mut flags = flag::END_HEADERS;
        if end_stream {
            flags |= flag::END_STREAM;
        }
        let head = Head {
            len: len as u32,
            kind: kind::HEADERS,
            flags,
            stream,
        };
        let mut room = &mut buf[start..start + HEAD_LEN];
        head.write(&mut room);
        return;
    }
    let block = buf.split_off(start + HEAD_LEN);
    buf.truncate(start);
    write_headers(stream, &block, end_stream, max_frame, buf);
}

/// Appends a `DATA` frame's head; its `len` bytes of data are the caller's
/// to append (at most the peer's `SETTINGS_MAX_FRAME_SIZE`).
pub fn write_data_head(stream: u32, len: u32, end_stream: bool, dst: &mut BytesMut) {
    Head {
        len,
        kind: kind::DATA,
        flags: if end_stream { flag::END_STREAM } else { 0 },
        stream,
    }
    .write(dst);
}

/// Appends a `WINDOW_UPDATE` (stream 0: the connection's window).
pub fn write_window_update(stream: u32, increment: u32, dst: &mut BytesMut) {
    Head {
        len: 4,
        kind: kind::WINDOW_UPDATE,
        flags: 0,
        stream,
    }
    .write(dst);
    dst.put_u32(increment);
}

/// Appends an `RST_STREAM`.
pub fn write_rst_stream(stream: u32, reason: Reason, dst: &mut BytesMut) {
    Head {
        len: 4,
        kind: kind::RST_STREAM,
        flags: 0,
        stream,
    }
    .write(dst);
    dst.put_u32(reason.0);
}

/// Appends a `PING`, or its acknowledgement.
pub fn write_ping(ack: bool, data: [u8; 8], dst: &mut BytesMut) {
    Head {
        len: 8,
        kind: kind::PING,
        flags: if ack { flag::ACK } else { 0 },
        stream: 0,
    }
    .write(dst);
    dst.put_slice(&data);
}

/// Appends a `GOAWAY` with no debug data.
pub fn write_goaway(last_stream: u32, reason: Reason, dst: &mut BytesMut) {
    Head {
        len: 8,
        kind: kind::GOAWAY,
        flags: 0,
        stream: 0,
    }
    .write(dst);
    dst.put_u32(last_stream);
    dst.put_u32(reason.0);
}

/// A header block being put together from a `HEADERS` frame and its
/// `CONTINUATION`s (§6.10): nothing else may come between them, and the
/// whole is held to a size (a flood of `CONTINUATION`s is refused, not
/// buffered).
#[derive(Debug)]
pub struct Block {
    /// The stream the block is for.
    pub stream: u32,
    /// The `HEADERS` frame ended the stream.
    pub end_stream: bool,
    fragments: BytesMut,
    max: usize,
    /// `CONTINUATION`s still taken: empty ones would pass the size check
    /// forever (the 2024 `CONTINUATION` floods).
    frames_left: usize,
}

/// What a header frame gives: a whole block, or a part of one.
#[derive(Debug)]
pub enum Assembled {
    /// The block is whole: to be decoded.
    Whole {
        /// The stream it is for.
        stream: u32,
        /// The `HEADERS` frame ended the stream.
        end_stream: bool,
        /// The block's bytes.
        block: Bytes,
    },
    /// `CONTINUATION` frames are to follow, and nothing else.
    Partial(Block),
}

impl Block {
    /// A `HEADERS` frame's fragment, whole or the first of several; the
    /// block is refused past `max` bytes (`ENHANCE_YOUR_CALM`).
    pub fn start(head: &Head, payload: Bytes, max: usize) -> Result<Assembled, Error> {
        let fragment = headers(head, payload)?;
        let end_stream = head.has(flag::END_STREAM);
        if fragment.len() > max {
            return Err(Error::connection(Reason::ENHANCE_YOUR_CALM));
        }
        if head.has(flag::END_HEADERS) {
            return Ok(Assembled::Whole {
                stream: head.stream,
                end_stream,
                block: fragment,
            });
        }
        Ok(Assembled::Partial(Block {
            stream: head.stream,
            end_stream,
            fragments: BytesMut::from(&fragment[..]),
            max,
            // As `h2` counts: the frames a block of `max` takes in frames
            // of the default size, and a quarter more; at least 5.
            frames_left: (max.div_ceil(DEFAULT_MAX_FRAME as usize) * 5 / 4).max(5),
        }))
    }

    /// The frame after the first: only a `CONTINUATION` of the same stream
    /// may come (anything else is a `PROTOCOL_ERROR`).
    pub fn push(mut self, head: &Head, payload: &[u8]) -> Result<Assembled, Error> {
        if head.kind != kind::CONTINUATION || head.stream != self.stream {
            return Err(Error::connection(Reason::PROTOCOL_ERROR));
        }
        if self.fragments.len() + payload.len() > self.max || self.frames_left == 0 {
            return Err(Error::connection(Reason::ENHANCE_YOUR_CALM));
        }
        self.frames_left -= 1;
        self.fragments.extend_from_slice(payload);
        if !head.has(flag::END_HEADERS) {
            return Ok(Assembled::Partial(self));
        }
        Ok(Assembled::Whole {
            stream: self.stream,
            end_stream: self.end_stream,
            block: self.fragments.freeze(),
        })
    }
}

/// Tests only: appends one of [`any_frames`]'s frames to `out`.
#[cfg(test)]
pub fn put_any(out: &mut BytesMut, (kind, flags, stream, payload): (u8, u8, u32, Vec<u8>)) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    Head {
        len,
        kind,
        flags,
        stream,
    }
    .write(out);
    out.extend_from_slice(&payload);
}

/// Tests only: a peer that writes `out` on `io`, reads a little, then
/// closes (the "any frames" properties' other end).
#[cfg(test)]
pub async fn write_then_close(io: tokio::io::DuplexStream, out: BytesMut) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(io);
    let _ = wr.write_all(&out).await;
    let mut sink = [0u8; 256];
    let _ = rd.read(&mut sink).await;
}

/// Tests only: up to 12 frames of any kind (and unknown ones), flags,
/// stream (0, client's, server's, never opened) and payload, as
/// `(kind, flags, stream, payload)`, for the connections' "any frames
/// from the peer" properties.
#[cfg(test)]
pub fn any_frames() -> impl proptest::strategy::Strategy<Value = Vec<(u8, u8, u32, Vec<u8>)>> {
    use proptest::prelude::any;
    proptest::collection::vec(
        (
            0u8..11,
            any::<u8>(),
            proptest::sample::select(vec![0u32, 1, 2, 3, 5, 7, 99]),
            proptest::collection::vec(any::<u8>(), 0..24),
        ),
        0..12,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> (Head, Bytes) {
        let head = Head {
            len: payload.len() as u32,
            kind,
            flags,
            stream,
        };
        (head, Bytes::copy_from_slice(payload))
    }

    /// A block of empty `CONTINUATION`s is refused after a few (a flood
    /// never grows the block, so its size alone would never stop it).
    #[test]
    fn a_flood_of_empty_continuations_is_refused() {
        let (head, payload) = frame(kind::HEADERS, 0, 1, b"");
        let Ok(Assembled::Partial(mut block)) = Block::start(&head, payload, 32 * 1024) else {
            panic!("not partial");
        };
        let (cont, _) = frame(kind::CONTINUATION, 0, 1, b"");
        for i in 0.. {
            match block.push(&cont, b"") {
                Ok(Assembled::Partial(next)) => block = next,
                Ok(Assembled::Whole { .. }) => panic!("whole without END_HEADERS"),
                Err(e) => {
                    assert_eq!(e, Error::connection(Reason::ENHANCE_YOUR_CALM));
                    assert!((2..=10).contains(&i), "refused after {i}");
                    return;
                }
            }
        }
    }

    /// A block over its size is refused whether it comes in one frame or
    /// several; a frame of another stream inside a block is a protocol
    /// error.
    #[test]
    fn blocks_are_held_to_their_size_and_their_stream() {
        let (head, payload) = frame(kind::HEADERS, flag::END_HEADERS, 1, &[0x82; 100]);
        assert_eq!(
            Block::start(&head, payload, 50).err(),
            Some(Error::connection(Reason::ENHANCE_YOUR_CALM))
        );
        let (head, payload) = frame(kind::HEADERS, 0, 1, &[0x82; 40]);
        let Ok(Assembled::Partial(block)) = Block::start(&head, payload, 50) else {
            panic!("not partial");
        };
        let (other, _) = frame(kind::CONTINUATION, flag::END_HEADERS, 3, b"");
        assert_eq!(
            block.push(&other, b"").err(),
            Some(Error::connection(Reason::PROTOCOL_ERROR))
        );
        let (head, payload) = frame(kind::HEADERS, 0, 1, &[0x82; 40]);
        let Ok(Assembled::Partial(block)) = Block::start(&head, payload, 50) else {
            panic!("not partial");
        };
        let (cont, _) = frame(kind::CONTINUATION, flag::END_HEADERS, 1, b"");
        assert_eq!(
            block.push(&cont, &[0x82; 20]).err(),
            Some(Error::connection(Reason::ENHANCE_YOUR_CALM))
        );
    }

    /// A padded `HEADERS` with priority fields gives its fragment alone; a
    /// stream depending on itself is refused (as the connection's error,
    /// its block undecoded), in `HEADERS` and in `PRIORITY`.
    #[test]
    fn padding_and_priority_are_taken_off_and_checked() {
        // Pad length 2, dependency on stream 0, weight 16, fragment 0x82,
        // then 2 bytes of padding.
        let payload = [2, 0, 0, 0, 0, 16, 0x82, 0, 0];
        let (head, payload) = frame(kind::HEADERS, flag::PADDED | flag::PRIORITY, 1, &payload);
        assert_eq!(
            headers(&head, payload).ok(),
            Some(Bytes::from_static(&[0x82]))
        );
        let (head, payload) = frame(kind::HEADERS, flag::PRIORITY, 3, &[0, 0, 0, 3, 16, 0x82]);
        assert_eq!(
            headers(&head, payload).err(),
            Some(Error::connection(Reason::PROTOCOL_ERROR))
        );
        let (head, payload) = frame(kind::PRIORITY, 0, 5, &[0, 0, 0, 5, 16]);
        assert_eq!(
            priority(&head, &payload),
            Err(Error::stream(Reason::PROTOCOL_ERROR, 5))
        );
        let (head, payload) = frame(kind::PRIORITY, 0, 5, &[0, 0, 0, 1, 16]);
        assert_eq!(priority(&head, &payload), Ok(()));
    }

    /// A frame's head reads back as written; a payload over the frame
    /// size is refused before it is buffered.
    #[test]
    fn heads_round_trip_and_oversized_frames_are_refused() {
        let head = Head {
            len: 12_345,
            kind: kind::DATA,
            flags: flag::END_STREAM | flag::PADDED,
            stream: 7,
        };
        let mut out = BytesMut::new();
        head.write(&mut out);
        let raw: [u8; HEAD_LEN] = out[..].try_into().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Head::parse(&raw), head);
        assert_eq!(next(&mut out, DEFAULT_MAX_FRAME), Ok(None));
        assert_eq!(
            next(&mut out, 1000).err(),
            Some(Error::connection(Reason::FRAME_SIZE_ERROR))
        );
    }
}
