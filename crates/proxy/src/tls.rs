//! TLS from clients: `client_tls_sslmode`, the rustls server config built from the
//! `client_tls_*` files, and the client certificate's common name for `auth_type = "cert"` and
//! `verify-full`. The config sits behind a lock so that a reload can replace it: handshakes
//! started afterwards use the new certificate, sessions already encrypted keep theirs. The
//! handshake itself and the rules about plaintext are in `client.rs`.
//!
//! Modes, as PgBouncer has them: `disable` answers SSLRequest with `N`; `allow` and `prefer`
//! encrypt clients that ask; `require` refuses TCP clients that do not; `verify-ca` also
//! demands a client certificate that chains to `client_tls_ca_file`; `verify-full` also demands
//! that its CN is the user name (as PostgreSQL's `clientcert=verify-full`). Unix-socket clients
//! are never asked for TLS (libpq never offers it there).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use upstream::tls::{load_certs, load_key, load_roots, provider, SslMode, TlsConfigError};

/// The ALPN protocol name PostgreSQL 17 clients offer, and require for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Files for [`ClientTls::new`].
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// `client_tls_cert_file`: Breakwater's certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// `client_tls_key_file`: its private key.
    pub key_file: Option<PathBuf>,
    /// `client_tls_ca_file`: CAs that client certificates must chain to (verify-ca/full).
    pub ca_file: Option<PathBuf>,
}

/// `client_tls_sslmode` and the current acceptor config. Clones share the config, so replacing
/// it through any clone (a reload) reaches every listener.
#[derive(Clone)]
pub struct ClientTls {
    pub mode: SslMode,
    config: Arc<RwLock<Option<Arc<ServerConfig>>>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls::disabled()
    }
}

impl ClientTls {
    pub fn disabled() -> ClientTls {
        ClientTls {
            mode: SslMode::Disable,
            config: Arc::new(RwLock::new(None)),
        }
    }

    pub fn new(mode: SslMode, files: &ClientTlsFiles) -> Result<ClientTls, TlsConfigError> {
        Ok(ClientTls {
            mode,
            config: Arc::new(RwLock::new(Self::build_config(mode, files)?)),
        })
    }

    /// Reads the files and builds the acceptor config (`None` for `disable`). Used at start and
    /// by a reload, which then calls [`ClientTls::replace_config`].
    pub fn build_config(
        mode: SslMode,
        files: &ClientTlsFiles,
    ) -> Result<Option<Arc<ServerConfig>>, TlsConfigError> {
        if mode == SslMode::Disable {
            return Ok(None);
        }
        let missing = |setting| TlsConfigError::Missing {
            setting,
            mode_setting: "client_tls_sslmode",
            mode,
        };
        let cert_file = files
            .cert_file
            .as_deref()
            .ok_or_else(|| missing("client_tls_cert_file"))?;
        let key_file = files
            .key_file
            .as_deref()
            .ok_or_else(|| missing("client_tls_key_file"))?;
        let chain = load_certs("client_tls_cert_file", cert_file)?;
        let key = load_key("client_tls_key_file", key_file)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsConfigError::Rustls {
                what: "client TLS protocol versions".into(),
                source,
            })?;
        let builder = if mode >= SslMode::VerifyCa {
            let ca = files
                .ca_file
                .as_deref()
                .ok_or_else(|| missing("client_tls_ca_file"))?;
            let roots = load_roots("client_tls_ca_file", ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsConfigError::Invalid {
                    setting: "client_tls_ca_file",
                    path: ca.to_owned(),
                    reason: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config =
            builder
                .with_single_cert(chain, key)
                .map_err(|source| TlsConfigError::Rustls {
                    what: format!(
                        "client_tls_cert_file {} with client_tls_key_file {}",
                        cert_file.display(),
                        key_file.display()
                    ),
                    source,
                })?;
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// Swaps in a new config (certificate reload). Established sessions are not touched.
    pub fn replace_config(&self, config: Option<Arc<ServerConfig>>) {
        match self.config.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }

    /// The config a handshake starting now uses; `None` when TLS is off.
    pub(crate) fn current(&self) -> Option<Arc<ServerConfig>> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The first common name (2.5.4.3) in a DER certificate's subject, as PostgreSQL takes it for
/// `clientcert=verify-full` and cert authentication. `None` for a malformed certificate, a
/// subject without CN, or a CN that is not a string or holds a NUL (which could make
/// "admin\0.evil" pass as "admin" in C code downstream).
pub fn common_name(cert_der: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = der_tlv(cert_der)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_tlv(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // version [0] (optional), serialNumber, signature, issuer, validity, subject.
    let mut rest = tbs;
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        let (_, _, after) = der_tlv(rest)?;
        rest = after;
    }
    let (tag, mut rdns, _) = der_tlv(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    while !rdns.is_empty() {
        let (tag, mut set, after) = der_tlv(rdns)?;
        rdns = after;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, attr, after) = der_tlv(set)?;
            set = after;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_tlv(attr)?;
            if tag != 0x06 || oid != OID_CN {
                continue;
            }
            let (tag, text, _) = der_tlv(value)?;
            // UTF8String, PrintableString, TeletexString (as PostgreSQL, read as bytes), IA5String.
            if !matches!(tag, 0x0c | 0x13 | 0x14 | 0x16) || text.contains(&0) {
                return None;
            }
            return String::from_utf8(text.to_vec()).ok();
        }
    }
    None
}

/// One DER tag-length-value: (tag, contents, what follows). Definite lengths up to 4 bytes.
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_read_from_the_subject() {
        use rcgen::DnType::*;
        type Subject<'a> = &'a [(rcgen::DnType, &'a str)];
        let cases: &[(Subject, Option<&str>)] = &[
            (&[(CommonName, "app")], Some("app")),
            (
                &[(OrganizationName, "Acme"), (CommonName, "app")],
                Some("app"),
            ),
            (&[(CommonName, "app"), (CountryName, "DE")], Some("app")),
            (&[(OrganizationName, "Acme")], None),
            (&[(CommonName, "ünïcode")], Some("ünïcode")),
        ];
        for (dn, want) in cases {
            assert_eq!(common_name(&cert_with(dn)).as_deref(), *want, "{dn:?}");
        }
    }

    #[test]
    fn a_nul_in_the_common_name_is_refused() {
        assert_eq!(
            common_name(&cert_with(&[(rcgen::DnType::CommonName, "admin\0x")])),
            None
        );
    }

    #[test]
    fn malformed_certificates_have_no_common_name() {
        let good = cert_with(&[(rcgen::DnType::CommonName, "app")]);
        for cut in [0, 1, 2, 10, good.len() / 2, good.len() - 1] {
            assert_eq!(common_name(&good[..cut]), None, "cut at {cut}");
        }
        assert_eq!(common_name(b"\x30\x85\xff\xff\xff\xff\xff"), None);
    }

    #[test]
    fn ssl_modes_parse_with_libpq_names() {
        for m in SslMode::ALL {
            assert_eq!(m.as_str().parse::<SslMode>().ok(), Some(m));
        }
        assert!("verify_full".parse::<SslMode>().is_err());
        assert!(SslMode::Require.requires_tls() && !SslMode::Prefer.requires_tls());
    }
}
