//! TLS: the API's certificate and client CAs, followed as their files
//! change (certificates are rotated under a running control plane).

use almond_net::Followed;
use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The API's TLS config, rebuilt when a file of `tls` changes: new
/// handshakes get the new certificate (and trust the new CAs), open
/// connections keep theirs. A rebuild that fails (a key written before
/// its certificate) keeps the last config and is tried again at the next
/// check. Without this, a rotated certificate was served only after a
/// restart, and every proxy's poll failed once the old one expired.
pub struct ApiTls {
    files: almond_config::Tls,
    config: ArcSwap<rustls::ServerConfig>,
    followed: Followed,
}

impl ApiTls {
    /// Reads the files; `Err` names the key and file that cannot be used.
    pub fn load(files: &almond_config::Tls) -> Result<ApiTls, String> {
        let paths = vec![files.cert.clone(), files.key.clone(), files.ca.clone()];
        let followed = Followed::new(paths);
        Ok(ApiTls {
            config: ArcSwap::from_pointee(build(files)?),
            files: files.clone(),
            followed,
        })
    }

    /// The acceptor of the config in force.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Rebuilds the config if a file changed; returns whether a new one
    /// is in force.
    pub fn reload_if_changed(&self) -> bool {
        match self.followed.rebuild(|| build(&self.files)) {
            Ok(Some(config)) => {
                self.config.store(Arc::new(config));
                tracing::info!("control API: TLS certificates reloaded");
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "control API: TLS reload failed; keeping the previous certificates");
                false
            }
        }
    }

    /// Checks the files every second until `stop` changes.
    pub async fn watch(self: Arc<Self>, stop: watch::Receiver<bool>) {
        almond_net::check_until(stop, move || {
            self.reload_if_changed();
        })
        .await;
    }
}

/// The server config of `tls`: its certificate, and client certificates
/// verified against its CAs when presented (operators connect without).
fn build(tls: &almond_config::Tls) -> Result<rustls::ServerConfig, String> {
    let fail = |key: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        format!("{key}: {}: {e}", path.display())
    };
    let chain = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail("tls.cert", &tls.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| fail("tls.key", &tls.key, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.ca)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| fail("tls.ca", &tls.ca, &e))?;
    for ca in cas {
        roots.add(ca).map_err(|e| fail("tls.ca", &tls.ca, &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| fail("tls.ca", &tls.ca, &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("tls", &tls.cert, &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| fail("tls.key", &tls.key, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
