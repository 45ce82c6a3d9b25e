//! The differential harness: almond's frames and header blocks against the
//! `h2` crate's (its `unstable` feature, in tests only), on generated
//! input. Blocks almond encodes must decode in `h2` to the same fields,
//! and blocks `h2` encodes (its dynamic table and Huffman coding) must
//! decode in almond to the same; each frame either side writes must read
//! back the same on the other. 256 cases a property (proptest's default).

use super::frame::{self, Assembled, Block, Head, Reason, Settings};
use super::hpack::{field_size, Decoder, Encoder, Field, Huffman, Indexing};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use h2::frame as theirs;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// One request's head: its pseudo-fields, then its fields (name, value,
/// sensitive), in order.
#[derive(Debug, Clone)]
struct Head1 {
    method: String,
    scheme: &'static str,
    authority: String,
    path: String,
    fields: Vec<(String, String, bool)>,
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user-agent".to_owned()),
        Just("accept".to_owned()),
        Just("accept-encoding".to_owned()),
        Just("content-type".to_owned()),
        Just("content-length".to_owned()),
        Just("x-request-id".to_owned()),
        Just("traceparent".to_owned()),
        Just("authorization".to_owned()),
        Just("cookie".to_owned()),
        Just("grpc-timeout".to_owned()),
        // Not the connection-specific names, which `h2` refuses in a
        // request (RFC 9113 §8.2.2): `te` came up once, with "".
        "[a-z][a-z0-9-]{0,20}".prop_filter("connection-specific", |name| !matches!(
            name.as_str(),
            "te" | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "upgrade"
        )),
    ]
}

fn field_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("gzip, deflate".to_owned()),
        Just("application/json".to_owned()),
        "[a-zA-Z0-9/+=;.,:_-]{1,40}",
        // Printable with inner spaces and the rarer characters (long
        // Huffman codes).
        "[!-~]([ -~]{0,60}[!-~])?",
        // Long enough to take CONTINUATION frames.
        "[a-z]{17000,17100}",
    ]
}

fn head1() -> impl Strategy<Value = Head1> {
    (
        prop_oneof![
            Just("GET".to_owned()),
            Just("POST".to_owned()),
            "[A-Z]{1,8}"
        ],
        prop_oneof![Just("http"), Just("https")],
        "[a-z0-9.-]{1,30}(:[0-9]{1,5})?",
        prop_oneof![
            Just("/".to_owned()),
            "/[a-zA-Z0-9/._~%!$&'()*+,;=:@?-]{0,80}"
        ],
        proptest::collection::vec((field_name(), field_value(), any::<bool>()), 0..10),
    )
        .prop_map(|(method, scheme, authority, path, fields)| Head1 {
            method,
            scheme,
            authority,
            path,
            fields,
        })
}

/// The heads one connection carries: a few kinds of request, sent again
/// and again in any order (so that fields are found in the table, and
/// found evicted).
fn connection() -> impl Strategy<Value = Vec<Head1>> {
    (
        proptest::collection::vec(head1(), 1..4),
        proptest::collection::vec(0usize..4, 1..12),
    )
        .prop_map(|(kinds, order)| {
            order
                .iter()
                .map(|i| kinds[i % kinds.len()].clone())
                .collect()
        })
}

/// The fields as a comparable list: pseudo first, then the rest sorted
/// (`h2` groups a name's values together).
fn expected(head: &Head1, end: bool) -> Vec<(String, String)> {
    let rest: Vec<_> = (head.fields.iter())
        .map(|(n, v, _)| (n.clone(), v.clone()))
        .collect();
    let rest = by_name(rest);
    let mut all = vec![
        (":method".to_owned(), head.method.clone()),
        (":scheme".to_owned(), head.scheme.to_owned()),
        (":authority".to_owned(), head.authority.clone()),
        (":path".to_owned(), head.path.clone()),
    ];
    all.extend(rest);
    all.push((":end".to_owned(), end.to_string()));
    all
}

/// Fields grouped by name, names in order, each name's values in the order
/// they came (what a header map keeps: the order between names is lost,
/// the order of one name's values is not).
fn by_name(fields: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut names: Vec<String> = fields.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        out.extend(fields.iter().filter(|(n, _)| *n == name).cloned());
    }
    out
}

/// Whether the `i`th head of a connection ends its stream (every other).
fn ends(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// Our list of decoded fields in the same shape.
fn ours(fields: &[Field], end: bool) -> Vec<(String, String)> {
    let text = |b: &Bytes| String::from_utf8_lossy(b).into_owned();
    let (pseudo, rest): (Vec<_>, Vec<_>) = fields.iter().partition(|f| f.name.starts_with(b":"));
    let mut pseudo: Vec<_> = pseudo
        .iter()
        .map(|f| (text(&f.name), text(&f.value)))
        .collect();
    let order = [":method", ":scheme", ":authority", ":path"];
    pseudo.sort_by_key(|(n, _)| order.iter().position(|o| o == n));
    let rest: Vec<_> = rest
        .iter()
        .map(|f| (text(&f.name), text(&f.value)))
        .collect();
    pseudo.extend(by_name(rest));
    pseudo.push((":end".to_owned(), end.to_string()));
    pseudo
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// Reads every frame `h2` finds in `bytes`: its decoded heads.
fn h2_reads(bytes: &[u8], table: usize) -> Vec<Result<Vec<(String, String)>, String>> {
    runtime().block_on(async {
        let (mut feed, io) = tokio::io::duplex(bytes.len() + 1);
        tokio::io::AsyncWriteExt::write_all(&mut feed, bytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(feed);
        let mut codec = h2::Codec::<_, Bytes>::new(io);
        codec.set_recv_header_table_size(table);
        codec.set_max_recv_header_list_size(1 << 20);
        let mut out = Vec::new();
        while let Some(frame) = codec.next().await {
            out.push(match frame {
                Ok(theirs::Frame::Headers(headers)) => {
                    let end = headers.is_end_stream();
                    let (pseudo, fields) = headers.into_parts();
                    let mut all = vec![
                        (
                            ":method".to_owned(),
                            pseudo.method.map(|m| m.to_string()).unwrap_or_default(),
                        ),
                        (
                            ":scheme".to_owned(),
                            pseudo.scheme.map(|s| s.to_string()).unwrap_or_default(),
                        ),
                        (
                            ":authority".to_owned(),
                            pseudo.authority.map(|s| s.to_string()).unwrap_or_default(),
                        ),
                        (
                            ":path".to_owned(),
                            pseudo.path.map(|s| s.to_string()).unwrap_or_default(),
                        ),
                    ];
                    let rest: Vec<_> = (fields.iter())
                        .map(|(n, v)| {
                            (
                                n.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect();
                    all.extend(by_name(rest));
                    all.push((":end".to_owned(), end.to_string()));
                    Ok(all)
                }
                Ok(other) => Err(format!("not a head: {other:?}")),
                Err(e) => Err(format!("h2 refused: {e}")),
            });
        }
        out
    })
}

/// Encodes `heads` with almond's encoder, each a `HEADERS` frame (and its
/// `CONTINUATION`s) on its own stream.
fn encode_ours(
    heads: &[Head1],
    encoder: &mut Encoder,
    resize_at: Option<(usize, usize)>,
) -> BytesMut {
    let mut wire = BytesMut::new();
    for (i, head) in heads.iter().enumerate() {
        if let Some((at, size)) = resize_at {
            if at == i {
                encoder.resize(size);
            }
        }
        let mut block = BytesMut::new();
        encoder.begin(&mut block);
        let pseudo = [
            (":method", head.method.as_str()),
            (":scheme", head.scheme),
            (":authority", head.authority.as_str()),
            (":path", head.path.as_str()),
        ];
        for (name, value) in pseudo {
            let indexing = super::hpack::indexing_for(name.as_bytes());
            encoder.field(name.as_bytes(), value.as_bytes(), indexing, &mut block);
        }
        for (name, value, sensitive) in &head.fields {
            let indexing = match sensitive {
                true => Indexing::Never,
                false => super::hpack::indexing_for(name.as_bytes()),
            };
            encoder.field(name.as_bytes(), value.as_bytes(), indexing, &mut block);
        }
        let stream = 2 * i as u32 + 1;
        frame::write_headers(stream, &block, ends(i), frame::DEFAULT_MAX_FRAME, &mut wire);
    }
    wire
}

/// Encodes `heads` with `h2`'s encoder (its table of `table` bytes).
fn encode_theirs(heads: &[Head1], table: usize) -> BytesMut {
    runtime().block_on(async {
        let (io, mut out) = tokio::io::duplex(1 << 24);
        let mut codec = h2::Codec::<_, Bytes>::new(io);
        codec.set_send_header_table_size(table);
        for (i, head) in heads.iter().enumerate() {
            let method = Method::from_bytes(head.method.as_bytes()).unwrap_or(Method::GET);
            let uri = format!("{}://{}{}", head.scheme, head.authority, head.path);
            let uri = uri.parse().unwrap_or_else(|e| panic!("{uri}: {e}"));
            let pseudo = theirs::Pseudo::request(method, uri, None);
            let mut fields = HeaderMap::new();
            for (name, value, sensitive) in &head.fields {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let mut value =
                    HeaderValue::from_str(value).unwrap_or_else(|e| panic!("{value}: {e}"));
                value.set_sensitive(*sensitive);
                fields.append(name, value);
            }
            let mut headers =
                theirs::Headers::new(theirs::StreamId::from(2 * i as u32 + 1), pseudo, fields);
            if ends(i) {
                headers.set_end_stream();
            }
            futures_util::future::poll_fn(|cx| codec.poll_ready(cx))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            codec
                .buffer(headers.into())
                .unwrap_or_else(|e| panic!("{e:?}"));
            futures_util::future::poll_fn(|cx| codec.flush(cx))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        drop(codec);
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut out, &mut wire)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        BytesMut::from(&wire[..])
    })
}

/// Decodes every head in `wire` with almond's frame reader and decoder.
fn decode_ours(mut wire: BytesMut, decoder: &mut Decoder) -> Vec<(Vec<Field>, bool)> {
    let mut heads = Vec::new();
    let mut partial: Option<Block> = None;
    while let Some((head, payload)) =
        frame::next(&mut wire, frame::DEFAULT_MAX_FRAME).unwrap_or_else(|e| panic!("frame: {e}"))
    {
        let assembled = match partial.take() {
            Some(block) => block.push(&head, &payload),
            None => Block::start(&head, payload, 1 << 20),
        };
        match assembled.unwrap_or_else(|e| panic!("block: {e}")) {
            Assembled::Partial(block) => partial = Some(block),
            Assembled::Whole {
                block, end_stream, ..
            } => {
                let mut fields = Vec::new();
                let fit = decoder
                    .decode(&block, 1 << 20, |f| fields.push(f))
                    .unwrap_or_else(|e| panic!("hpack: {e}"));
                assert!(fit);
                heads.push((fields, end_stream));
            }
        }
    }
    assert!(partial.is_none(), "a block left unfinished");
    assert!(wire.is_empty(), "bytes left over");
    heads
}

proptest! {
    /// Heads almond encodes (any table size, any Huffman coding, the table
    /// resized between blocks) decode in `h2` to the
    /// same fields.
    #[test]
    fn almond_encodes_what_h2_decodes(
        heads in connection(),
        size in prop_oneof![Just(0usize), Just(64), Just(150), Just(256), Just(4096)],
        resize in proptest::option::of((0usize..12, prop_oneof![Just(0usize), Just(128), Just(4096)])),
        huffman in prop_oneof![Just(Huffman::Never), Just(Huffman::Indexed), Just(Huffman::Always)],
        limit in 0usize..600,
    ) {
        let mut encoder = Encoder::new(size).huffman(huffman);
        let wire = encode_ours(&heads, &mut encoder, resize);
        let read = h2_reads(&wire, 4096);
        prop_assert_eq!(read.len(), heads.len());
        for (i, (got, head)) in read.into_iter().zip(&heads).enumerate() {
            prop_assert_eq!(got, Ok(expected(head, ends(i))));
        }
        // And almond reads its own blocks back the same, in order, and
        // within a limit only the fields that fit.
        let mut decoder = Decoder::default();
        let back = decode_ours(wire.clone(), &mut decoder);
        for (i, ((fields, end), head)) in back.iter().zip(&heads).enumerate() {
            prop_assert_eq!(ours(fields, *end), expected(head, ends(i)));
            let sent: Vec<_> = head.fields.iter().map(|(n, v, _)| (n.as_bytes(), v.as_bytes())).collect();
            let got: Vec<_> = fields[4..].iter().map(|f| (&f.name[..], &f.value[..])).collect();
            prop_assert_eq!(got, sent);
        }
        let mut decoder = Decoder::default();
        let mut wire = wire;
        let mut partial: Option<Block> = None;
        let mut i = 0;
        while let Ok(Some((head, payload))) = frame::next(&mut wire, frame::DEFAULT_MAX_FRAME) {
            let assembled = match partial.take() {
                Some(block) => block.push(&head, &payload),
                None => Block::start(&head, payload, 1 << 20),
            };
            let block = match assembled {
                Ok(Assembled::Partial(block)) => {
                    partial = Some(block);
                    continue;
                }
                Ok(Assembled::Whole { block, .. }) => block,
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            let mut handed = Vec::new();
            let fit = decoder.decode(&block, limit, |f| handed.push(field_size(&f.name, &f.value)));
            let h = &heads[i];
            let pseudo = [
                (":method", h.method.as_str()),
                (":scheme", h.scheme),
                (":authority", h.authority.as_str()),
                (":path", h.path.as_str()),
            ];
            let sizes: Vec<usize> = (pseudo.iter().map(|(n, v)| field_size(n.as_bytes(), v.as_bytes())))
                .chain(h.fields.iter().map(|(n, v, _)| field_size(n.as_bytes(), v.as_bytes())))
                .collect();
            let total: usize = sizes.iter().sum();
            // The fields handed out are the ones whose running total fits.
            let mut running = 0;
            let fitting: Vec<usize> = (sizes.iter().copied())
                .take_while(|n| {
                    running += n;
                    running <= limit
                })
                .collect();
            prop_assert_eq!(fit, Ok(total <= limit));
            prop_assert_eq!(handed, fitting);
            i += 1;
        }
        prop_assert_eq!(i, heads.len());
    }

    /// Heads `h2` encodes (its dynamic table of any size, Huffman coding,
    /// sensitive fields never indexed) decode in almond to the same
    /// fields, the sensitive ones marked so (unless sent as a static
    /// table index).
    #[test]
    fn h2_encodes_what_almond_decodes(
        heads in connection(),
        size in prop_oneof![Just(0usize), Just(150), Just(256), Just(4096)],
    ) {
        let wire = encode_theirs(&heads, size);
        let mut decoder = Decoder::default();
        let back = decode_ours(wire, &mut decoder);
        prop_assert_eq!(back.len(), heads.len());
        for (i, ((fields, end), head)) in back.iter().zip(&heads).enumerate() {
            prop_assert_eq!(ours(fields, *end), expected(head, ends(i)));
            for (name, value, sensitive) in &head.fields {
                // A field the static table holds whole may go as its index
                // (which tells an observer nothing).
                let in_static = super::hpack::static_index(name.as_bytes(), value.as_bytes()).1.is_some();
                if *sensitive && !in_static {
                    let marked = fields.iter().any(|f| {
                        f.name == name.as_bytes() && f.value == value.as_bytes() && f.sensitive
                    });
                    prop_assert!(marked, "{} not marked sensitive", name);
                }
            }
        }
    }

    /// Any bytes as a header block: decoded or refused, never a panic, and
    /// a block that decodes hands out no more than its size allows.
    #[test]
    fn any_block_is_decoded_or_refused(block in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut decoder = Decoder::new(256);
        let mut size = 0;
        let block = Bytes::from(block);
        if decoder.decode(&block, 1000, |f| size += f.name.len() + f.value.len() + 32).is_ok() {
            prop_assert!(size <= 1000);
        }
    }

    /// Settings, pings, window updates, resets and `GOAWAY`s written by
    /// either side read back the same on the other.
    #[test]
    fn control_frames_agree(
        table in proptest::option::of(0u32..100_000),
        push in proptest::option::of(any::<bool>()),
        streams in proptest::option::of(any::<u32>()),
        window in proptest::option::of(0u32..=frame::MAX_WINDOW),
        max_frame in proptest::option::of(frame::DEFAULT_MAX_FRAME..=frame::MAX_FRAME_LIMIT),
        list in proptest::option::of(any::<u32>()),
        ping in any::<[u8; 8]>(),
        stream in 1u32..=frame::MAX_WINDOW,
        increment in 1u32..=frame::MAX_WINDOW,
        code in any::<u32>(),
    ) {
        // Ours to theirs.
        let settings = Settings {
            header_table_size: table,
            enable_push: push,
            max_concurrent_streams: streams,
            initial_window_size: window,
            max_frame_size: max_frame,
            max_header_list_size: list,
            enable_connect_protocol: None,
        };
        let mut wire = BytesMut::new();
        settings.write(&mut wire);
        let (head, payload) = split(&mut wire);
        let read = theirs::Settings::load(theirs::Head::parse(&head), &payload)
            .unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert_eq!(read.header_table_size(), table);
        prop_assert_eq!(read.is_push_enabled(), push);
        prop_assert_eq!(read.max_concurrent_streams(), streams);
        prop_assert_eq!(read.initial_window_size(), window);
        prop_assert_eq!(read.max_frame_size(), max_frame);
        prop_assert_eq!(read.max_header_list_size(), list);

        // Theirs to ours.
        let mut theirs_settings = theirs::Settings::default();
        theirs_settings.set_header_table_size(table);
        if let Some(push) = push {
            theirs_settings.set_enable_push(push);
        }
        theirs_settings.set_max_concurrent_streams(streams);
        theirs_settings.set_initial_window_size(window);
        theirs_settings.set_max_frame_size(max_frame);
        theirs_settings.set_max_header_list_size(list);
        let mut wire = BytesMut::new();
        theirs_settings.encode(&mut wire);
        let ((head, payload), rest) = next_whole(wire);
        prop_assert!(rest.is_empty());
        prop_assert_eq!(Settings::parse(&head, &payload), Ok(Some(settings)));

        let mut wire = BytesMut::new();
        frame::write_ping(false, ping, &mut wire);
        frame::write_ping(true, ping, &mut wire);
        frame::write_window_update(stream, increment, &mut wire);
        frame::write_rst_stream(stream, Reason(code), &mut wire);
        frame::write_goaway(stream, Reason(code), &mut wire);
        let mut frames = Vec::new();
        while !wire.is_empty() {
            frames.push(split(&mut wire));
        }
        let head = |h: &[u8; 9]| theirs::Head::parse(h);
        let p0 = theirs::Ping::load(head(&frames[0].0), &frames[0].1).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert!(!p0.is_ack() && *p0.payload() == ping);
        let p1 = theirs::Ping::load(head(&frames[1].0), &frames[1].1).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert!(p1.is_ack() && *p1.payload() == ping);
        let w = theirs::WindowUpdate::load(head(&frames[2].0), &frames[2].1).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert_eq!((u32::from(w.stream_id()), w.size_increment()), (stream, increment));
        let r = theirs::Reset::load(head(&frames[3].0), &frames[3].1).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert_eq!((u32::from(r.stream_id()), u32::from(r.reason())), (stream, code));
        let g = theirs::GoAway::load(head(&frames[4].0), &frames[4].1).unwrap_or_else(|e| panic!("{e:?}"));
        prop_assert_eq!((u32::from(g.last_stream_id()), u32::from(g.reason())), (stream, code));

        // Theirs to ours.
        let mut wire = BytesMut::new();
        theirs::Ping::new(ping).encode(&mut wire);
        theirs::Ping::pong(ping).encode(&mut wire);
        theirs::WindowUpdate::new(stream.into(), increment).encode(&mut wire);
        theirs::Reset::new(stream.into(), code.into()).encode(&mut wire);
        theirs::GoAway::new(stream.into(), code.into()).encode(&mut wire);
        let mut frames = Vec::new();
        while let Ok(Some(f)) = frame::next(&mut wire, frame::DEFAULT_MAX_FRAME) {
            frames.push(f);
        }
        prop_assert_eq!(frames.len(), 5);
        prop_assert_eq!(frame::ping(&frames[0].0, &frames[0].1), Ok(ping));
        prop_assert!(!frames[0].0.has(frame::flag::ACK) && frames[1].0.has(frame::flag::ACK));
        prop_assert_eq!(frame::window_update(&frames[2].0, &frames[2].1), Ok(increment));
        prop_assert_eq!(frames[2].0.stream, stream);
        prop_assert_eq!(frame::rst_stream(&frames[3].0, &frames[3].1), Ok(Reason(code)));
        let goaway = frame::goaway(&frames[4].0, frames[4].1.clone()).unwrap_or_else(|e| panic!("{e}"));
        prop_assert_eq!((goaway.last_stream, goaway.reason), (stream, Reason(code)));
    }
}

/// The first frame in `wire`, as a head and a payload, taken off it.
fn split(wire: &mut BytesMut) -> ([u8; 9], Bytes) {
    let ((head, payload), rest) = next_whole(std::mem::take(wire));
    *wire = rest;
    let mut raw = BytesMut::new();
    head.write(&mut raw);
    let raw: [u8; 9] = raw[..].try_into().unwrap_or_else(|e| panic!("{e}"));
    (raw, payload)
}

fn next_whole(mut wire: BytesMut) -> ((Head, Bytes), BytesMut) {
    let frame = frame::next(&mut wire, frame::MAX_FRAME_LIMIT)
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("a whole frame"));
    (frame, wire)
}

/// `h2` refuses what almond's reader refuses (and a padded `DATA` frame
/// whose padding fills it is refused): a `SETTINGS` with a window past 2^31-1, a zero
/// window update, a `PING` on a stream.
#[test]
fn both_refuse_the_same_malformed_frames() {
    let head = |len: u32, kind: u8, flags: u8, stream: u32| Head {
        len,
        kind,
        flags,
        stream,
    };
    let raw = |h: Head| {
        let mut b = BytesMut::new();
        h.write(&mut b);
        theirs::Head::parse(&b)
    };
    // DATA, padded, pad length 3 in a 3-byte payload.
    let data = head(3, frame::kind::DATA, frame::flag::PADDED, 1);
    let payload = Bytes::from_static(&[3, 0, 0]);
    assert_eq!(
        frame::data(&data, payload),
        Err(frame::Error::connection(Reason::PROTOCOL_ERROR))
    );
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31.
    let settings = head(6, frame::kind::SETTINGS, 0, 0);
    let payload = [0, 4, 0x80, 0, 0, 0];
    assert_eq!(
        Settings::parse(&settings, &payload),
        Err(frame::Error::connection(Reason::FLOW_CONTROL_ERROR))
    );
    assert!(theirs::Settings::load(raw(settings), &payload).is_err());
    // PING on stream 1.
    let ping = head(8, frame::kind::PING, 0, 1);
    assert!(frame::ping(&ping, &[0; 8]).is_err());
    assert!(theirs::Ping::load(raw(ping), &[0; 8]).is_err());
    // WINDOW_UPDATE of 0 on stream 3: a stream error in both.
    let update = head(4, frame::kind::WINDOW_UPDATE, 0, 3);
    assert_eq!(
        frame::window_update(&update, &[0; 4]),
        Err(frame::Error::stream(Reason::PROTOCOL_ERROR, 3))
    );
    let theirs_update = theirs::WindowUpdate::load(raw(update), &[0; 4]);
    assert!(theirs_update.is_err());
}
