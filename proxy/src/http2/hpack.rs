//! HPACK (RFC 7541): the header block's compression. The decoder hands
//! out each field as `Bytes` (a literal not Huffman-coded is a slice of the
//! block, the Huffman-coded ones of a block share one allocation, and the
//! last few short ones are kept to be copied when they come again); the
//! encoder writes straight into the frame's buffer, indexing the fields a
//! peer sees again and again and never the ones unique to a request.

use super::huffman::{self, HuffmanError};
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName};
use std::collections::VecDeque;

/// The table size both ends start with (RFC 9113 §6.5.2).
pub const DEFAULT_TABLE_SIZE: usize = 4096;

/// What a field costs in a table and in a header list: its name, its value
/// and 32 (RFC 7541 §4.1; RFC 9113 §6.5.2).
pub fn field_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// A header block that cannot be decoded: a `COMPRESSION_ERROR` for the
/// whole connection (RFC 9113 §4.3), since the two tables no longer agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The block ends inside a field.
    #[error("header block truncated")]
    Truncated,
    /// An integer past what fits in 32 bits.
    #[error("integer overflow in header block")]
    Overflow,
    /// An index of no entry (0, or past the table's end).
    #[error("header block names no such table entry")]
    BadIndex,
    /// A table size update past the size allowed, or after a field.
    #[error("invalid dynamic table size update")]
    BadSizeUpdate,
    /// A Huffman-coded string that does not decode.
    #[error(transparent)]
    Huffman(#[from] HuffmanError),
}

/// One decoded field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The name, as sent (RFC 9113 §8.2.1 wants it lowercase: the
    /// connection checks).
    pub name: Bytes,
    /// The value, as sent.
    pub value: Bytes,
    /// Sent as never indexed: to be sent on the same way (RFC 7541 §7.1.3).
    pub sensitive: bool,
    /// The static table's name, when the name came from it: a
    /// [`HeaderName`] with no parsing (see [`static_header`]).
    pub known: Option<HeaderName>,
}

/// An HPACK dynamic table: newest entry first, its size in RFC 7541's
/// terms (each entry's bytes plus 32).
#[derive(Debug)]
struct Table {
    entries: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max_size: usize,
}

impl Table {
    fn new(max_size: usize) -> Table {
        Table {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    /// Adds an entry, evicting the oldest ones to make room; one larger
    /// than the whole table empties it and is not kept (RFC 7541 §4.4).
    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = field_size(&name, &value);
        self.evict_to(self.max_size.saturating_sub(size));
        if size <= self.max_size {
            self.size += size;
            self.entries.push_front((name, value));
        }
    }

    fn resize(&mut self, max_size: usize) {
        self.max_size = max_size;
        self.evict_to(max_size);
    }

    fn evict_to(&mut self, room: usize) {
        while self.size > room {
            match self.entries.pop_back() {
                Some((name, value)) => self.size -= field_size(&name, &value),
                None => break,
            }
        }
    }
}

/// Decodes header blocks; one per connection and direction.
#[derive(Debug)]
pub struct Decoder {
    table: Table,
    /// The most the peer's encoder may use: the `SETTINGS_HEADER_TABLE_SIZE`
    /// this end sent.
    limit: usize,
    /// Where Huffman-coded strings are decoded, and the last few decoded.
    strings: Strings,
}

/// Where a [`Decoder`]'s Huffman-coded strings are decoded, each split off
/// `scratch` as it is done: the strings of many blocks share one
/// allocation of [`SCRATCH`] (a fresh buffer for each block allocated
/// twice: once for the buffer, once more at its first split).
#[derive(Debug, Default)]
struct Strings {
    scratch: BytesMut,
    /// The last short strings decoded (made at the first one).
    recent: Option<Box<Recent>>,
}

/// The last [`RECENT`] short Huffman-coded strings a decoder decoded, as
/// sent and as decoded: a peer that sends the same values as literals in
/// every block (nginx sends `server`, `date` and `content-type` so in each
/// answer, added to the table and never referred to) has each one decoded
/// once, then copied. Replaced oldest first; about 850 bytes a decoder.
#[derive(Debug)]
struct Recent {
    slots: [Slot; RECENT],
    next: usize,
}

/// One of [`Recent`]'s strings: its coded and decoded bytes, in place.
#[derive(Debug, Clone, Copy)]
struct Slot {
    coded_len: u8,
    decoded_len: u8,
    coded: [u8; RECENT_CODED],
    decoded: [u8; RECENT_DECODED],
}

/// How many strings [`Recent`] keeps.
const RECENT: usize = 8;
/// The longest coded string [`Recent`] keeps.
const RECENT_CODED: usize = 40;
/// The most a string of [`RECENT_CODED`] bytes decodes to: the shortest
/// code is 5 bits.
const RECENT_DECODED: usize = RECENT_CODED * 8 / 5;

impl Recent {
    fn new() -> Box<Recent> {
        let empty = Slot {
            coded_len: 0,
            decoded_len: 0,
            coded: [0; RECENT_CODED],
            decoded: [0; RECENT_DECODED],
        };
        Box::new(Recent {
            slots: [empty; RECENT],
            next: 0,
        })
    }

    /// What `coded` decoded to, if it is one of the strings kept.
    fn find(&self, coded: &[u8]) -> Option<&[u8]> {
        self.slots
            .iter()
            .find(|slot| slot.coded.get(..usize::from(slot.coded_len)) == Some(coded))
            .and_then(|slot| slot.decoded.get(..usize::from(slot.decoded_len)))
    }

    /// Keeps `coded` and what it `decoded` to, in place of the oldest
    /// string kept; a string too long for a slot is not kept.
    fn keep(&mut self, coded: &[u8], decoded: &[u8]) {
        let (Ok(coded_len), Ok(decoded_len)) =
            (u8::try_from(coded.len()), u8::try_from(decoded.len()))
        else {
            return;
        };
        let slot = &mut self.slots[self.next];
        let (Some(c), Some(d)) = (
            slot.coded.get_mut(..coded.len()),
            slot.decoded.get_mut(..decoded.len()),
        ) else {
            return;
        };
        c.copy_from_slice(coded);
        d.copy_from_slice(decoded);
        slot.coded_len = coded_len;
        slot.decoded_len = decoded_len;
        self.next = (self.next + 1) % RECENT;
    }
}

/// The buffer a [`Decoder`]'s Huffman strings share: a field kept holds
/// at most this much alive with it. A string that decodes to more gets a
/// buffer of its own (shared, the decoder would keep it for good, and
/// the fields after it would share its tail).
const SCRATCH: usize = 1024;

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Decoder {
    /// A decoder whose end advertises `limit` as its table size. Until the
    /// peer acknowledges it ([`Decoder::set_limit`]), the peer's encoder
    /// may still use the initial 4,096 (RFC 9113 §3.4: its first blocks
    /// may leave before it sees this end's settings).
    pub fn new(limit: usize) -> Decoder {
        Decoder {
            table: Table::new(DEFAULT_TABLE_SIZE),
            limit: limit.max(DEFAULT_TABLE_SIZE),
            strings: Strings::default(),
        }
    }

    /// Takes `limit` as this end's `SETTINGS_HEADER_TABLE_SIZE` from now
    /// on (the peer acknowledged it): a table over it shrinks at once (the
    /// peer's next block starts with the same shrinking).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        if self.table.max_size > limit {
            self.table.resize(limit);
        }
    }

    /// Decodes one whole header block (a `HEADERS` frame's fragment and
    /// its `CONTINUATION`s), handing each field to `emit` in order. Fields
    /// past `max_list` (RFC 9113 §6.5.2's size) are decoded, so that the
    /// table stays in step, but not handed out: the result says whether
    /// the list fit.
    pub fn decode(
        &mut self,
        block: &Bytes,
        max_list: usize,
        mut emit: impl FnMut(Field),
    ) -> Result<bool, DecodeError> {
        let mut src = Cursor { block, at: 0 };
        let mut strings = std::mem::take(&mut self.strings);
        let decoded = self.decode_with(&mut src, max_list, &mut strings, &mut emit);
        if decoded.is_err() {
            // A string broken off leaves its bytes: none may start the
            // next one.
            strings.scratch.clear();
        }
        self.strings = strings;
        decoded
    }

    /// [`Decoder::decode`], its Huffman strings into `strings`.
    fn decode_with(
        &mut self,
        src: &mut Cursor<'_>,
        max_list: usize,
        strings: &mut Strings,
        emit: &mut impl FnMut(Field),
    ) -> Result<bool, DecodeError> {
        let block = src.block;
        let mut list = 0usize;
        let mut fields = false;
        while let Some(&first) = block.get(src.at) {
            // `named`: the index the name came from (0: a literal).
            let (name, value, sensitive, index, named) = match first {
                // Indexed field (§6.1).
                0x80..=0xff => {
                    let named = src.int(7)?;
                    let (name, value) = self.entry(named)?;
                    (name, value, false, None, named)
                }
                // Literal, with incremental indexing (§6.2.1).
                0x40..=0x7f => {
                    let (name, value, named) = self.literal(src, 6, strings)?;
                    (name, value, false, Some(named != 0), named)
                }
                // Table size update (§6.3): only before the block's fields.
                0x20..=0x3f => {
                    let size = src.int(5)?;
                    if fields || size > self.limit {
                        return Err(DecodeError::BadSizeUpdate);
                    }
                    self.table.resize(size);
                    continue;
                }
                // Literal never indexed (§6.2.3), or not indexed (§6.2.2).
                _ => {
                    let sensitive = first & 0x10 != 0;
                    let (name, value, named) = self.literal(src, 4, strings)?;
                    (name, value, sensitive, None, named)
                }
            };
            fields = true;
            // `Some(named)`: to be added to the table, its name an entry's
            // (`named`) or a literal.
            if let Some(named) = index {
                // A copy of its own of what came in the block: an entry
                // kept as a slice of the block would keep the whole
                // block's buffer alive. A name from the table is shared,
                // not copied (a block of two-byte fields naming a long
                // entry's name would cost a copy of it each): so each
                // name is an allocation of its own, never a slice of a
                // value's (shared, it would keep that value alive).
                let kept_name = match named {
                    true => name.clone(),
                    false => Bytes::copy_from_slice(&name),
                };
                self.table.insert(kept_name, Bytes::copy_from_slice(&value));
            }
            list = list.saturating_add(field_size(&name, &value));
            if list <= max_list {
                emit(Field {
                    name,
                    value,
                    sensitive,
                    known: static_header(named),
                });
            }
        }
        Ok(list <= max_list)
    }

    /// The entry at `index` of the static then the dynamic table.
    fn entry(&self, index: usize) -> Result<(Bytes, Bytes), DecodeError> {
        match index {
            0 => Err(DecodeError::BadIndex),
            1..=STATIC_LEN => {
                let (name, value) = STATIC[index - 1];
                Ok((Bytes::from_static(name), Bytes::from_static(value)))
            }
            _ => (self.table.entries.get(index - STATIC_LEN - 1))
                .cloned()
                .ok_or(DecodeError::BadIndex),
        }
    }

    /// A literal field: an indexed name (a `prefix`-bit index, not 0) or a
    /// literal one, then its value; with the name's index (0: a literal).
    fn literal(
        &self,
        src: &mut Cursor<'_>,
        prefix: u8,
        strings: &mut Strings,
    ) -> Result<(Bytes, Bytes, usize), DecodeError> {
        let index = src.int(prefix)?;
        let name = match index {
            0 => src.string(strings)?,
            index => self.entry(index)?.0,
        };
        Ok((name, src.string(strings)?, index))
    }
}

/// A place in a header block being read.
struct Cursor<'a> {
    block: &'a Bytes,
    at: usize,
}

impl Cursor<'_> {
    /// An integer with a `prefix`-bit prefix (RFC 7541 §5.1), at most
    /// `u32::MAX`.
    fn int(&mut self, prefix: u8) -> Result<usize, DecodeError> {
        let mask = (1u8 << prefix) - 1;
        let first = *self.block.get(self.at).ok_or(DecodeError::Truncated)? & mask;
        self.at += 1;
        if first < mask {
            return Ok(usize::from(first));
        }
        let mut value = u64::from(mask);
        let mut shift = 0;
        loop {
            let byte = *self.block.get(self.at).ok_or(DecodeError::Truncated)?;
            self.at += 1;
            value += u64::from(byte & 0x7f) << shift;
            if value > u64::from(u32::MAX) {
                return Err(DecodeError::Overflow);
            }
            if byte & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| DecodeError::Overflow);
            }
            shift += 7;
            // Five bytes carry 32 bits: more are padding or overflow.
            if shift > 28 {
                return Err(DecodeError::Overflow);
            }
        }
    }

    /// A string (RFC 7541 §5.2): a slice of the block, or its Huffman
    /// decoding (or a copy of it, from the recent strings) split off the
    /// scratch buffer.
    fn string(&mut self, strings: &mut Strings) -> Result<Bytes, DecodeError> {
        let huffman = *self.block.get(self.at).ok_or(DecodeError::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.at.checked_add(len).ok_or(DecodeError::Truncated)?;
        if end > self.block.len() {
            return Err(DecodeError::Truncated);
        }
        let start = std::mem::replace(&mut self.at, end);
        if !huffman {
            return Ok(self.block.slice(start..end));
        }
        let coded = &self.block[start..end];
        // Room for this string (see `SCRATCH`): strings share the buffer
        // while it lasts; a long one gets a buffer of its own.
        let room = len * 8 / 5 + 2;
        if room > SCRATCH {
            let mut own = BytesMut::with_capacity(room);
            huffman::decode(coded, &mut own)?;
            return Ok(own.freeze());
        }
        let scratch = &mut strings.scratch;
        if scratch.capacity() - scratch.len() < room {
            scratch.reserve(SCRATCH);
        }
        if len > RECENT_CODED {
            huffman::decode(coded, scratch)?;
            return Ok(scratch.split().freeze());
        }
        let recent = strings.recent.get_or_insert_with(Recent::new);
        match recent.find(coded) {
            Some(decoded) => scratch.extend_from_slice(decoded),
            None => {
                let from = scratch.len();
                huffman::decode(coded, scratch)?;
                recent.keep(coded, &scratch[from..]);
            }
        }
        Ok(scratch.split().freeze())
    }
}

/// How a field is to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Indexing {
    /// Added to the table: a field the peer will see again.
    Index,
    /// Not added: a field of one request (a request ID, a path).
    Skip,
    /// Never indexed by anyone on the way (RFC 7541 §7.1.3): a secret.
    Never,
}

/// Whether a field of `name` is worth a place in the table: not the ones
/// that differ on nearly every request or answer. A `date` is: it changes
/// once a second, and every other answer of that second sends it as one
/// byte (32 unindexed). A connection answering less than once a second
/// gains nothing, and each second's entry (65 of the table's 4,096) ages
/// out as any other.
pub fn indexing_for(name: &[u8]) -> Indexing {
    match name {
        b":path" | b"content-length" | b"x-request-id" | b"traceparent" | b"tracestate"
        | b"etag" | b"last-modified" | b"age" | b"expires" => Indexing::Skip,
        b"authorization" | b"proxy-authorization" | b"cookie" | b"set-cookie" => Indexing::Never,
        _ => Indexing::Index,
    }
}

/// Encodes header blocks; one per connection and direction.
#[derive(Debug)]
pub struct Encoder {
    table: Table,
    /// Size updates to send at the start of the next block: the smallest
    /// since the last block, then the last (RFC 7541 §4.2).
    pending: Option<(usize, usize)>,
    /// Which strings are Huffman-coded.
    huffman: Huffman,
}

/// Which strings an [`Encoder`] Huffman-codes (each only if it comes out
/// shorter so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Huffman {
    /// None: fewer instructions on both ends, a few more bytes.
    Never,
    /// The fields added to the table, sent whole once and as an index
    /// after: the ones unique to a request (a request ID, a trace ID, a
    /// path) go as they are, and cost neither end any coding.
    Indexed,
    /// All, as `nghttp2` and the `h2` crate do.
    Always,
}

impl Default for Encoder {
    fn default() -> Encoder {
        Encoder::new(DEFAULT_TABLE_SIZE)
    }
}

impl Encoder {
    /// An encoder using a table of `size` (at most the peer's
    /// `SETTINGS_HEADER_TABLE_SIZE`; the initial 4,096 needs no update).
    pub fn new(size: usize) -> Encoder {
        let mut encoder = Encoder {
            table: Table::new(DEFAULT_TABLE_SIZE),
            pending: None,
            huffman: Huffman::Indexed,
        };
        if size != DEFAULT_TABLE_SIZE {
            encoder.resize(size);
        }
        encoder
    }

    /// Huffman-codes the strings `huffman` says (by default the fields
    /// added to the table).
    pub fn huffman(mut self, huffman: Huffman) -> Encoder {
        self.huffman = huffman;
        self
    }

    /// Uses a table of `size` from the next block on (the peer's
    /// `SETTINGS_HEADER_TABLE_SIZE` changed, or this end chose less), at
    /// most 4,096 bytes whatever the peer allows: the table is searched
    /// field by field, and a peer must not make that search long.
    pub fn resize(&mut self, size: usize) {
        let size = size.min(DEFAULT_TABLE_SIZE);
        if self.pending.is_none() && size == self.table.max_size {
            return;
        }
        self.pending = Some(match self.pending {
            Some((least, _)) => (least.min(size), size),
            None => (size, size),
        });
        self.table.resize(size);
    }

    /// Starts a block in `dst`: the table size updates owed.
    pub fn begin(&mut self, dst: &mut BytesMut) {
        if let Some((least, last)) = self.pending.take() {
            if least != last {
                put_int(least, 5, 0x20, dst);
            }
            put_int(last, 5, 0x20, dst);
        }
    }

    /// Appends one field to the block begun with [`Encoder::begin`].
    pub fn field(&mut self, name: &[u8], value: &[u8], indexing: Indexing, dst: &mut BytesMut) {
        let (static_name, static_full) = static_index(name, value);
        if indexing != Indexing::Never {
            if let Some(index) = static_full {
                return put_int(index, 7, 0x80, dst);
            }
        }
        // The table, newest first: the whole field, or its name.
        let mut name_index = static_name;
        for (i, (n, v)) in self.table.entries.iter().enumerate() {
            if n.len() == name.len() && &n[..] == name {
                if indexing != Indexing::Never && &v[..] == value {
                    return put_int(STATIC_LEN + 1 + i, 7, 0x80, dst);
                }
                name_index = name_index.or(Some(STATIC_LEN + 1 + i));
            }
        }
        let indexing = match indexing {
            // A field over half the table would empty most of it.
            Indexing::Index if field_size(name, value) * 2 > self.table.max_size => Indexing::Skip,
            other => other,
        };
        let (prefix, pattern) = match indexing {
            Indexing::Index => (6, 0x40),
            Indexing::Skip => (4, 0x00),
            Indexing::Never => (4, 0x10),
        };
        let huffman = match self.huffman {
            Huffman::Never => false,
            Huffman::Indexed => indexing == Indexing::Index,
            Huffman::Always => true,
        };
        match name_index {
            Some(index) => put_int(index, prefix, pattern, dst),
            None => {
                dst.put_u8(pattern);
                string(name, huffman, dst);
            }
        }
        string(value, huffman, dst);
        if indexing == Indexing::Index {
            self.table
                .insert(Bytes::copy_from_slice(name), Bytes::copy_from_slice(value));
        }
    }
}

impl Encoder {
    /// Appends a field never indexed (RFC 7541 §6.2.3), its name and value
    /// literal and not looked up in either table: a field of this end's
    /// own, unique to its block and in neither table.
    pub fn never(&mut self, name: &[u8], value: &[u8], dst: &mut BytesMut) {
        dst.put_u8(0x10);
        string(name, false, dst);
        string(value, false, dst);
    }
}

/// Appends a string (RFC 7541 §5.2), Huffman-coded if `huffman` and it
/// comes out shorter so.
fn string(s: &[u8], huffman: bool, dst: &mut BytesMut) {
    if huffman {
        let coded = huffman::encoded_len(s);
        if coded < s.len() {
            put_int(coded, 7, 0x80, dst);
            return huffman::encode(s, coded, dst);
        }
    }
    put_int(s.len(), 7, 0, dst);
    dst.extend_from_slice(s);
}

/// Appends `value` as an integer with a `prefix`-bit prefix, the bits above
/// the prefix in the first byte set from `pattern` (RFC 7541 §5.1).
fn put_int(value: usize, prefix: u8, pattern: u8, dst: &mut BytesMut) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        return dst.put_u8(pattern | value as u8);
    }
    dst.put_u8(pattern | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        dst.put_u8(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    dst.put_u8(rest as u8);
}

const STATIC_LEN: usize = 61;

/// The static table (RFC 7541 Appendix A), index 1 first.
const STATIC: [(&[u8], &[u8]); STATIC_LEN] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

/// The [`HeaderName`] of the static table's entry `index`, for the
/// regular names a head may carry: not the pseudo-fields, and not
/// `transfer-encoding`, which no HTTP/2 head may (RFC 9113 §8.2.2): those
/// go through the checks a literal name does.
pub fn static_header(index: usize) -> Option<HeaderName> {
    use header::*;
    Some(match index {
        15 => ACCEPT_CHARSET,
        16 => ACCEPT_ENCODING,
        17 => ACCEPT_LANGUAGE,
        18 => ACCEPT_RANGES,
        19 => ACCEPT,
        20 => ACCESS_CONTROL_ALLOW_ORIGIN,
        21 => AGE,
        22 => ALLOW,
        23 => AUTHORIZATION,
        24 => CACHE_CONTROL,
        25 => CONTENT_DISPOSITION,
        26 => CONTENT_ENCODING,
        27 => CONTENT_LANGUAGE,
        28 => CONTENT_LENGTH,
        29 => CONTENT_LOCATION,
        30 => CONTENT_RANGE,
        31 => CONTENT_TYPE,
        32 => COOKIE,
        33 => DATE,
        34 => ETAG,
        35 => EXPECT,
        36 => EXPIRES,
        37 => FROM,
        38 => HOST,
        39 => IF_MATCH,
        40 => IF_MODIFIED_SINCE,
        41 => IF_NONE_MATCH,
        42 => IF_RANGE,
        43 => IF_UNMODIFIED_SINCE,
        44 => LAST_MODIFIED,
        45 => LINK,
        46 => LOCATION,
        47 => MAX_FORWARDS,
        48 => PROXY_AUTHENTICATE,
        49 => PROXY_AUTHORIZATION,
        50 => RANGE,
        51 => REFERER,
        52 => REFRESH,
        53 => RETRY_AFTER,
        54 => SERVER,
        55 => SET_COOKIE,
        56 => STRICT_TRANSPORT_SECURITY,
        58 => USER_AGENT,
        59 => VARY,
        60 => VIA,
        61 => WWW_AUTHENTICATE,
        _ => return None,
    })
}

/// The static table's index of the first entry named `name`: a name is
/// told apart from the table's 51 others by its length, first and last
/// byte (one jump, not a comparison with each), then compared once.
fn static_name(name: &[u8]) -> Option<usize> {
    let (&first, &last) = (name.first()?, name.last()?);
    let (index, known): (usize, &[u8]) = match (name.len(), first, last) {
        (10, b':', b'y') => (1, b":authority"),
        (7, b':', b'd') => (2, b":method"),
        (5, b':', b'h') => (4, b":path"),
        (7, b':', b'e') => (6, b":scheme"),
        (7, b':', b's') => (8, b":status"),
        (14, b'a', b't') => (15, b"accept-charset"),
        (15, b'a', b'g') => (16, b"accept-encoding"),
        (15, b'a', b'e') => (17, b"accept-language"),
        (13, b'a', b's') => (18, b"accept-ranges"),
        (6, b'a', b't') => (19, b"accept"),
        (27, b'a', b'n') => (20, b"access-control-allow-origin"),
        (3, b'a', b'e') => (21, b"age"),
        (5, b'a', b'w') => (22, b"allow"),
        (13, b'a', b'n') => (23, b"authorization"),
        (13, b'c', b'l') => (24, b"cache-control"),
        (19, b'c', b'n') => (25, b"content-disposition"),
        (16, b'c', b'g') => (26, b"content-encoding"),
        (16, b'c', b'e') => (27, b"content-language"),
        (14, b'c', b'h') => (28, b"content-length"),
        (16, b'c', b'n') => (29, b"content-location"),
        (13, b'c', b'e') => (30, b"content-range"),
        (12, b'c', b'e') => (31, b"content-type"),
        (6, b'c', b'e') => (32, b"cookie"),
        (4, b'd', b'e') => (33, b"date"),
        (4, b'e', b'g') => (34, b"etag"),
        (6, b'e', b't') => (35, b"expect"),
        (7, b'e', b's') => (36, b"expires"),
        (4, b'f', b'm') => (37, b"from"),
        (4, b'h', b't') => (38, b"host"),
        (8, b'i', b'h') => (39, b"if-match"),
        (17, b'i', b'e') => (40, b"if-modified-since"),
        (13, b'i', b'h') => (41, b"if-none-match"),
        (8, b'i', b'e') => (42, b"if-range"),
        (19, b'i', b'e') => (43, b"if-unmodified-since"),
        (13, b'l', b'd') => (44, b"last-modified"),
        (4, b'l', b'k') => (45, b"link"),
        (8, b'l', b'n') => (46, b"location"),
        (12, b'm', b's') => (47, b"max-forwards"),
        (18, b'p', b'e') => (48, b"proxy-authenticate"),
        (19, b'p', b'n') => (49, b"proxy-authorization"),
        (5, b'r', b'e') => (50, b"range"),
        (7, b'r', b'r') => (51, b"referer"),
        (7, b'r', b'h') => (52, b"refresh"),
        (11, b'r', b'r') => (53, b"retry-after"),
        (6, b's', b'r') => (54, b"server"),
        (10, b's', b'e') => (55, b"set-cookie"),
        (25, b's', b'y') => (56, b"strict-transport-security"),
        (17, b't', b'g') => (57, b"transfer-encoding"),
        (10, b'u', b't') => (58, b"user-agent"),
        (4, b'v', b'y') => (59, b"vary"),
        (3, b'v', b'a') => (60, b"via"),
        (16, b'w', b'e') => (61, b"www-authenticate"),
        _ => return None,
    };
    (name == known).then_some(index)
}

/// The static table's index of `name`'s first entry, and of the entry
/// naming both `name` and `value`, if any (RFC 7541 Appendix A).
pub(super) fn static_index(name: &[u8], value: &[u8]) -> (Option<usize>, Option<usize>) {
    let Some(index) = static_name(name) else {
        return (None, None);
    };
    // The entries with a value: `:method`, `:path`, `:scheme`, `:status`
    // and `accept-encoding`.
    let full = match (index, value) {
        (2, b"GET") => Some(2),
        (2, b"POST") => Some(3),
        (4, b"/") => Some(4),
        (4, b"/index.html") => Some(5),
        (6, b"http") => Some(6),
        (6, b"https") => Some(7),
        (8, b"200") => Some(8),
        (8, b"204") => Some(9),
        (8, b"206") => Some(10),
        (8, b"304") => Some(11),
        (8, b"400") => Some(12),
        (8, b"404") => Some(13),
        (8, b"500") => Some(14),
        (16, b"gzip, deflate") => Some(16),
        _ => None,
    };
    (Some(index), full)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields that name the newest entry's name and are added to the table
    /// share that name: a block of such two-byte fields costs no copy of
    /// a long name each (it cost a copy of 3,000 bytes a field).
    #[test]
    fn an_entry_named_by_an_entry_shares_its_name() {
        let mut block = BytesMut::new();
        // A literal name of 3,000 bytes, an empty value, indexed.
        block.put_u8(0x40);
        put_int(3000, 7, 0, &mut block);
        block.extend_from_slice(&[b'n'; 3000]);
        block.put_u8(0);
        // Then ten fields naming the newest entry (62), indexed.
        for _ in 0..10 {
            block.extend_from_slice(&[0x7e, 0x00]);
        }
        let mut decoder = Decoder::default();
        let mut seen = 0;
        let fit = decoder.decode(&block.freeze(), 64 * 1024, |_| seen += 1);
        assert_eq!(fit, Ok(true));
        assert_eq!(seen, 11);
        assert_eq!(decoder.table.entries.len(), 1, "each evicts the one before");
        // An entry named by the one before it shares its name: the same
        // bytes in memory, never copied.
        let mut again = Decoder::default();
        let mut first = BytesMut::new();
        first.put_u8(0x40);
        put_int(3000, 7, 0, &mut first);
        first.extend_from_slice(&[b'n'; 3000]);
        first.put_u8(0);
        let _ = again.decode(&first.freeze(), 64 * 1024, |_| {});
        let before = again.table.entries.front().map(|(name, _)| name.as_ptr());
        let _ = again.decode(&Bytes::from(vec![0x7e, 0x00]), 64 * 1024, |_| {});
        let after = again.table.entries.front().map(|(name, _)| name.as_ptr());
        assert!(before.is_some());
        assert_eq!(before, after, "the name was copied");
    }

    fn hex(s: &str) -> Bytes {
        let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        let byte = |pair: &[u8]| {
            let text = std::str::from_utf8(pair).unwrap_or_default();
            u8::from_str_radix(text, 16).unwrap_or_default()
        };
        digits.chunks(2).map(byte).collect::<Vec<u8>>().into()
    }

    fn decode_all(decoder: &mut Decoder, block: &Bytes) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let fit = decoder.decode(block, usize::MAX, |f| {
            out.push((
                String::from_utf8_lossy(&f.name).into_owned(),
                String::from_utf8_lossy(&f.value).into_owned(),
            ))
        });
        assert_eq!(fit, Ok(true));
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one
    /// connection, each way. The encoder, indexing as the RFC's examples
    /// do, writes the RFC's bytes.
    #[test]
    fn the_rfc_request_examples() {
        let heads: [&[(&str, &str)]; 3] = [
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ],
            &[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ],
        ];
        let plain = [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ];
        let huffman = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        for (blocks, huffman_on) in [(plain, false), (huffman, true)] {
            let mut decoder = Decoder::default();
            let huffman = if huffman_on {
                Huffman::Always
            } else {
                Huffman::Never
            };
            let mut encoder = Encoder::default().huffman(huffman);
            for (head, block) in heads.iter().zip(blocks) {
                let block = hex(block);
                assert_eq!(decode_all(&mut decoder, &block), pairs(head));
                let mut out = BytesMut::new();
                encoder.begin(&mut out);
                for (n, v) in head.iter() {
                    encoder.field(n.as_bytes(), v.as_bytes(), Indexing::Index, &mut out);
                }
                assert_eq!(out.freeze(), block, "huffman {huffman_on}");
            }
            // The table as C.3.3 / C.4.3 leave it: 164 bytes, 3 entries.
            assert_eq!(decoder.table.size, 164);
            assert_eq!(encoder.table.size, 164);
        }
    }

    /// RFC 7541 C.5: three responses through a 256-byte table, entries
    /// evicted as the RFC shows.
    #[test]
    fn the_rfc_response_examples_evict() {
        let blocks = [
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d \
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 \
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e \
             3d31",
        ];
        let heads: [&[(&str, &str)]; 3] = [
            &[
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ],
            &[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ],
            &[
                (":status", "200"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
                ("location", "https://www.example.com"),
                ("content-encoding", "gzip"),
                (
                    "set-cookie",
                    "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
                ),
            ],
        ];
        let mut decoder = Decoder::new(256);
        decoder.set_limit(256);
        let mut encoder = Encoder::new(256).huffman(Huffman::Never);
        // The RFC's table starts at 256 with no update sent.
        encoder.pending = None;
        let sizes = [222, 222, 215];
        for ((head, block), size) in heads.iter().zip(blocks).zip(sizes) {
            let block = hex(block);
            assert_eq!(decode_all(&mut decoder, &block), pairs(head));
            assert_eq!(decoder.table.size, size);
            let mut out = BytesMut::new();
            encoder.begin(&mut out);
            for (n, v) in head.iter() {
                encoder.field(n.as_bytes(), v.as_bytes(), Indexing::Index, &mut out);
            }
            assert_eq!(out.freeze(), block);
        }
        assert_eq!(decoder.table.entries.len(), 3);
    }

    /// Answers of one second send their `date` as an index after the
    /// first; a request ID never goes into the table.
    #[test]
    fn a_date_is_indexed_and_a_request_id_is_not() {
        let mut encoder = Encoder::default();
        let mut decoder = Decoder::default();
        let date = b"Mon, 07 Dec 2026 12:00:00 GMT";
        let mut sizes = Vec::new();
        for id in [b"0123456789abcdef", b"fedcba9876543210"] {
            let mut block = BytesMut::new();
            encoder.begin(&mut block);
            encoder.field(b"date", date, indexing_for(b"date"), &mut block);
            let at = block.len();
            let id_indexing = indexing_for(b"x-request-id");
            encoder.field(b"x-request-id", id, id_indexing, &mut block);
            sizes.push((at, block.len() - at));
            let fields = decode_all(&mut decoder, &block.freeze());
            let id = String::from_utf8_lossy(id);
            assert_eq!(
                fields,
                pairs(&[
                    ("date", std::str::from_utf8(date).unwrap()),
                    ("x-request-id", &id)
                ])
            );
        }
        // The second date is one byte; each ID is its literal (1 + 1 + 12
        // + 1 + 16 bytes: not in the table, its name not either).
        assert_eq!(sizes[1], (1, 31));
        assert!(sizes[0].0 > 20);
        assert_eq!(encoder.table.entries.len(), 1);
        assert_eq!(decoder.table.entries.len(), 1);
    }

    /// RFC 7541 C.2: a literal not indexed and a never-indexed one are
    /// not added to the table; the never-indexed one says so.
    /// A Huffman string that decodes to more than `SCRATCH` gets a buffer
    /// of its own: the decoder does not take that buffer up afterwards
    /// (it would keep it, and the next fields would share it).
    #[test]
    fn a_long_huffman_string_is_not_kept_by_the_decoder() {
        let mut encoder = Encoder::default().huffman(Huffman::Always);
        let mut decoder = Decoder::default();
        let long = "a".repeat(3 * SCRATCH);
        for value in [long.as_str(), "short", "short"] {
            let mut block = BytesMut::new();
            encoder.begin(&mut block);
            encoder.field(b"x-long", value.as_bytes(), Indexing::Skip, &mut block);
            // Decoded and let go: the buffer is the decoder's to reuse.
            let fields = decode_all(&mut decoder, &block.freeze());
            assert_eq!(fields, pairs(&[("x-long", value)]));
            let kept = decoder.strings.scratch.capacity();
            assert!(
                kept <= SCRATCH,
                "{kept} bytes kept after {} bytes",
                value.len()
            );
        }
    }

    /// Values sent again and again as literals, as nginx sends its
    /// answers' `server` and `date`, are decoded alike from the recent ones:
    /// more of them than are kept, of equal lengths, in rounds.
    #[test]
    fn huffman_strings_sent_again_decode_alike_from_the_recent_ones() {
        let mut encoder = Encoder::default().huffman(Huffman::Always);
        let mut decoder = Decoder::default();
        let values: Vec<String> = (0..RECENT + 3).map(|i| format!("nginx/1.{i:02}")).collect();
        for round in 0..3 {
            for (i, value) in values.iter().enumerate() {
                let long = format!("{value}-{}", "z".repeat(RECENT_CODED * 2));
                let mut block = BytesMut::new();
                encoder.begin(&mut block);
                encoder.field(b"server", value.as_bytes(), Indexing::Skip, &mut block);
                encoder.field(b"x-long", long.as_bytes(), Indexing::Skip, &mut block);
                let block = block.freeze();
                let fields = decode_all(&mut decoder, &block);
                assert_eq!(
                    fields,
                    pairs(&[("server", value), ("x-long", &long)]),
                    "round {round}, value {i}"
                );
            }
        }
        // The last ones are kept, as coded; the long one is not.
        let recent = decoder
            .strings
            .recent
            .as_ref()
            .expect("made at the first string");
        let mut coded = BytesMut::new();
        string(values[RECENT + 2].as_bytes(), true, &mut coded);
        assert_eq!(
            recent.find(&coded[1..]),
            Some(values[RECENT + 2].as_bytes())
        );
        let mut first = BytesMut::new();
        string(values[0].as_bytes(), true, &mut first);
        assert_eq!(recent.find(&first[1..]), None, "replaced, oldest first");
        assert!(recent
            .slots
            .iter()
            .all(|slot| usize::from(slot.coded_len) <= RECENT_CODED));
    }

    /// A Huffman string broken off leaves nothing in front of the next.
    #[test]
    fn a_broken_huffman_string_leaves_nothing_behind() {
        let mut decoder = Decoder::default();
        // A literal of 3 Huffman bytes ending in a full byte of padding
        // (more than 7 bits: RFC 7541 §5.2), after one good symbol.
        let bad = Bytes::from_static(&[0x00, 0x01, b'x', 0x83, 0x1f, 0xff, 0xff]);
        assert!(decoder.decode(&bad, usize::MAX, |_| {}).is_err());
        let mut encoder = Encoder::default().huffman(Huffman::Always);
        let mut block = BytesMut::new();
        encoder.begin(&mut block);
        encoder.field(b"x", b"www.example.com", Indexing::Skip, &mut block);
        let fields = decode_all(&mut decoder, &block.freeze());
        assert_eq!(fields, pairs(&[("x", "www.example.com")]));
    }

    #[test]
    fn literals_not_indexed_stay_out_of_the_table() {
        let mut decoder = Decoder::default();
        let mut sensitive = Vec::new();
        let block =
            hex("040c 2f73 616d 706c 652f 7061 7468 1008 7061 7373 776f 7264 0673 6563 7265 74");
        let fit = decoder.decode(&block, usize::MAX, |f| {
            sensitive.push((f.value, f.sensitive))
        });
        assert_eq!(fit, Ok(true));
        assert_eq!(
            sensitive,
            [
                (Bytes::from_static(b"/sample/path"), false),
                (Bytes::from_static(b"secret"), true)
            ]
        );
        assert!(decoder.table.entries.is_empty());
    }

    /// Size updates: only before the block's fields, never past the
    /// limit; the encoder sends the least size since its last block, then
    /// the last (RFC 7541 §4.2).
    #[test]
    fn size_updates_are_checked_and_sent() {
        let mut decoder = Decoder::default();
        assert_eq!(decoder.decode(&hex("3fe1 1f"), 0, |_| {}), Ok(true)); // 4096
        assert_eq!(
            decoder.decode(&hex("3fe2 1f"), 0, |_| {}), // 4097
            Err(DecodeError::BadSizeUpdate)
        );
        assert_eq!(
            decoder.decode(&hex("8220"), usize::MAX, |_| {}),
            Err(DecodeError::BadSizeUpdate)
        );
        let mut encoder = Encoder::default();
        encoder.resize(0);
        encoder.resize(300);
        let mut out = BytesMut::new();
        encoder.begin(&mut out);
        assert_eq!(out.freeze(), hex("20 3f8d 02"));
        let mut out = BytesMut::new();
        encoder.begin(&mut out);
        assert!(out.is_empty());
    }

    /// Fields past the list's limit are decoded (the table stays in step)
    /// but not handed out.
    #[test]
    fn a_list_over_its_limit_keeps_the_table_in_step() {
        let mut encoder = Encoder::default();
        let mut block = BytesMut::new();
        encoder.field(b"x-a", &[b'a'; 100], Indexing::Index, &mut block);
        encoder.field(b"x-b", &[b'b'; 100], Indexing::Index, &mut block);
        let block = block.freeze();
        let mut decoder = Decoder::default();
        let mut seen = 0;
        assert_eq!(decoder.decode(&block, 150, |_| seen += 1), Ok(false));
        assert_eq!(seen, 1);
        assert_eq!(decoder.table.entries.len(), 2);
        // The next block refers to both by index.
        let mut next = BytesMut::new();
        encoder.field(b"x-b", &[b'b'; 100], Indexing::Index, &mut next);
        let mut values = Vec::new();
        let ok = decoder.decode(&next.freeze(), usize::MAX, |f| values.push(f.value));
        assert_eq!(ok, Ok(true));
        assert_eq!(values, [Bytes::from(vec![b'b'; 100])]);
    }

    /// Integers past 32 bits, and runs of continuation bytes, are refused
    /// without overflowing.
    #[test]
    fn oversized_integers_are_refused() {
        let mut decoder = Decoder::default();
        assert_eq!(
            decoder.decode(&hex("ff ff ff ff ff 0f"), usize::MAX, |_| {}),
            Err(DecodeError::Overflow)
        );
        let zeros = hex("ff 80 80 80 80 80 80 80 80 80 80 80 00");
        assert_eq!(
            decoder.decode(&zeros, usize::MAX, |_| {}),
            Err(DecodeError::Overflow)
        );
        assert_eq!(
            decoder.decode(&hex("ff"), usize::MAX, |_| {}),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decoder.decode(&hex("80"), usize::MAX, |_| {}),
            Err(DecodeError::BadIndex)
        );
        assert_eq!(
            decoder.decode(&hex("be"), usize::MAX, |_| {}),
            Err(DecodeError::BadIndex)
        );
    }

    /// An entry larger than the whole table empties it and is not kept
    /// (RFC 7541 §4.4); the field itself is still handed out.
    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(DEFAULT_TABLE_SIZE);
        decoder.set_limit(100);
        let mut block = BytesMut::new();
        let mut encoder = Encoder::new(4096).huffman(Huffman::Never);
        encoder.pending = None;
        encoder.field(b"x-a", b"1", Indexing::Index, &mut block);
        encoder.field(b"x-b", &[b'b'; 80], Indexing::Index, &mut block);
        let mut values = Vec::new();
        let fit = decoder.decode(&block.freeze(), usize::MAX, |f| values.push(f.value.len()));
        assert_eq!(fit, Ok(true));
        assert_eq!(values, [1, 80]);
        assert!(decoder.table.entries.is_empty());
        assert_eq!(decoder.table.size, 0);
    }

    /// Before its settings are acknowledged, a decoder takes the peer's
    /// blocks as the peer's initial 4,096-byte table makes them; after,
    /// its own smaller limit holds.
    #[test]
    fn the_table_follows_the_settings_once_acknowledged() {
        let mut decoder = Decoder::new(1024);
        let mut encoder = Encoder::default().huffman(Huffman::Never);
        let mut block = BytesMut::new();
        encoder.field(b"x-a", &[b'a'; 1000], Indexing::Index, &mut block);
        encoder.field(b"x-b", &[b'b'; 1000], Indexing::Index, &mut block);
        assert_eq!(
            decoder.decode(&block.freeze(), usize::MAX, |_| {}),
            Ok(true)
        );
        let mut block = BytesMut::new();
        encoder.field(b"x-a", &[b'a'; 1000], Indexing::Index, &mut block);
        assert_eq!(&block[..], &[0xbf][..], "x-a by its index, 63");
        let mut values = Vec::new();
        let ok = decoder.decode(&block.freeze(), usize::MAX, |f| values.push(f.value.len()));
        assert_eq!((ok, values), (Ok(true), vec![1000]));
        // Acknowledged: the peer's encoder shrinks to 1,024, this end too.
        decoder.set_limit(1024);
        encoder.resize(1024);
        let mut block = BytesMut::new();
        encoder.begin(&mut block);
        encoder.field(b"x-c", b"c", Indexing::Index, &mut block);
        assert_eq!(
            decoder.decode(&block.freeze(), usize::MAX, |_| {}),
            Ok(true)
        );
        assert_eq!(decoder.table.size, encoder.table.size);
        // Past the limit, refused.
        assert_eq!(
            decoder.decode(&hex("3fe1 0f"), 0, |_| {}), // 2048
            Err(DecodeError::BadSizeUpdate)
        );
    }

    /// An encoder never uses more than 4,096 bytes of table, whatever the
    /// peer allows.
    #[test]
    fn the_encoder_keeps_its_table_small() {
        let mut encoder = Encoder::new(1 << 30);
        let mut block = BytesMut::new();
        encoder.begin(&mut block);
        assert!(block.is_empty(), "no update: 4,096 is where it starts");
        encoder.resize(u32::MAX as usize);
        assert_eq!(encoder.table.max_size, DEFAULT_TABLE_SIZE);
    }

    /// The encoder's static lookup agrees with the table it stands for.
    #[test]
    fn the_static_lookup_matches_the_table() {
        for (i, (name, value)) in STATIC.iter().enumerate() {
            let first = STATIC.iter().position(|(n, _)| n == name).map(|p| p + 1);
            let (by_name, full) = static_index(name, value);
            assert_eq!(by_name, first, "{}", String::from_utf8_lossy(name));
            if !value.is_empty() {
                assert_eq!(full, Some(i + 1));
            }
        }
        assert_eq!(static_index(b"x-other", b""), (None, None));
        // Each regular name's `HeaderName`, but `transfer-encoding`'s.
        for (i, (name, _)) in STATIC.iter().enumerate() {
            let known = static_header(i + 1);
            match name.starts_with(b":") || &name[..] == b"transfer-encoding" {
                true => assert_eq!(known, None),
                false => assert_eq!(
                    known.as_ref().map(|n| n.as_str().as_bytes()),
                    Some(&name[..])
                ),
            }
        }
        assert_eq!((static_header(0), static_header(62)), (None, None));
        assert_eq!(static_index(b"", b""), (None, None));
        // The length, first and last byte of a name in the table.
        assert_eq!(static_index(b"uxxx-xxent", b""), (None, None));
        assert_eq!(static_index(b":mxxxxd", b"GET"), (None, None));
        assert_eq!(static_index(b":method", b"PUT"), (Some(2), None));
        assert_eq!(static_index(b"server", b"200"), (Some(54), None));
    }
}
