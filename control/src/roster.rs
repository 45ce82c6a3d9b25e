//! Roster: the proxies each control-plane replica sees, shared through
//! Consul KV (`almond/proxies/<replica>`), so that the watcher's scrapes,
//! the live view and fleet-wide limits count the whole fleet, not one
//! replica's followers.
//!
//! Every replica writes its own roster when it changes and at least every
//! 30 s, and reads the others' every 2 s. A roster whose `ModifyIndex` has
//! not moved for [`PROXY_STALE`] (this replica's clock, not the writer's)
//! belongs to a replica that is gone: it is not counted, and after 10
//! minutes it is deleted (check-and-set, so a replica come back meanwhile
//! keeps its own).

use crate::consul::{check, ConsulClient, ConsulError};
use crate::state::{PeerProxy, State, PROXY_STALE};
use almond_net::now_ms;
use bytes::Bytes;
use http::{Method, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Consul KV prefix of the replicas' rosters.
pub const ROSTER_PREFIX: &str = "almond/proxies/";
/// How often the rosters are read, and this replica's checked for a change.
const EVERY: Duration = Duration::from_secs(2);
/// This replica's roster is written at least this often (well within
/// `PROXY_STALE`), so the others know it is alive.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// A roster unchanged for this long is deleted.
const FORGET: Duration = Duration::from_secs(600);

/// One replica's roster as stored: proxy ID to the admin address it is
/// scraped at, and when it was written (the writer's clock, read by no
/// one: Consul keeps the `ModifyIndex` of a write identical to the entry,
/// and a heartbeat must move it).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Roster {
    proxies: BTreeMap<String, String>,
    written_ms: u64,
}

/// Shares this replica's roster and reads the others' into `state`, until
/// aborted; [`leave`] takes the roster back at shutdown.
pub async fn run(client: ConsulClient, state: Arc<State>, replica: String) {
    let own = format!("{ROSTER_PREFIX}{replica}");
    let mut written: Option<(Roster, Instant)> = None;
    let mut moved = Moves::default();
    let mut failing = false;
    loop {
        let roster = Roster {
            proxies: state.own_roster(),
            written_ms: now_ms(),
        };
        let due = written
            .as_ref()
            .is_none_or(|(w, at)| w.proxies != roster.proxies || at.elapsed() >= HEARTBEAT);
        // Written and read apart: a replica that may not write its own
        // roster still counts the others'.
        let wrote = match due {
            true => write(&client, &own, &roster).await.map(|()| {
                written = Some((roster, Instant::now()));
            }),
            false => Ok(()),
        };
        let read = match read(&client, &own, &mut moved).await {
            Ok(peers) => {
                state.set_peer_proxies(peers);
                Ok(())
            }
            // Consul down, or no `key:read`: the rosters read last stay
            // until they go stale.
            Err(e) => {
                if moved.all_quiet(Instant::now()) {
                    state.set_peer_proxies(BTreeMap::new());
                }
                Err(e)
            }
        };
        match wrote.and(read) {
            Ok(()) if failing => {
                tracing::info!("proxy rosters shared again");
                failing = false;
            }
            Ok(()) => {}
            // A token without `key:write` on `almond/proxies/`, or Consul
            // down.
            Err(e) if !failing => {
                tracing::warn!(error = %e, prefix = ROSTER_PREFIX, "proxy rosters not shared: each replica counts the proxies whose rosters it can read");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// Deletes this replica's roster (a clean stop: its proxies move to the
/// other replicas at once).
pub async fn leave(client: &ConsulClient, replica: &str) {
    let key = format!("/v1/kv/{ROSTER_PREFIX}{replica}");
    let gone = client
        .call(Method::DELETE, &key, "", 0, Duration::ZERO, Bytes::new())
        .await;
    if let Err(e) = gone.and_then(check) {
        tracing::debug!(error = %e, "proxy roster not deleted");
    }
}

async fn write(client: &ConsulClient, key: &str, roster: &Roster) -> Result<(), ConsulError> {
    let body = serde_json::to_vec(roster).unwrap_or_default();
    let path = format!("/v1/kv/{key}");
    let answer = client
        .call(Method::PUT, &path, "", 0, Duration::ZERO, Bytes::from(body))
        .await?;
    check(answer).map(drop)
}

/// The other replicas' live proxies, by ID; deletes the rosters gone
/// quiet for [`FORGET`].
async fn read(
    client: &ConsulClient,
    own: &str,
    moved: &mut Moves,
) -> Result<BTreeMap<String, PeerProxy>, ConsulError> {
    let path = format!("/v1/kv/{ROSTER_PREFIX}");
    let answer = client
        .call(
            Method::GET,
            &path,
            "recurse",
            0,
            Duration::ZERO,
            Bytes::new(),
        )
        .await?;
    let entries: Vec<crate::store::KvEntry> = match answer.status {
        StatusCode::NOT_FOUND => Vec::new(),
        _ => serde_json::from_slice(&check(answer)?.body).unwrap_or_default(),
    };
    let now = Instant::now();
    let mut peers = BTreeMap::new();
    let mut present = Vec::with_capacity(entries.len());
    for entry in entries {
        if entry.key == own || !entry.key.starts_with(ROSTER_PREFIX) {
            continue;
        }
        present.push(entry.key.clone());
        let quiet = moved.saw(&entry.key, entry.modify_index, now);
        if quiet >= FORGET {
            let key = format!("/v1/kv/{}", entry.key);
            let cas = format!("cas={}", entry.modify_index);
            let _ = client
                .call(Method::DELETE, &key, &cas, 0, Duration::ZERO, Bytes::new())
                .await;
            continue;
        }
        if quiet >= PROXY_STALE {
            continue;
        }
        let roster: Option<Roster> = entry
            .raw()
            .and_then(|raw| serde_json::from_slice(&raw).ok());
        match roster {
            Some(roster) => {
                let replica = entry.key.strip_prefix(ROSTER_PREFIX).unwrap_or(&entry.key);
                let replica = replica.to_owned();
                peers.extend(roster.proxies.into_iter().map(|(id, admin)| {
                    let replica = replica.clone();
                    (id, PeerProxy { admin, replica })
                }));
            }
            None => tracing::debug!(key = %entry.key, "proxy roster unreadable: skipped"),
        }
    }
    moved.keep(&present);
    Ok(peers)
}

/// The other replicas' rosters as this replica has watched them: each
/// one's `ModifyIndex`, and when it last moved (this replica's clock).
#[derive(Default)]
struct Moves(HashMap<String, (u64, Instant)>);

impl Moves {
    /// Notes `key` at `index`; returns how long it has not moved.
    fn saw(&mut self, key: &str, index: u64, now: Instant) -> Duration {
        let (seen, since) = self.0.entry(key.to_owned()).or_insert((index, now));
        if *seen != index {
            *seen = index;
            *since = now;
        }
        now.duration_since(*since)
    }

    /// Forgets the rosters no longer stored.
    fn keep(&mut self, present: &[String]) {
        self.0.retain(|key, _| present.iter().any(|p| p == key));
    }

    /// Has every roster been quiet for `PROXY_STALE` (none counts)?
    fn all_quiet(&self, now: Instant) -> bool {
        (self.0.values()).all(|(_, since)| now.duration_since(*since) >= PROXY_STALE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A roster counts while its writer moves its `ModifyIndex` (a
    /// heartbeat at least every 30 s) and stops counting 90 s after the
    /// last move, by the reader's clock whatever the writer's says.
    #[tokio::test(start_paused = true)]
    async fn a_roster_goes_stale_when_its_index_stops_moving() {
        let mut moves = Moves::default();
        let start = Instant::now();
        assert_eq!(moves.saw("r1", 5, start), Duration::ZERO);
        tokio::time::advance(HEARTBEAT).await;
        // Moved: fresh again.
        assert_eq!(moves.saw("r1", 9, Instant::now()), Duration::ZERO);
        tokio::time::advance(PROXY_STALE - Duration::from_secs(1)).await;
        assert!(moves.saw("r1", 9, Instant::now()) < PROXY_STALE);
        assert!(!moves.all_quiet(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(moves.saw("r1", 9, Instant::now()) >= PROXY_STALE);
        assert!(moves.all_quiet(Instant::now()));
        // Gone from the store: forgotten.
        moves.keep(&[]);
        assert!(moves.0.is_empty());
    }
}
