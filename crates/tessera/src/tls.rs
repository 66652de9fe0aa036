//! HTTPS: an `axum::serve` listener that terminates TLS with rustls (ring provider), with
//! optional certificate reload when the files change (`--enable-ssl-refresh`, as KServe
//! rotates the certificates it mounts at `/var/run/kserve/tls`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::ServeError;

/// How often the certificate files are checked for changes with `--enable-ssl-refresh`.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Read a PEM certificate chain and private key into a server configuration.
pub fn load_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, ServeError> {
    let bad =
        |what: &str, p: &Path, e: &dyn std::fmt::Display| ServeError::Config(format!("{what} {}: {e}", p.display()));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("--ssl-certfile", cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--ssl-certfile", cert, &e))?;
    if certs.is_empty() {
        return Err(bad("--ssl-certfile", cert, &"no PEM certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("--ssl-keyfile", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Config(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| ServeError::Config(format!("--ssl-certfile/--ssl-keyfile do not form a usable pair: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn mtimes(cert: &Path, key: &Path) -> [Option<SystemTime>; 2] {
    [cert, key].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// Accepted TLS connections, handshaken off the serve loop.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, cert: PathBuf, key: PathBuf, refresh: bool) -> Result<Self, ServeError> {
        let cfg = Arc::new(RwLock::new(load_config(&cert, &key)?));
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        if refresh {
            let (cfg, tx) = (cfg.clone(), tx.clone());
            tokio::spawn(async move {
                let mut seen = mtimes(&cert, &key);
                while !tx.is_closed() {
                    tokio::time::sleep(REFRESH_INTERVAL).await;
                    let now = mtimes(&cert, &key);
                    if now == seen {
                        continue;
                    }
                    match load_config(&cert, &key) {
                        Ok(c) => {
                            if let Ok(mut w) = cfg.write() {
                                *w = c;
                            }
                            seen = now;
                            tracing::info!("TLS certificate reloaded from {}", cert.display());
                        }
                        // A half-written pair: keep the old one and try again next time.
                        Err(e) => tracing::warn!("TLS reload failed, keeping the current certificate: {e}"),
                    }
                }
            });
        }
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = tcp.accept() => r,
                    _ = tx.closed() => return, // the server stopped: close the port
                };
                let (sock, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let current = match cfg.read() {
                    Ok(c) => c.clone(),
                    Err(p) => p.into_inner().clone(),
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, TlsAcceptor::from(current).accept(sock)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("TLS handshake with {peer} failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task is gone (it only stops when we are dropped): never yield.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}
