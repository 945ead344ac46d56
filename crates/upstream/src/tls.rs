//! TLS to servers: libpq's sslmodes (`server_tls_sslmode`), the rustls client config built once
//! from the configured files, the SSLRequest exchange and handshake for a fresh TCP connection,
//! and the PEM loading the client side shares. It never decides what a client may do, and never
//! reads a file after start-up except when asked to build a config.
//!
//! Modes, as libpq has them: `disable` never asks; `allow` logs in without TLS and tries again
//! with TLS if the server refuses; `prefer` asks and goes on in the clear if the server says no;
//! `require` insists on encryption but, like libpq without a root certificate and like
//! PgBouncer, does not check the certificate; `verify-ca` checks the chain against
//! `server_tls_ca_file`; `verify-full` checks the chain and that the certificate names the host
//! Breakwater connected to (the configured host name, not the address it resolved to).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stream::Stream;

/// libpq's `sslmode` values, used for both `client_tls_sslmode` and `server_tls_sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Encryption is mandatory (require and the verify modes).
    pub fn requires_tls(self) -> bool {
        self >= SslMode::Require
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A TLS setting that cannot be turned into a rustls config. Each names the setting and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot read {setting} {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{setting} {path}: {reason}")]
    Invalid {
        setting: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{setting} is required with {mode_setting} = \"{mode}\"")]
    Missing {
        setting: &'static str,
        mode_setting: &'static str,
        mode: SslMode,
    },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
}

impl TlsConfigError {
    fn invalid(setting: &'static str, path: &Path, reason: String) -> TlsConfigError {
        TlsConfigError::Invalid {
            setting,
            path: path.to_owned(),
            reason,
        }
    }
}

/// The crypto provider for every config Breakwater builds: ring, named explicitly so that no
/// other crate's choice of a process-wide default can change it or make it ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(setting: &'static str, path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read_file(setting, path)?;
    let invalid = |reason| TlsConfigError::invalid(setting, path, reason);
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not a valid PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(
            "holds no PEM certificate (BEGIN CERTIFICATE)".into(),
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(
    setting: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read_file(setting, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        TlsConfigError::invalid(
            setting,
            path,
            format!("holds no usable PEM private key ({e})"),
        )
    })
}

/// A root store from a CA file; every certificate in it is a trust anchor.
pub fn load_roots(setting: &'static str, path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(setting, path)? {
        roots.add(cert).map_err(|e| {
            TlsConfigError::invalid(setting, path, format!("not a usable CA certificate ({e})"))
        })?;
    }
    Ok(roots)
}

/// Files for [`ServerTls::new`].
#[derive(Debug, Clone, Default)]
pub struct ServerTlsFiles {
    /// `server_tls_ca_file`: trust anchors for verify-ca and verify-full.
    pub ca_file: Option<PathBuf>,
    /// `server_tls_cert_file` and `server_tls_key_file`: a client certificate for servers that
    /// ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `server_tls_sslmode` and the rustls config it needs, built once at load.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: SslMode,
    config: Option<Arc<ClientConfig>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls::disabled()
    }
}

impl ServerTls {
    /// Never asks for TLS.
    pub fn disabled() -> ServerTls {
        ServerTls {
            mode: SslMode::Disable,
            config: None,
        }
    }

    pub fn new(mode: SslMode, files: &ServerTlsFiles) -> Result<ServerTls, TlsConfigError> {
        if mode == SslMode::Disable {
            return Ok(ServerTls::disabled());
        }
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => {
                let ca = files.ca_file.as_deref().ok_or(TlsConfigError::Missing {
                    setting: "server_tls_ca_file",
                    mode_setting: "server_tls_sslmode",
                    mode,
                })?;
                let roots = load_roots("server_tls_ca_file", ca)?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| {
                            TlsConfigError::invalid("server_tls_ca_file", ca, e.to_string())
                        })?;
                if mode == SslMode::VerifyFull {
                    webpki
                } else {
                    Arc::new(NoHostNameCheck {
                        chain: Some(webpki),
                        provider: provider.clone(),
                    })
                }
            }
            _ => Arc::new(NoHostNameCheck {
                chain: None,
                provider: provider.clone(),
            }),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsConfigError::Rustls {
                what: "server TLS protocol versions".into(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => {
                let chain = load_certs("server_tls_cert_file", cert)?;
                let key_der = load_key("server_tls_key_file", key)?;
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|source| TlsConfigError::Rustls {
                        what: format!(
                            "server_tls_cert_file {} with server_tls_key_file {}",
                            cert.display(),
                            key.display()
                        ),
                        source,
                    })?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) | (None, Some(_)) => {
                return Err(TlsConfigError::Missing {
                    setting: "server_tls_cert_file and server_tls_key_file (both or neither)",
                    mode_setting: "server_tls_sslmode",
                    mode,
                })
            }
        };
        Ok(ServerTls {
            mode,
            config: Some(Arc::new(config)),
        })
    }
}

/// How negotiating TLS with a server failed. The caller adds the host and address.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the server does not support TLS, and server_tls_sslmode = \"{0}\" requires it")]
    Refused(SslMode),
    #[error("TLS handshake failed (server_tls_sslmode = \"{mode}\"): {source}{hint}")]
    Handshake {
        mode: SslMode,
        source: io::Error,
        /// What to look at, for the common certificate mistakes; may be empty.
        hint: &'static str,
    },
    #[error("\"{0}\" is not a valid TLS server name")]
    Name(String),
    #[error("invalid answer to SSLRequest: byte {0:#04x}")]
    BadAnswer(u8),
    #[error("TLS negotiation failed: {0}")]
    Io(io::Error),
}

impl TlsError {
    /// A certificate problem, a server without TLS where TLS is required, a bad name: trying
    /// again will not help until someone changes the server or the config.
    pub fn is_permanent(&self) -> bool {
        match self {
            TlsError::Refused(_) | TlsError::Name(_) => true,
            TlsError::Handshake { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
                .is_some_and(|e| {
                    matches!(
                        e,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::AlertReceived(_)
                            | rustls::Error::PeerIncompatible(_)
                    )
                }),
            TlsError::BadAnswer(_) | TlsError::Io(_) => false,
        }
    }
}

impl ServerTls {
    /// Whether a new connection asks for TLS first. `allow` starts without it.
    pub fn asks_first(&self) -> bool {
        self.mode >= SslMode::Prefer
    }

    /// Sends SSLRequest on a fresh TCP connection and, on 'S', runs the handshake with SNI set
    /// to `host` (not for IP addresses). On 'N', goes on in the clear unless the mode requires
    /// TLS. Unix sockets are returned as they are: libpq does not use TLS there either. The
    /// caller bounds this by server_connect_timeout.
    pub async fn start(&self, stream: Stream, host: &str) -> Result<Stream, TlsError> {
        let Some(config) = &self.config else {
            return Ok(stream);
        };
        let Stream::Tcp(mut tcp) = stream else {
            return Ok(stream);
        };
        let name = ServerName::try_from(host)
            .map_err(|_| TlsError::Name(host.to_owned()))?
            .to_owned();
        let mut req = BytesMut::with_capacity(8);
        proto::startup::write_ssl_request(&mut req);
        tcp.write_all(&req).await.map_err(TlsError::Io)?;
        // One byte and not more: anything the server sent after it would be plaintext a
        // man in the middle injected before the handshake (CVE-2021-23222), and is left unread
        // for the TLS layer to reject.
        let answer = tcp.read_u8().await.map_err(TlsError::Io)?;
        match answer {
            b'S' => {}
            b'N' if !self.mode.requires_tls() => return Ok(Stream::Tcp(tcp)),
            b'N' => return Err(TlsError::Refused(self.mode)),
            // An ErrorResponse: a server too old for SSLRequest. Nothing Breakwater supports.
            other => return Err(TlsError::BadAnswer(other)),
        }
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        match connector.connect(name, tcp).await {
            Ok(tls) => Ok(Stream::TlsToServer(Box::new(tls))),
            Err(source) => Err(TlsError::Handshake {
                mode: self.mode,
                hint: handshake_hint(&source),
                source,
            }),
        }
    }
}

fn handshake_hint(e: &io::Error) -> &'static str {
    match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
            " (the server's certificate is not signed by a CA in server_tls_ca_file)"
        }
        Some(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => " (verify-full checks the database entry's host against the certificate)",
        _ => "",
    }
}

/// The checks short of verify-full. Handshake signatures are checked as webpki checks them (with
/// the same provider's algorithms), so the server must hold the key of the certificate it shows.
#[derive(Debug)]
struct NoHostNameCheck {
    /// `verify-ca`: the full webpki check (chain to a configured CA, validity dates, key usage)
    /// except the host name. webpki checks the chain before the name, so a name error means the
    /// chain was good.
    ///
    /// `None` for `require`, `prefer`, `allow`: any certificate, as libpq without a root
    /// certificate: encryption against passive eavesdroppers, no authentication of the server.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoHostNameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Bounds `fut` by `timeout` when there is one.
pub(crate) async fn bounded<F: std::future::Future>(
    timeout: Option<Duration>,
    fut: F,
) -> Result<F::Output, Duration> {
    match timeout {
        Some(t) => crate::timer::timeout(t, fut).await.map_err(|_| t),
        None => Ok(fut.await),
    }
}
