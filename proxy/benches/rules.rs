//! Micro-benchmark of route-rule matching: the per-request cost of
//! `Rules::first_match` with 0, 10 and 1,000 path-prefix rules (plus a
//! header rule), for a request matching the last prefix rule and one
//! matching none. Reported, never asserted:
//! `cargo bench -p almond-proxy --bench rules`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use almond_config::Match;
use almond_proxy::pipeline::rules::Rules;
use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use std::hint::black_box;

/// `n` rules `/svcI/items` (each to I), then one on a header.
fn rules(n: usize) -> Rules<usize> {
    let mut matches: Vec<Match> = (0..n)
        .map(|i| Match {
            path_prefix: Some(format!("/svc{i}/items")),
            ..Default::default()
        })
        .collect();
    let mut beta = Match::default();
    beta.headers.insert(
        "x-beta".to_owned(),
        almond_config::HeaderMatch::Value("1".to_owned()),
    );
    if n > 0 {
        matches.push(beta);
    }
    Rules::compile(matches.iter().enumerate().map(|(i, m)| (m, i)))
}

fn bench(c: &mut Criterion) {
    for n in [0usize, 10, 1000] {
        let compiled = rules(n);
        let last = n.saturating_sub(1);
        let hit = Request::get(format!("/svc{last}/items/42?x=1"))
            .header("host", "orders")
            .header("cookie", "session=abc")
            .body(())
            .unwrap_or_default();
        let miss = Request::get("/other/path/deeper")
            .header("host", "orders")
            .body(())
            .unwrap_or_default();
        c.bench_function(&format!("rules/{n}/last-prefix"), |b| {
            b.iter(|| black_box(compiled.first_match(black_box(&hit))).copied())
        });
        c.bench_function(&format!("rules/{n}/no-match"), |b| {
            b.iter(|| black_box(compiled.first_match(black_box(&miss))).copied())
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
