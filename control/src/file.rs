//! File source: a directory of YAML service definitions (the proxy's
//! `services` shape), watched by polling. A change is read once it has
//! held for a poll; an invalid or empty file is reported with its path
//! (and line), and that file's last good content stays in force; until
//! every file has read once, the control plane is not ready.

use crate::state::State;
use almond_config::{load_services, Service};
use almond_net::now_ms;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often the directory is looked at.
const POLL: Duration = Duration::from_millis(250);

/// What a file looked like when last read.
type Stamp = (SystemTime, u64);

/// Watches `dir` until the task is dropped.
pub async fn run(dir: PathBuf, state: Arc<State>) {
    let mut stamps: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    let mut good: BTreeMap<PathBuf, BTreeMap<String, Service>> = BTreeMap::new();
    let mut first = true;
    // Ready once every file listed has been read: a control plane started
    // with one file refused (a typo left from days before) must not tell
    // every proxy its services are gone; until then it is not ready and
    // proxies keep what they have.
    let mut synced = false;
    let mut unreadable = false;
    // The listing one poll ago: a change is read once it has held for a
    // poll (a file still being written changes again meanwhile).
    let mut seen: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    loop {
        // A directory that cannot be read (a typo, not mounted yet, being
        // swapped) is not an empty registry: the services read before
        // stay, and until a first read the control plane is not ready.
        let listing = match list(&dir) {
            Ok(listing) => listing,
            Err(e) => {
                if !unreadable {
                    tracing::error!(dir = %dir.display(), error = %e, "registry directory unreadable; the services read before stay");
                    unreadable = true;
                }
                tokio::time::sleep(POLL).await;
                continue;
            }
        };
        if unreadable {
            tracing::info!(dir = %dir.display(), "registry directory readable again");
            unreadable = false;
        }
        let settled = listing == seen;
        seen.clone_from(&listing);
        if (listing != stamps && settled) || first {
            reload(&dir, &listing, &stamps, &mut good, &state);
            let all_read = listing.keys().all(|path| good.contains_key(path));
            stamps = listing;
            if !synced && all_read {
                state.catalog_synced();
                synced = true;
            } else if !synced && first {
                tracing::error!(dir = %dir.display(), "not ready until every registry file reads (see the files refused above): proxies keep the services they have");
            }
            first = false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every `*.yaml` / `*.yml` / `*.json` file with its modification stamp:
/// regular files (or links to them) only, as a FIFO or a device would
/// block the read that follows for good.
fn list(dir: &Path) -> std::io::Result<BTreeMap<PathBuf, Stamp>> {
    let entries = std::fs::read_dir(dir)?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok().filter(|m| m.is_file())?;
            Some((p, (meta.modified().ok()?, meta.len())))
        })
        .collect())
}

fn reload(
    dir: &Path,
    listing: &BTreeMap<PathBuf, Stamp>,
    old: &BTreeMap<PathBuf, Stamp>,
    good: &mut BTreeMap<PathBuf, BTreeMap<String, Service>>,
    state: &State,
) {
    good.retain(|path, _| listing.contains_key(path));
    for (path, stamp) in listing {
        if old.get(path) == Some(stamp) && good.contains_key(path) {
            continue;
        }
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read registry file");
                continue;
            }
        };
        // An empty file is one being written (truncated, then filled),
        // not a request to remove its services: deleting the file does.
        if text.trim().is_empty() {
            tracing::error!(file = %path.display(), "registry file empty; its previous content stays (delete the file to remove its services)");
            continue;
        }
        match load_services(&text, &path.display().to_string()) {
            Ok(services) => {
                good.insert(path.clone(), services);
            }
            Err(problems) => {
                tracing::error!(file = %path.display(), problems = %problems, "registry file refused; its previous content stays");
            }
        }
    }
    // Merge: a name defined twice keeps the first file's definition.
    let mut merged: BTreeMap<String, Service> = BTreeMap::new();
    for (path, services) in good.iter() {
        for (name, svc) in services {
            if merged.contains_key(name) {
                tracing::error!(file = %path.display(), service = %name, "service defined in two files; the first stays");
                continue;
            }
            merged.insert(name.clone(), svc.clone());
        }
    }
    // Wall-clock milliseconds: file-mode indexes outlive a restart this way.
    let now = now_ms();
    for name in state.services().keys() {
        if !merged.contains_key(name) {
            state.remove_service(name, now);
        }
    }
    for (name, svc) in merged {
        state.set_service(&name, svc, now);
    }
    tracing::debug!(dir = %dir.display(), "registry read");
}
