//! Split: pick a subset by the service's percent weights, per request.
//!
//! Random by default. With a sticky header, the header's value is hashed
//! to a point in `[0, total)` and looked up in the same cumulative table,
//! so a user stays on one subset while the weights hold. The hash is
//! FNV-1a 64 followed by MurmurHash3's `fmix64` finalizer: fixed, seedless
//! and process-independent, so every proxy puts a user on the same side.
//!
//! Why users only move towards a growing subset: the table lays subsets
//! out in name order, each owning a contiguous range. With two subsets the
//! first owns `[0, w1)` and the second `[w1, total)`; when one grows the
//! boundary moves into the other's range only, so users cross one way,
//! whichever name sorts first. (With three or more, a boundary between two
//! unchanged subsets can still shift when an earlier one changes.)

use http::{header, HeaderMap, HeaderName};
use std::collections::BTreeMap;

/// A weighted choice among a service's subsets.
pub struct Split {
    /// (running total of percent, subset index), for subsets above 0 %.
    cumulative: Vec<(u32, usize)>,
    total: u32,
    /// The header whose value picks the subset, when present.
    sticky: Option<HeaderName>,
}

impl Split {
    /// `weights` by subset name; `subsets` the service's subset names in
    /// index order (those with endpoints: a snapshot's split may name
    /// others, which get nothing).
    pub fn new(weights: &BTreeMap<String, u32>, subsets: &[&str]) -> Split {
        let mut total = 0;
        let mut cumulative = Vec::new();
        for (i, name) in subsets.iter().enumerate() {
            let w = weights.get(*name).copied().unwrap_or(0);
            if w > 0 {
                total += w;
                cumulative.push((total, i));
            }
        }
        Split {
            cumulative,
            total,
            sticky: None,
        }
    }

    /// The same split, sticky on `header` (an invalid name, refused by
    /// config validation, leaves it random).
    pub fn sticky_on(mut self, header: Option<&str>) -> Split {
        self.sticky = header.and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok());
        self
    }

    /// The subset index for one request: by `sticky` (the sticky header's
    /// value, when the request has one), else at random; `None` when no
    /// subset above 0 % has endpoints (a subset at 0 % or not named gets
    /// nothing, even then: the request has nowhere to go).
    #[inline]
    pub fn pick(&self, sticky: Option<&[u8]>) -> Option<usize> {
        self.pick_hashed(sticky.filter(|v| !v.is_empty()).map(hash))
    }

    /// [`Split::pick`] for a request with `headers`: the sticky header's
    /// value, or its values as one (an HTTP/2 client may send a `cookie`
    /// in several fields where HTTP/1.1 sends one, RFC 9113 section
    /// 8.2.3: joined with `"; "`, any other header's with `", "`, so a
    /// user lands on the same subset either way).
    #[inline]
    pub fn pick_for(&self, headers: &HeaderMap) -> Option<usize> {
        let Some(name) = &self.sticky else {
            return self.pick_hashed(None);
        };
        let mut values = headers.get_all(name).iter();
        let hashed = match (values.next(), values.next()) {
            (Some(one), None) => Some(one.as_bytes()).filter(|v| !v.is_empty()).map(hash),
            (Some(_), Some(_)) => {
                let sep: &[u8] = if name == header::COOKIE { b"; " } else { b", " };
                Some(hash_joined(
                    headers.get_all(name).iter().map(|v| v.as_bytes()),
                    sep,
                ))
            }
            (None, _) => None,
        };
        self.pick_hashed(hashed)
    }

    /// The subset for a sticky value's hash, or at random.
    #[inline]
    fn pick_hashed(&self, hashed: Option<u64>) -> Option<usize> {
        if self.cumulative.len() <= 1 {
            return self.cumulative.first().map(|c| c.1);
        }
        let x = match hashed {
            Some(h) => point(h, self.total),
            None => fastrand::u32(..self.total),
        };
        let at = self.cumulative.partition_point(|&(c, _)| c <= x);
        self.cumulative.get(at).map(|c| c.1)
    }
}

/// FNV-1a 64 of `bytes`, then `fmix64` so that similar values (`user-1`,
/// `user-2`) spread over the high bits that `point` uses. No allocation.
#[inline]
pub fn hash(bytes: &[u8]) -> u64 {
    hash_joined(std::iter::once(bytes), b"")
}

/// [`hash`] of `parts` joined with `sep`, without joining them.
#[inline]
fn hash_joined<'a>(parts: impl Iterator<Item = &'a [u8]>, sep: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.enumerate() {
        let bytes = if i == 0 { &[][..] } else { sep }.iter().chain(part);
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Scales a hash to `[0, total)` (multiply-high: a user keeps the same
/// relative position if the total changes).
#[inline]
fn point(h: u64, total: u32) -> u32 {
    ((u128::from(h) * u128::from(total)) >> 64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pairs: &[(&str, u32)], subsets: &[&str]) -> Split {
        let weights = pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
        Split::new(&weights, subsets).sticky_on(Some("x-user-id"))
    }

    #[test]
    fn ninety_ten_lands_within_five_sigma() {
        let weights = BTreeMap::from([("v1".to_owned(), 90), ("v2".to_owned(), 10)]);
        let split = Split::new(&weights, &["v1", "v2"]);
        let n = 100_000;
        let v2 = (0..n).filter(|_| split.pick(None) == Some(1)).count() as f64;
        // Binomial: mean n*p = 10000, sigma = sqrt(n*p*(1-p)) ~ 95; a 5-sigma
        // bound fails by chance about once in 1.7 million runs.
        assert!((v2 - 10_000.0).abs() < 5.0 * 95.0, "v2 got {v2}");
    }

    #[test]
    fn zero_weight_subsets_get_nothing() {
        let weights = BTreeMap::from([("v1".to_owned(), 100), ("v2".to_owned(), 0)]);
        let split = Split::new(&weights, &["v1", "v2"]);
        assert!((0..1000).all(|_| split.pick(None) == Some(0)));
        // v1 has no endpoints (its instances all went critical): v2, at
        // 0 %, still gets nothing.
        let split = Split::new(&weights, &["v2"]);
        assert_eq!(split.pick(None), None);
        assert_eq!(split.pick(Some(b"user-1")), None);
    }

    #[test]
    fn the_hash_is_fixed() {
        // FNV-1a 64 of "" is its offset basis; fmix64 is then applied.
        // These values are part of the contract between proxies.
        assert_eq!(hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash(b"user-1"), 0x41a2_fca5_c684_01c5);
    }

    #[test]
    fn a_user_stays_put_and_users_spread_by_weight() {
        let s = split(&[("v1", 90), ("v2", 10)], &["v1", "v2"]);
        let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let mut on_v2 = 0;
        for u in &users {
            let first = s.pick(Some(u.as_bytes()));
            assert!((0..5).all(|_| s.pick(Some(u.as_bytes())) == first));
            on_v2 += first.unwrap_or(0);
        }
        // 10 % of 10000 users: sigma = 30; a 5-sigma bound.
        assert!((on_v2 as f64 - 1000.0).abs() < 150.0, "{on_v2} users on v2");
    }

    #[test]
    fn users_only_move_towards_the_growing_canary_whichever_sorts_first() {
        // The canary sorts last (v1, v2) and first (canary, stable).
        for (stable, canary, names) in [
            ("v1", "v2", ["v1", "v2"]),
            ("stable", "canary", ["canary", "stable"]),
        ] {
            let users: Vec<String> = (0..5_000).map(|i| format!("u{i}")).collect();
            let canary_index = names.iter().position(|n| *n == canary).unwrap_or(0);
            let mut was_canary = vec![false; users.len()];
            for w in [0, 1, 10, 50, 100] {
                let s = split(&[(stable, 100 - w), (canary, w)], &names);
                let mut count = 0;
                for (i, u) in users.iter().enumerate() {
                    let now = s.pick(Some(u.as_bytes())) == Some(canary_index);
                    assert!(now || !was_canary[i], "{u} left {canary} at {w}%");
                    was_canary[i] = now;
                    count += usize::from(now);
                }
                let want = users.len() as f64 * f64::from(w) / 100.0;
                let sigma = (want * (1.0 - f64::from(w) / 100.0)).sqrt();
                assert!(
                    (count as f64 - want).abs() <= 5.0 * sigma + 1.0,
                    "{count} on {canary} at {w}%"
                );
            }
        }
    }

    /// A cookie an HTTP/2 client splits into crumbs, and any header sent
    /// twice, is hashed as its one-field form.
    #[test]
    fn a_value_in_several_fields_is_hashed_as_one() {
        let weights = BTreeMap::from([("v1".to_owned(), 50), ("v2".to_owned(), 50)]);
        for name in ["cookie", "x-user-id"] {
            let s = Split::new(&weights, &["v1", "v2"]).sticky_on(Some(name));
            let sep = if name == "cookie" { "; " } else { ", " };
            for u in 0..200 {
                let (a, b) = (format!("user={u}"), format!("theme=dark{u}"));
                let mut one = HeaderMap::new();
                let joined = format!("{a}{sep}{b}");
                one.insert(name, joined.parse().unwrap());
                let mut crumbs = HeaderMap::new();
                crumbs.append(name, a.parse().unwrap());
                crumbs.append(name, b.parse().unwrap());
                let want = s.pick(Some(joined.as_bytes()));
                assert_eq!(s.pick_for(&one), want, "{name} {u}");
                assert_eq!(s.pick_for(&crumbs), want, "{name} {u}");
            }
        }
    }

    #[test]
    fn an_empty_header_value_is_random() {
        let s = split(&[("v1", 50), ("v2", 50)], &["v1", "v2"]);
        let picks: usize = (0..1000).filter_map(|_| s.pick(Some(b""))).sum();
        assert!(picks > 0 && picks < 1000, "{picks}");
    }
}
