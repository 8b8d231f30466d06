//! TLS on both sides, with rustls (ring provider, TLS 1.2 and 1.3 only).
//!
//! Clients: `[tls]` cert/key (PEM), optional CA for client certificates,
//! `mode = "prefer" | "require"`; a reload reads the files again.
//! Servers: per database `tls = "disable" | "prefer" | "require" |
//! "verify-ca" | "verify-full"` with `tls_ca`, as libpq's sslmode.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::stream::Stream;

/// Why TLS could not be set up from the configured files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {source}")]
    ReadCerts {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot read a private key from {path}: {source}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("no certificate in {0}")]
    NoCertificate(PathBuf),
    #[error("bad CA certificate in {path}: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate and key do not go together: {0}")]
    KeyMismatch(#[source] rustls::Error),
    #[error("{0} needs tls_ca")]
    NeedsCa(&'static str),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("server certificate verifier: {0}")]
    ServerVerifier(#[source] rustls::server::VerifierBuilderError),
}

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
    /// When the certificate (the first in its file) expires, Unix seconds.
    pub not_after: Option<i64>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("config", &self.config)
            .finish()
    }
}

impl ClientTls {
    pub fn load(config: &ClientTlsConfig) -> Result<ClientTls, TlsError> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(config)?));
        let not_after = read_certs(&config.cert)?.first().and_then(not_after);
        Ok(ClientTls {
            config: config.clone(),
            not_after,
            acceptor,
        })
    }

    pub fn required(&self) -> bool {
        self.config.mode == ClientMode::Require
    }

    /// The acceptor, for another listener (HTTPS) with the same certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// TLS handshake with a client that sent SSLRequest and heard `S`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let stream = self.acceptor.accept(tcp).await?;
        Ok(Stream::Accepted(Box::new(stream)))
    }
}

/// A certificate's notAfter, Unix seconds (`None` when it does not parse).
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    let at = cert.tbs_certificate.validity.not_after.to_unix_duration();
    i64::try_from(at.as_secs()).ok()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::ReadCerts {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(roots)
}

fn server_config(c: &ClientTlsConfig) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&c.cert)?;
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|source| TlsError::ReadKey {
        path: c.key.clone(),
        source,
    })?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS)?;
    let builder = match &c.ca {
        // Client certificates are checked when sent; auth by them is later work.
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(read_roots(ca)?), provider())
                    .allow_unauthenticated()
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(TlsError::KeyMismatch)?;
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
    /// `tls_ca` and the certificates it held when read, so that a reload
    /// sees a new path or new content.
    ca: Option<(PathBuf, Arc<[u8]>)>,
    connector: Option<TlsConnector>,
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.mode == other.mode && self.ca == other.ca
    }
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mode.as_str())
    }
}

impl UpstreamTls {
    /// The same settings for libpq programs (pg_dump, pg_restore):
    /// `PGSSLMODE` and, with a CA, `PGSSLROOTCERT`.
    pub fn libpq_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env = vec![("PGSSLMODE", self.mode.as_str().into())];
        if let Some((path, _)) = &self.ca {
            env.push(("PGSSLROOTCERT", path.clone().into_os_string()));
        }
        env
    }

    pub fn new(mode: UpstreamMode, ca: Option<&Path>) -> Result<UpstreamTls, TlsError> {
        let ca_content = ca.map(|path| {
            let pem: Arc<[u8]> = Arc::from(std::fs::read(path).unwrap_or_default());
            (path.to_path_buf(), pem)
        });
        let verifier: Arc<dyn ServerCertVerifier> = match (mode, ca) {
            (UpstreamMode::Disable, _) => return Ok(UpstreamTls::default()),
            (UpstreamMode::VerifyCa | UpstreamMode::VerifyFull, None) => {
                return Err(TlsError::NeedsCa(mode.as_str()))
            }
            (UpstreamMode::VerifyCa | UpstreamMode::VerifyFull, Some(ca)) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(read_roots(ca)?),
                    provider(),
                )
                .build()
                .map_err(TlsError::ServerVerifier)?;
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
            .with_protocol_versions(VERSIONS)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(UpstreamTls {
            mode,
            ca: ca_content,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_programs_get_the_same_tls_settings() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).expect("CA");
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).expect("write");
        let tls = UpstreamTls::new(UpstreamMode::VerifyFull, Some(&path)).expect("tls");
        assert_eq!(
            tls.libpq_env(),
            vec![
                ("PGSSLMODE", "verify-full".into()),
                ("PGSSLROOTCERT", path.into_os_string())
            ]
        );
        let plain = UpstreamTls::default();
        assert_eq!(plain.libpq_env(), vec![("PGSSLMODE", "disable".into())]);
    }
}
