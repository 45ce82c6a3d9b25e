//! Authorization by client identity: the names a verified client
//! certificate carries (typed as `allow` entries are) and who may call.

use crate::identity::tls::Tls;
use std::sync::Arc;

/// An inbound `tls` listener: the identity and who may call.
pub struct Inbound {
    /// The proxy's identity.
    pub tls: Arc<Tls>,
    /// Allowed client identities; empty = every verified client.
    pub allow: Vec<String>,
}

impl Inbound {
    /// Whether a client with these certificate names may call.
    pub fn allows(&self, names: &[String]) -> bool {
        self.allow.is_empty() || names.iter().any(|n| self.allow.contains(n))
    }
}

/// A request on a `tls` listener whose client identity is not on the
/// listener's `allow`: answered 403 by the pipeline, which logs, taps and
/// stamps it as any other answer. The identity shown.
#[derive(Debug, Clone)]
pub struct NotAllowed(pub Arc<str>);

/// The verified client identities of a request's connection (on `tls`
/// listeners), for a service's `authz`.
#[derive(Debug, Clone)]
pub struct Identities(pub Arc<[String]>);

impl Identities {
    /// Whether one of them is on `allow`.
    pub fn any_in(&self, allow: &[String]) -> bool {
        self.0.iter().any(|n| allow.contains(n))
    }
}

/// The names of a (verified) certificate, typed as `allow` entries are:
/// its `spiffe://` URI SANs as they are (another URI, such as one that
/// reads `dns:NAME`, is no identity here: it must not pass for a DNS
/// name), its DNS SANs as `dns:NAME`, its subject CN as `cn:NAME`; URI
/// SANs first.
pub fn identities(cert: &[u8]) -> Vec<String> {
    der::names(cert).unwrap_or_default()
}

/// Just enough DER to read a certificate's names. The certificate was
/// verified by webpki first, so it is well-formed; anything unexpected
/// yields no names (and so no access under an `allow` list).
mod der {
    /// One TLV: (tag, contents, rest).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    /// Every TLV in `input`, in order.
    fn items(mut input: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        while let Some((tag, body, rest)) = tlv(input) {
            out.push((tag, body));
            input = rest;
        }
        out
    }

    const SAN: &[u8] = &[0x55, 0x1d, 0x11]; // 2.5.29.17
    const CN: &[u8] = &[0x55, 0x04, 0x03]; // 2.5.4.3

    pub(super) fn names(cert: &[u8]) -> Option<Vec<String>> {
        let (_, certificate, _) = tlv(cert)?;
        let (_, tbs, _) = tlv(certificate)?;
        let fields = items(tbs);
        let (mut uris, mut dns) = (Vec::new(), Vec::new());
        // Extensions: [3] EXPLICIT SEQUENCE OF Extension.
        if let Some((_, ext)) = fields.iter().find(|(tag, _)| *tag == 0xa3) {
            let (_, list, _) = tlv(ext)?;
            for (_, extension) in items(list) {
                let parts = items(extension);
                if parts.first().map(|p| p.1) != Some(SAN) {
                    continue;
                }
                let (_, value) = parts.iter().rev().find(|(tag, _)| *tag == 0x04)?;
                let (_, general_names, _) = tlv(value)?;
                for (tag, name) in items(general_names) {
                    // [6] uniformResourceIdentifier, [2] dNSName (IA5).
                    let name = String::from_utf8_lossy(name);
                    match tag {
                        0x86 if name.starts_with("spiffe://") => uris.push(name.into_owned()),
                        0x82 => dns.push(format!("dns:{name}")),
                        _ => {}
                    }
                }
            }
        }
        // Subject: the SEQUENCE after issuer and validity (index 5 with a
        // version, 4 without).
        let offset = usize::from(fields.first().map(|f| f.0) == Some(0xa0));
        if let Some((0x30, subject)) = fields.get(4 + offset) {
            for (_, rdn) in items(subject) {
                for (_, attr) in items(rdn) {
                    let parts = items(attr);
                    if let [(0x06, oid), (_, value), ..] = parts.as_slice() {
                        if *oid == CN {
                            dns.push(format!("cn:{}", String::from_utf8_lossy(value)));
                        }
                    }
                }
            }
        }
        uris.append(&mut dns);
        Some(uris)
    }
}

#[cfg(test)]
mod tests {
    use super::identities;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    /// A self-signed certificate with these URI SANs, DNS SAN `web` and CN `web`.
    fn cert(uris: &[&str]) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["web".to_owned()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, "web");
        params.self_signed(&key).unwrap().der().to_vec()
    }

    /// Only `spiffe://` URI SANs are identities: a URI SAN that reads
    /// `dns:…` or `cn:…` must not pass for a DNS name or a CN.
    #[test]
    fn a_uri_san_cannot_pose_as_a_dns_name_or_a_cn() {
        let names = identities(&cert(&[
            "spiffe://almond.test/web",
            "dns:orders.internal",
            "cn:admin",
        ]));
        assert_eq!(names, ["spiffe://almond.test/web", "dns:web", "cn:web"]);
    }
}
