//! TLS on both sides, with rustls (ring provider, TLS 1.2 and 1.3 only).
//!
//! Clients: `[tls]` cert/key (PEM), optional CA for client certificates,
//! `mode = "prefer" | "require"`; certificates are re-read by `reload`.
//! Servers: per database `tls = "disable" | "prefer" | "require" |
//! "verify-ca" | "verify-full"` with `tls_ca`, as libpq's sslmode.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::stream::Stream;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMode {
    Prefer,
    Require,
}

/// `[tls]`: where the certificate and key are, read again on reload.
#[derive(Debug, Clone)]
pub struct ClientTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    pub mode: ClientMode,
}

/// The client-facing acceptor.
pub struct ClientTls {
    pub config: ClientTlsConfig,
    acceptor: RwLock<TlsAcceptor>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("config", &self.config)
            .finish()
    }
}

impl ClientTls {
    pub fn load(config: &ClientTlsConfig) -> Result<ClientTls, String> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(config)?));
        Ok(ClientTls {
            config: config.clone(),
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Reads the certificate, key and CA files again; on failure the
    /// running ones stay.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = TlsAcceptor::from(Arc::new(server_config(&self.config)?));
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub fn required(&self) -> bool {
        self.config.mode == ClientMode::Require
    }

    /// TLS handshake with a client that sent SSLRequest and heard `S`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let acceptor = self
            .acceptor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(Stream::Accepted(Box::new(acceptor.accept(tcp).await?)))
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect();
    let certs = certs.map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn server_config(c: &ClientTlsConfig) -> Result<ServerConfig, String> {
    let certs = read_certs(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", c.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| e.to_string())?;
    let builder = match &c.ca {
        // Client certificates are checked when sent; auth by them is later work.
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider())
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| e.to_string())?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key do not go together: {e}"))?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// libpq's sslmode, for pgheal's connections to servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamMode {
    #[default]
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl UpstreamMode {
    pub fn parse(s: &str) -> Option<UpstreamMode> {
        Some(match s {
            "disable" => UpstreamMode::Disable,
            "prefer" => UpstreamMode::Prefer,
            "require" => UpstreamMode::Require,
            "verify-ca" => UpstreamMode::VerifyCa,
            "verify-full" => UpstreamMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamMode::Disable => "disable",
            UpstreamMode::Prefer => "prefer",
            UpstreamMode::Require => "require",
            UpstreamMode::VerifyCa => "verify-ca",
            UpstreamMode::VerifyFull => "verify-full",
        }
    }
}

/// How a database's servers are connected to.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    pub mode: UpstreamMode,
    connector: Option<TlsConnector>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode.as_str())
    }
}

impl UpstreamTls {
    pub fn new(mode: UpstreamMode, ca: Option<&Path>) -> Result<UpstreamTls, String> {
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
            (UpstreamMode::Disable, _) => return Ok(UpstreamTls::default()),
            (UpstreamMode::VerifyCa | UpstreamMode::VerifyFull, None) => {
                return Err(format!("{} needs tls_ca", mode.as_str()))
            }
            (UpstreamMode::VerifyCa | UpstreamMode::VerifyFull, Some(ca)) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(read_roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(|e| e.to_string())?;
                Arc::new(Verifier {
                    webpki: Some(webpki),
                    check_name: mode == UpstreamMode::VerifyFull,
                })
            }
            // As libpq: prefer and require encrypt without checking who.
            _ => Arc::new(Verifier {
                webpki: None,
                check_name: false,
            }),
        };
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(UpstreamTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// TLS handshake with a server that answered SSLRequest with `S`.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> std::io::Result<Stream> {
        let Some(connector) = &self.connector else {
            return Ok(Stream::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Stream::Connected(Box::new(
            connector.connect(name, tcp).await?,
        )))
    }
}

/// Checks the chain against `tls_ca` (verify-ca, verify-full), the name
/// too for verify-full, or nothing (prefer, require).
#[derive(Debug)]
struct Verifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                if !self.check_name =>
            {
                Ok(ServerCertVerified::assertion())
            }
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
