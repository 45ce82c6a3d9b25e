//! TLS: the proxy's mTLS identity, on both sides of a connection.
//!
//! [`Tls`] holds the rustls server config (inbound `tls` listeners, used
//! by `listen`) and client configs (upstream connections of `tls`
//! services, used by `upstream`), built from the PEM files of the
//! proxy-level `tls` key and swapped whole through `ArcSwap` when the files
//! change ([`Tls::watch`]): new handshakes use the new certificate, open
//! connections keep the one they started with. A failed reload keeps the
//! old configs. [`CurrentRoots`] follows a CA file the same way for the
//! control plane's client.

use almond_net::Followed;
use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// ALPN protocol ids.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// Why the TLS files could not be turned into configs.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("tls.{key}: {path}: {reason}")]
    File {
        /// The config key (`cert`, `key`, `ca`).
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material (key does not match, bad CA...).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA bundle.
    #[error("tls.ca: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The configs built from one reading of the files.
struct Configs {
    server: Arc<ServerConfig>,
    /// Offering `http/1.1` by ALPN.
    client_h1: Arc<ClientConfig>,
    /// Offering `h2` by ALPN.
    client_h2: Arc<ClientConfig>,
    /// The certificate and key, for clients that present the current
    /// identity themselves ([`CurrentIdentity`]).
    identity: Arc<CertifiedKey>,
}

/// The proxy's identity and trust bundle, reloadable.
pub struct Tls {
    files: almond_config::Tls,
    configs: ArcSwap<Configs>,
    /// The files, as of the configs in force.
    followed: Followed,
}

impl Tls {
    /// Reads the files and builds the configs.
    pub fn load(files: &almond_config::Tls) -> Result<Tls, TlsError> {
        let followed = Followed::new(vec![
            files.cert.clone(),
            files.key.clone(),
            files.ca.clone(),
        ]);
        let configs = build(files)?;
        Ok(Tls {
            files: files.clone(),
            configs: ArcSwap::from_pointee(configs),
            followed,
        })
    }

    /// The server config new inbound handshakes use.
    pub fn server(&self) -> Arc<ServerConfig> {
        self.configs.load().server.clone()
    }

    /// Opens TLS over `tcp` to `name`, offering `h2` or `http/1.1`.
    pub async fn connect(
        &self,
        name: ServerName<'static>,
        h2: bool,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let configs = self.configs.load();
        let config = if h2 {
            configs.client_h2.clone()
        } else {
            configs.client_h1.clone()
        };
        drop(configs);
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    }

    /// Rebuilds the configs if a file's modification time changed.
    /// Returns whether new configs are in force.
    pub fn reload_if_changed(&self) -> bool {
        match self.followed.rebuild(|| build(&self.files)) {
            Ok(Some(configs)) => {
                self.configs.store(Arc::new(configs));
                tracing::info!("tls: certificates reloaded");
                true
            }
            Ok(None) => false,
            // Files are often written one at a time: the next check
            // tries again.
            Err(e) => {
                tracing::warn!(error = %e, "tls: reload failed; keeping the previous certificates");
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

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the server and client configs (TLS 1.3 only) from the files.
fn build(files: &almond_config::Tls) -> Result<Configs, TlsError> {
    let chain = certs("cert", &files.cert)?;
    let roots = {
        let mut roots = RootCertStore::empty();
        for ca in certs("ca", &files.ca)? {
            roots.add(ca).map_err(|e| file_error("ca", &files.ca, e))?;
        }
        Arc::new(roots)
    };
    let versions = &[&rustls::version::TLS13];
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key(&files.key)?)?;
    server.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
    let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key(&files.key)?)?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(config))
    };
    Ok(Configs {
        server: Arc::new(server),
        client_h1: client(HTTP11)?,
        client_h2: client(H2)?,
        identity: Arc::new(CertifiedKey::from_der(
            chain,
            key(&files.key)?,
            &provider(),
        )?),
    })
}

/// Presents the proxy's identity as it is now (the files as last
/// reloaded) in every handshake: for a client built once and kept, like
/// the control plane's, which would otherwise present the certificate it
/// started with long after it was rotated and expired.
pub struct CurrentIdentity(pub Arc<Tls>);

impl std::fmt::Debug for CurrentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CurrentIdentity")
            .field(&self.0.files.cert)
            .finish()
    }
}

impl ResolvesClientCert for CurrentIdentity {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.configs.load().identity.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server's certificate against a CA file as it is now: the
/// file is read again when its modification time changes, so a rotated
/// CA is trusted without a restart (for a client built once and kept, like
/// the control plane's). A change that cannot be read keeps the last CAs.
pub struct CurrentRoots {
    key: &'static str,
    path: PathBuf,
    /// The file, as of `verifier`.
    followed: Followed,
    /// The verifier of the file as last read.
    verifier: Mutex<Arc<WebPkiServerVerifier>>,
}

impl CurrentRoots {
    /// Reads the CA file named by config key `key`.
    pub fn load(key: &'static str, path: &Path) -> Result<CurrentRoots, TlsError> {
        let followed = Followed::new(vec![path.to_owned()]);
        Ok(CurrentRoots {
            key,
            path: path.to_owned(),
            followed,
            verifier: Mutex::new(server_verifier(key, path)?),
        })
    }

    /// The verifier of the file as last read, read again first if it changed.
    fn current(&self) -> Arc<WebPkiServerVerifier> {
        let mut verifier = self.verifier.lock().unwrap_or_else(PoisonError::into_inner);
        match self
            .followed
            .rebuild(|| server_verifier(self.key, &self.path))
        {
            Ok(Some(read)) => {
                *verifier = read;
                tracing::info!(file = %self.path.display(), "{}: CAs reloaded", self.key);
            }
            Ok(None) => {}
            // Written one file at a time: the next handshake tries again.
            Err(e) => tracing::warn!(error = %e, "CA reload failed; keeping the previous CAs"),
        }
        verifier.clone()
    }
}

impl std::fmt::Debug for CurrentRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CurrentRoots").field(&self.path).finish()
    }
}

impl ServerCertVerifier for CurrentRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// A server certificate verifier trusting the CAs in `path`.
fn server_verifier(key: &'static str, path: &Path) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs(key, path)? {
        roots.add(ca).map_err(|e| file_error(key, path, e))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| file_error(key, path, e))
}

fn file_error(key: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        key,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(key, path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| file_error("key", path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| file_error("key", path, e))
}

/// A service's upstream TLS: the proxy's identity and the name the
/// endpoints' certificates must carry.
pub struct Upstream {
    /// The proxy's identity; `None` when the config has no `tls` (then
    /// connecting fails: a snapshot asked for TLS the proxy cannot do).
    pub tls: Option<Arc<Tls>>,
    /// Server name sent as SNI and verified.
    pub server_name: ServerName<'static>,
}

/// An upstream byte stream: plain TCP or TLS over it.
pub enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (boxed: the session state is large).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
