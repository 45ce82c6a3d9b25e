//! Reload: the config file read again into a running proxy (SIGHUP, as
//! `nginx -s reload`): its services applied in place, every other change
//! named as waiting for a restart, a file with a problem refused whole.

use crate::Proxy;
use almond_config::{validate_proxy, ProxyConfig};

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// The services changed and are in force (a new table: endpoint
    /// state, pools and ejections of what stays are kept).
    pub services: bool,
    /// Top-level keys that changed but take effect only on a restart:
    /// bound sockets, the runtime, and what is built once at start.
    pub restart: Vec<String>,
}

impl Proxy {
    /// Applies `new`, a config file read again (and checked as a whole):
    /// its `services` replace the running ones, unless the proxy follows
    /// a control plane (its services are the control plane's). `Err`: the
    /// new services do not fit what stays (a listener serving a service
    /// the file removes); nothing changed.
    pub fn reload(&self, new: ProxyConfig) -> Result<Reloaded, String> {
        let old = self.shared.table.load().config.clone();
        let (Ok(serde_json::Value::Object(was)), Ok(serde_json::Value::Object(now))) =
            (serde_json::to_value(&*old), serde_json::to_value(&new))
        else {
            return Err("the configuration could not be compared".to_owned());
        };
        let mut done = Reloaded::default();
        let keys = was
            .keys()
            .chain(now.keys().filter(|k| !was.contains_key(*k)));
        for key in keys {
            if was.get(key) == now.get(key) {
                continue;
            }
            match key.as_str() {
                "services" if old.control.is_none() => done.services = true,
                // Following: the running services are the control plane's,
                // and the file's are not used.
                "services" => {}
                _ => done.restart.push(key.clone()),
            }
        }
        if done.services {
            let mut next = (*old).clone();
            next.services = new.services;
            if let Some(problem) = validate_proxy(&next).into_iter().next() {
                return Err(format!("{problem} (with the running listeners and tls)"));
            }
            self.update(next);
        }
        Ok(done)
    }
}
