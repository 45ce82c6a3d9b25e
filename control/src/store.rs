//! Store: where policies (splits, rollouts) live, so every control-plane
//! replica and every restart sees the same. Consul KV with check-and-set
//! (`almond/policy/<service>`, one JSON document per service), or a local
//! JSON file in file mode.

use crate::consul::{check, Blocking, ConsulClient, ConsulError};
use crate::policy::Policy;
use crate::state::State;
use almond_net::now_ms;
use bytes::Bytes;
use http::{Method, StatusCode};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Consul KV prefix of policies.
pub const KV_PREFIX: &str = "almond/policy/";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Consul failed.
    #[error(transparent)]
    Consul(#[from] ConsulError),
    /// The file could not be read or written.
    #[error("policy file: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data that does not parse.
    #[error("stored policy unreadable: {0}")]
    Decode(String),
    /// Consul refused the policy as larger than a KV value may be
    /// (`kv_max_value_size`, 512 KiB by default): nothing was written.
    #[error(
        "the policy would be {bytes} bytes, more than Consul takes in one KV value \
         (kv_max_value_size; Consul said: {consul})"
    )]
    TooLarge {
        /// The policy's size as written.
        bytes: usize,
        /// Consul's answer.
        consul: String,
    },
}

/// A policy store.
pub enum Store {
    /// Consul KV, check-and-set on `ModifyIndex`.
    Consul(Box<ConsulClient>),
    /// One JSON file; writes are serialized by `lock`.
    File {
        /// The file.
        path: PathBuf,
        /// Serializes read-check-write.
        lock: tokio::sync::Mutex<()>,
    },
}

impl Store {
    /// Reads one service's policy and the token a write must present
    /// (Consul `ModifyIndex`, 0 when absent).
    pub async fn get(&self, service: &str) -> Result<(Policy, u64), StoreError> {
        match self {
            Store::Consul(client) => {
                let key = format!("/v1/kv/{KV_PREFIX}{service}");
                let answer = client.read_for_write(&key, "raw").await?;
                if answer.status == StatusCode::NOT_FOUND {
                    return Ok((Policy::default(), 0));
                }
                let answer = check(answer)?;
                // An empty value (a key made by hand, in Consul's UI) is no
                // policy, as the follower reads it: written over, with the
                // key's index, rather than blocking every change.
                if answer.body.iter().all(u8::is_ascii_whitespace) {
                    return Ok((Policy::default(), answer.index.unwrap_or(0)));
                }
                let policy = serde_json::from_slice(&answer.body)
                    .map_err(|e| StoreError::Decode(e.to_string()))?;
                Ok((policy, answer.index.unwrap_or(0)))
            }
            Store::File { path, .. } => {
                let all = read_file(path)?;
                let policy = all.get(service).cloned().unwrap_or_default();
                let revision = policy.revision;
                Ok((policy, revision))
            }
        }
    }

    /// Writes a policy if the stored one is still the one read (`token`
    /// from [`Self::get`]); `Ok(false)` when someone else wrote first.
    /// In the file store, `policy.revision` becomes the written revision.
    pub async fn put(
        &self,
        service: &str,
        policy: &mut Policy,
        token: u64,
    ) -> Result<bool, StoreError> {
        if matches!(self, Store::File { .. }) {
            policy.revision = token.wrapping_add(1);
        }
        let encode =
            |p: &Policy| serde_json::to_vec(p).map_err(|e| StoreError::Decode(e.to_string()));
        let body = encode(policy)?;
        match self {
            Store::Consul(client) => {
                let key = format!("/v1/kv/{KV_PREFIX}{service}");
                let mut body = body;
                loop {
                    let bytes = body.len();
                    let answer = client
                        .call(
                            Method::PUT,
                            &key,
                            &format!("cas={token}"),
                            0,
                            Duration::ZERO,
                            Bytes::from(body),
                        )
                        .await?;
                    if answer.status != StatusCode::PAYLOAD_TOO_LARGE {
                        let answer = check(answer)?;
                        return Ok(answer.body.as_ref().trim_ascii() == b"true");
                    }
                    // The audit trail gives way before the change does (a
                    // rollback must always be written: the trail's copies
                    // of route rules grew the value to Consul's limit): its
                    // older half goes, the newest entry stays. Too large
                    // with the trail at one entry: the change is.
                    let kept = policy.history.len();
                    if kept <= 1 {
                        let consul = String::from_utf8_lossy(&answer.body).trim().to_owned();
                        return Err(StoreError::TooLarge { bytes, consul });
                    }
                    policy.history.drain(..kept / 2);
                    tracing::warn!(
                        service,
                        bytes,
                        dropped = kept / 2,
                        "policy over Consul's value limit: its oldest history entries dropped"
                    );
                    body = encode(policy)?;
                }
            }
            Store::File { path, lock } => {
                let _guard = lock.lock().await;
                let mut all = read_file(path)?;
                let current = all.get(service).map_or(0, |p| p.revision);
                if current != token {
                    return Ok(false);
                }
                all.insert(service.to_owned(), policy.clone());
                write_file(path, &all)?;
                Ok(true)
            }
        }
    }

    /// After this replica wrote `service`'s policy: raises the replica's
    /// policy stamp to the write's `ModifyIndex` (one read of the key, from
    /// the leader), so the snapshots that carry the write say so. Without
    /// it they would carry the stamp of the last read, older than the
    /// write, and a proxy could not tell this replica's state from one of a
    /// replica that never saw the write. Nothing with a file store, or
    /// when the read fails (the follow raises it soon).
    pub async fn stamp_write(&self, service: &str, state: &State) {
        let Store::Consul(client) = self else {
            return;
        };
        let key = format!("/v1/kv/{KV_PREFIX}{service}");
        if let Ok(answer) = client.read_for_write(&key, "").await {
            if let (true, Some(index)) = (answer.status.is_success(), answer.index) {
                state.raise_policy_stamp(index);
            }
        }
    }

    /// Follows the store and feeds every policy to `state`, so changes made
    /// through another replica (or by hand in the file) take effect.
    pub async fn follow(self: Arc<Self>, state: Arc<State>) {
        match &*self {
            Store::Consul(client) => follow_consul(client, &state).await,
            Store::File { path, .. } => follow_file(path, &state).await,
        }
    }
}

async fn follow_consul(client: &ConsulClient, state: &State) {
    let path = format!("/v1/kv/{KV_PREFIX}");
    let wait = Duration::from_secs(60);
    let mut blocking = Blocking::new();
    loop {
        // Rate-limited as the health watches are: an index of 0 (or none)
        // must not turn the loop into a busy one (API.md 2.4).
        blocking.pace().await;
        let answer = client
            .call(
                Method::GET,
                &path,
                "recurse",
                blocking.index,
                wait,
                Bytes::new(),
            )
            .await
            .and_then(|a| match a.status {
                StatusCode::NOT_FOUND => Ok(a),
                _ => check(a),
            })
            .and_then(|a| match a.filtered {
                // Policies the token may not read are not deleted ones:
                // keep them rather than drop their splits.
                true => Err(ConsulError::Filtered("key:read on almond/policy/")),
                false => Ok(a),
            });
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                blocking.back_off("policies", &e, state).await;
                continue;
            }
        };
        let returned = answer.index.unwrap_or(0);
        if !blocking.advance(answer.index) {
            continue;
        }
        let mut policies = BTreeMap::new();
        // A policy none was read of before, that cannot be read now.
        let mut unreadable = None;
        if answer.status.is_success() {
            match serde_json::from_slice::<Vec<KvEntry>>(&answer.body) {
                Ok(entries) => {
                    for e in entries {
                        let Some(name) = e.key.strip_prefix(KV_PREFIX) else {
                            continue;
                        };
                        // A folder (`almond/policy/`, one made in Consul's
                        // UI) or an empty value (Consul answers `null`):
                        // no policy, not an unreadable one.
                        if name.is_empty() || name.ends_with('/') || e.value.is_none() {
                            continue;
                        }
                        match e.decode() {
                            Some(p) => {
                                policies.insert(name.to_owned(), (p, e.modify_index));
                            }
                            // Written by a newer replica, or by hand: the
                            // service keeps the policy it had, rather than
                            // lose its split.
                            None => match state.policy(name) {
                                Some(kept) => {
                                    tracing::warn!(key = %e.key, "stored policy unreadable; the last one read stays");
                                    policies.insert(name.to_owned(), (kept, e.modify_index));
                                }
                                None => {
                                    tracing::warn!(key = %e.key, "stored policy unreadable; ignored");
                                    unreadable = Some(e.key);
                                }
                            },
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "policy list unreadable; the policies read before stay");
                    continue;
                }
            }
        }
        // Before the first full sync, serving the service without its
        // policy would drop its guards, allow-list and split on every
        // proxy (each takes a starting control plane's snapshot whole):
        // not ready until the key is readable (or deleted), as with an
        // unreadable policy file. Proxies keep their last state meanwhile.
        if let Some(key) = unreadable.filter(|_| !state.is_ready()) {
            state.metrics.consul_errors.inc();
            tracing::error!(%key, "stored policy unreadable: not ready until it is fixed or deleted (consul kv put / delete)");
            continue;
        }
        // Before the state is published: a snapshot never carries a stamp
        // older than its content.
        state.raise_policy_stamp(returned);
        state.set_read_policies(policies, returned);
    }
}

async fn follow_file(path: &PathBuf, state: &State) {
    let mut seen: Option<(SystemTime, u64)> = None;
    loop {
        let stamp = std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp != seen || seen.is_none() {
            match read_file(path) {
                Ok(all) => {
                    let read = all.into_iter().map(|(name, p)| {
                        let revision = p.revision;
                        (name, (p, revision))
                    });
                    state.set_read_policies(read.collect(), now_ms())
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "policy file unreadable; previous policies stay")
                }
            }
            seen = stamp;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One entry of a recursive KV read.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KvEntry {
    pub(crate) key: String,
    value: Option<String>,
    #[serde(default)]
    pub(crate) modify_index: u64,
}

impl KvEntry {
    /// The value's bytes (Consul sends them in base64).
    pub(crate) fn raw(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(self.value.as_deref()?)
            .ok()
    }

    fn decode(&self) -> Option<Policy> {
        serde_json::from_slice(&self.raw()?).ok()
    }
}

fn read_file(path: &PathBuf) -> Result<BTreeMap<String, Policy>, StoreError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Decode(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

/// Atomic and durable (`write_atomic`: unique temporary name, fsync of
/// the file and its directory).
fn write_file(path: &std::path::Path, all: &BTreeMap<String, Policy>) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(all).map_err(|e| StoreError::Decode(e.to_string()))?;
    almond_config::write_atomic(path, &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_store_revision_at_its_end_wraps_and_still_guards_writes() {
        let dir = std::env::temp_dir().join(format!("almond-store-wrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("policies.json");
        let at_end = Policy {
            revision: u64::MAX,
            ..Policy::default()
        };
        write_file(&path, &BTreeMap::from([("web".to_owned(), at_end)])).unwrap();
        let store = Store::File {
            path: path.clone(),
            lock: tokio::sync::Mutex::new(()),
        };

        let (mut policy, token) = store.get("web").await.unwrap();
        assert_eq!(token, u64::MAX);
        assert!(store.put("web", &mut policy, token).await.unwrap());
        let (mut again, token) = store.get("web").await.unwrap();
        assert_eq!(token, 0, "the revision wrapped");
        // The old token no longer writes; the new one does.
        assert!(!store
            .put("web", &mut again.clone(), u64::MAX)
            .await
            .unwrap());
        assert!(store.put("web", &mut again, token).await.unwrap());
        assert_eq!(store.get("web").await.unwrap().1, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
