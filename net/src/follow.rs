//! Follow: what is built from files, built again when one of them changes
//! (TLS certificates rotated under a running process), told by their
//! modification times.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// How often followed files are checked.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// A file's modification time and length: a rewrite within the clock's
/// granularity that changes the length is seen.
type Stamp = Option<(SystemTime, u64)>;

/// The stamps of some files when what is made of them was last built.
pub struct Followed {
    paths: Vec<PathBuf>,
    seen: Mutex<Vec<Stamp>>,
}

impl Followed {
    /// `paths` as they are now (what was just built from them).
    pub fn new(paths: Vec<PathBuf>) -> Followed {
        let seen = stamps(&paths);
        Followed {
            paths,
            seen: Mutex::new(seen),
        }
    }

    /// Runs `build` if a file changed since the last build that worked:
    /// `Ok(None)` when none did. A failed build leaves the times as they
    /// were, so the next check tries again (files are often written one
    /// at a time: a key before its certificate).
    pub fn rebuild<T, E>(&self, build: impl FnOnce() -> Result<T, E>) -> Result<Option<T>, E> {
        let now = stamps(&self.paths);
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return Ok(None);
        }
        let built = build()?;
        *seen = now;
        Ok(Some(built))
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    let stamp = |p: &PathBuf| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    paths.iter().map(stamp).collect()
}

/// Runs `check` on a blocking thread (file reads, key checks) every
/// [`FOLLOW_EVERY`] until `stop` changes.
pub async fn check_until<F>(mut stop: watch::Receiver<bool>, check: F)
where
    F: Fn() + Send + Sync + 'static,
{
    let check = Arc::new(check);
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let check = check.clone();
        let _ = tokio::task::spawn_blocking(move || check()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_once_a_file_changes_and_again_after_a_failure() {
        let dir = std::env::temp_dir().join(format!("almond-follow-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("a.pem");
        std::fs::write(&file, "one").unwrap_or_default();
        let followed = Followed::new(vec![file.clone()]);
        let read = || std::fs::read_to_string(&file).map_err(|e| e.to_string());
        assert_eq!(followed.rebuild(read), Ok(None));
        let later = SystemTime::now() + Duration::from_secs(5);
        let set_time = |t: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(&file)
                .and_then(|f| f.set_modified(t))
                .unwrap_or_default();
        };
        std::fs::write(&file, "two").unwrap_or_default();
        set_time(later);
        assert_eq!(
            followed.rebuild(|| Err::<String, _>("half written")),
            Err("half written")
        );
        assert_eq!(followed.rebuild(read), Ok(Some("two".to_owned())));
        assert_eq!(followed.rebuild(read), Ok(None));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
