//! A small model of Consul's ACL system: tokens with service/node/key
//! rules (exact rules beat prefix rules, the longest prefix wins), a
//! service's `intentions` (read implied by `service:read` unless a rule
//! says otherwise), an anonymous policy, `ACL not found` for unknown
//! tokens.

use std::collections::HashMap;

/// Access level granted by an ACL rule (ordered: `Deny < Read < Write`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// No access.
    Deny,
    /// Read access.
    Read,
    /// Read and write access.
    Write,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Deny => "deny",
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// Kind of ACL resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Service,
    Node,
    Key,
    /// A destination service's intentions (`service "x" { intentions = ... }`).
    Intention,
}

impl Resource {
    fn as_str(self) -> &'static str {
        match self {
            Resource::Service => "service",
            Resource::Node => "node",
            Resource::Key => "key",
            Resource::Intention => "intention",
        }
    }
}

#[derive(Clone, Debug)]
struct Rule {
    resource: Resource,
    name: String,
    prefix: bool,
    access: Access,
}

/// The rules of one ACL token.
///
/// ```
/// use almond_consul_double::{AclPolicy, Access};
/// let p = AclPolicy::deny_all()
///     .service_prefix("", Access::Read)
///     .node_prefix("", Access::Read)
///     .service("web", Access::Write);
/// # let _ = p;
/// ```
#[derive(Clone, Debug, Default)]
pub struct AclPolicy {
    management: bool,
    rules: Vec<Rule>,
}

impl AclPolicy {
    /// A management token: everything allowed.
    pub fn management() -> AclPolicy {
        AclPolicy {
            management: true,
            rules: Vec::new(),
        }
    }

    /// No rules: everything denied (the default policy is `deny`).
    pub fn deny_all() -> AclPolicy {
        AclPolicy::default()
    }

    /// Read access to every service, node and key.
    pub fn read_all() -> AclPolicy {
        AclPolicy::default()
            .service_prefix("", Access::Read)
            .node_prefix("", Access::Read)
            .key_prefix("", Access::Read)
    }

    fn rule(mut self, resource: Resource, name: &str, prefix: bool, access: Access) -> Self {
        self.rules.push(Rule {
            resource,
            name: name.to_string(),
            prefix,
            access,
        });
        self
    }

    /// `service "<name>" { policy = ... }`
    pub fn service(self, name: &str, access: Access) -> Self {
        self.rule(Resource::Service, name, false, access)
    }
    /// `service_prefix "<prefix>" { policy = ... }`
    pub fn service_prefix(self, prefix: &str, access: Access) -> Self {
        self.rule(Resource::Service, prefix, true, access)
    }
    /// `node "<name>" { policy = ... }`
    pub fn node(self, name: &str, access: Access) -> Self {
        self.rule(Resource::Node, name, false, access)
    }
    /// `node_prefix "<prefix>" { policy = ... }`
    pub fn node_prefix(self, prefix: &str, access: Access) -> Self {
        self.rule(Resource::Node, prefix, true, access)
    }
    /// `key "<name>" { policy = ... }`
    pub fn key(self, name: &str, access: Access) -> Self {
        self.rule(Resource::Key, name, false, access)
    }
    /// `key_prefix "<prefix>" { policy = ... }`
    pub fn key_prefix(self, prefix: &str, access: Access) -> Self {
        self.rule(Resource::Key, prefix, true, access)
    }

    /// `service "<name>" { intentions = ... }`
    pub fn intentions(self, name: &str, access: Access) -> Self {
        self.rule(Resource::Intention, name, false, access)
    }

    pub(crate) fn access(&self, resource: Resource, name: &str) -> Access {
        if self.management {
            return Access::Write;
        }
        // Consul grants a destination's intentions:read to whoever may
        // read the service, unless an intentions rule says otherwise.
        let ruled = |r: &Rule| {
            r.resource == Resource::Intention
                && if r.prefix {
                    name.starts_with(&r.name)
                } else {
                    r.name == name
                }
        };
        if resource == Resource::Intention && !self.rules.iter().any(ruled) {
            return self.access(Resource::Service, name).min(Access::Read);
        }
        if let Some(r) = self
            .rules
            .iter()
            .rev()
            .find(|r| r.resource == resource && !r.prefix && r.name == name)
        {
            return r.access;
        }
        self.rules
            .iter()
            .filter(|r| r.resource == resource && r.prefix && name.starts_with(&r.name))
            .max_by_key(|r| r.name.len())
            .map_or(Access::Deny, |r| r.access)
    }
}

/// The identity a request resolved to.
#[derive(Clone, Debug)]
pub(crate) struct Authz {
    /// `None` when ACLs are disabled.
    policy: Option<AclPolicy>,
    accessor: String,
    /// Whether the request carried a (non-empty) token.
    pub explicit: bool,
}

impl Authz {
    pub(crate) fn allows(&self, resource: Resource, name: &str, need: Access) -> bool {
        match &self.policy {
            None => true,
            Some(p) => p.access(resource, name) >= need,
        }
    }

    /// `Err(body)` with Consul's permission-denied text.
    pub(crate) fn require(
        &self,
        resource: Resource,
        name: &str,
        need: Access,
    ) -> Result<(), String> {
        if self.allows(resource, name, need) {
            return Ok(());
        }
        Err(format!(
            "Permission denied: token with AccessorID '{}' lacks permission '{}:{}' on \"{}\"",
            self.accessor,
            resource.as_str(),
            need.as_str(),
            name
        ))
    }
}

/// Accessor ID of Consul's anonymous token.
const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";

pub(crate) struct AclConfig {
    pub enabled: bool,
    tokens: HashMap<String, (String, AclPolicy)>,
    pub anonymous: AclPolicy,
    counter: u64,
}

impl AclConfig {
    pub(crate) fn new(enabled: bool) -> AclConfig {
        AclConfig {
            enabled,
            tokens: HashMap::new(),
            anonymous: AclPolicy::deny_all(),
            counter: 0,
        }
    }

    /// Adds a token; returns its accessor ID.
    pub(crate) fn add(&mut self, secret: &str, policy: AclPolicy) -> String {
        self.counter += 1;
        let accessor = format!(
            "{:08x}-acc0-4000-8000-{:012x}",
            0xacc0_0000u64 + self.counter,
            self.counter
        );
        self.tokens
            .insert(secret.to_string(), (accessor.clone(), policy));
        accessor
    }

    pub(crate) fn remove(&mut self, secret: &str) -> bool {
        self.tokens.remove(secret).is_some()
    }

    /// Resolves a token (empty = anonymous). `Err("ACL not found")` for an
    /// unknown token.
    pub(crate) fn resolve(&self, token: &str) -> Result<Authz, String> {
        if !self.enabled {
            return Ok(Authz {
                policy: None,
                accessor: String::new(),
                explicit: !token.is_empty(),
            });
        }
        if token.is_empty() || token == "anonymous" {
            return Ok(Authz {
                policy: Some(self.anonymous.clone()),
                accessor: ANONYMOUS_ACCESSOR.into(),
                explicit: false,
            });
        }
        match self.tokens.get(token) {
            Some((accessor, policy)) => Ok(Authz {
                policy: Some(policy.clone()),
                accessor: accessor.clone(),
                explicit: true,
            }),
            None => Err("ACL not found".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let p = AclPolicy::deny_all()
            .service_prefix("", Access::Read)
            .service_prefix("web", Access::Write)
            .service("web-admin", Access::Deny);
        assert_eq!(p.access(Resource::Service, "db"), Access::Read);
        assert_eq!(p.access(Resource::Service, "web-1"), Access::Write);
        assert_eq!(p.access(Resource::Service, "web-admin"), Access::Deny);
        assert_eq!(p.access(Resource::Node, "n1"), Access::Deny);
        assert_eq!(
            AclPolicy::management().access(Resource::Key, "x"),
            Access::Write
        );
    }

    #[test]
    fn resolve() {
        let mut c = AclConfig::new(true);
        c.add("s", AclPolicy::read_all());
        assert!(c.resolve("nope").is_err());
        let a = c.resolve("s").unwrap();
        assert!(a.explicit);
        assert!(a.allows(Resource::Key, "k", Access::Read));
        assert!(a.require(Resource::Key, "k", Access::Write).is_err());
        let anon = c.resolve("").unwrap();
        assert!(!anon.explicit);
        assert!(!anon.allows(Resource::Service, "web", Access::Read));
        let off = AclConfig::new(false);
        assert!(off
            .resolve("anything")
            .unwrap()
            .allows(Resource::Key, "k", Access::Write));
    }
}
