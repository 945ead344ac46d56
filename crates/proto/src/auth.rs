//! Authentication on both sides of the pooler: the PgBouncer-format `auth_file` ([`Userlist`]), the
//! server side of SCRAM-SHA-256 and md5 (Breakwater checking its clients) and the client side
//! (Breakwater logging in to PostgreSQL). It is pure logic over byte strings: it never does I/O,
//! never decides which method to ask for or what to tell a client, never logs, formats or `Debug`s
//! a secret, and never panics on anything a peer sent.

use std::collections::HashMap;
use std::fmt;
use std::mem;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::Md5;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Iterations for verifiers Breakwater makes itself: PostgreSQL's default `scram_iterations`.
pub const SCRAM_DEFAULT_ITERATIONS: u32 = 4096;

/// Most PBKDF2 iterations [`ScramClient`] runs for a server when it has the password. The count
/// comes from the server, so without a cap an impostor could make every login burn CPU. This is
/// the cap of postgres-protocol (which runs that PBKDF2) and of pgjdbc; checking it here first
/// gives a clear error instead of its opaque one.
pub const SCRAM_MAX_ITERATIONS: u32 = 100_000;

/// Random bytes in a nonce before base64 (PostgreSQL and libpq use 18: 24 characters on the wire).
const SCRAM_NONCE_LEN: usize = 18;

const SCRAM_PREFIX: &str = "SCRAM-SHA-256$";

// ---------------------------------------------------------------------------------------------
// auth_file
// ---------------------------------------------------------------------------------------------

/// What the `auth_file` stores for one user.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// A plaintext password. An empty one means the user has no password and never verifies.
    Plain(String),
    /// The 16 bytes behind an `md5<32 hex digits>` entry: md5(password || username).
    Md5([u8; 16]),
    /// A `SCRAM-SHA-256$...` verifier, as PostgreSQL keeps in `pg_authid`.
    Scram(ScramVerifier),
}

impl Secret {
    /// The verifier to run server-side SCRAM with, or `None` when SCRAM cannot work: an md5 hash
    /// holds nothing SCRAM can use, and an empty password must never verify. A plaintext password
    /// costs a PBKDF2 run (random salt) on every call.
    pub fn scram_verifier(&self) -> Option<ScramVerifier> {
        match self {
            Secret::Plain(password) if password.is_empty() => None,
            Secret::Plain(password) => Some(ScramVerifier::from_password(password)),
            Secret::Md5(_) => None,
            Secret::Scram(verifier) => Some(verifier.clone()),
        }
    }

    /// A password as PostgreSQL stores it (`pg_shadow.passwd`, what auth_query returns): an
    /// md5 hash, a SCRAM verifier, or plaintext. `None` for a malformed md5 or SCRAM entry.
    pub fn from_stored(password: String) -> Option<Secret> {
        Secret::from_auth_field(password).ok()
    }

    fn from_auth_field(password: String) -> Result<Secret, BadSecret> {
        if let Some(hex) = password.strip_prefix("md5") {
            return decode_hex16(hex).map(Secret::Md5).ok_or(BadSecret::Md5);
        }
        if password.starts_with(SCRAM_PREFIX) {
            return ScramVerifier::parse(&password)
                .map(Secret::Scram)
                .ok_or(BadSecret::Scram);
        }
        Ok(Secret::Plain(password))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(<redacted>)"),
            Secret::Md5(_) => f.write_str("Md5(<redacted>)"),
            Secret::Scram(verifier) => f.debug_tuple("Scram").field(verifier).finish(),
        }
    }
}

enum BadSecret {
    Md5,
    Scram,
}

/// The users of a PgBouncer-format `auth_file`: one `"username" "password"` line each.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Userlist {
    users: HashMap<String, Secret>,
}

impl Userlist {
    /// Parses an `auth_file`. Each field is double-quoted, with `""` standing for a literal quote;
    /// blank lines and lines starting with `;` or `#` are skipped, and anything after the password
    /// field is ignored, as PgBouncer does. A later line for the same user replaces an earlier one.
    /// Unlike PgBouncer, a password that starts with `md5` or `SCRAM-SHA-256$` but is not a valid
    /// hash of that kind is an error rather than a plaintext password: it is almost surely a typo.
    pub fn parse(text: &str) -> Result<Userlist, UserlistError> {
        // Editors on Windows may start the file with a byte order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let rest = raw.trim_start();
            if rest.is_empty() || rest.starts_with(';') || rest.starts_with('#') {
                continue;
            }
            let syntax = |problem| UserlistError::Syntax { line, problem };
            let (user, rest) = quoted_field(rest).map_err(|e| match e {
                FieldError::NotQuoted => {
                    syntax("line does not start with a double-quoted username")
                }
                FieldError::Unterminated => syntax("username has no closing double quote"),
            })?;
            if user.is_empty() {
                return Err(syntax("username is empty"));
            }
            let rest = rest.trim_start();
            if rest.is_empty() {
                return Err(syntax("password is missing after the username"));
            }
            let (password, _ignored) = quoted_field(rest).map_err(|e| match e {
                FieldError::NotQuoted => {
                    syntax("expected a double-quoted password after the username")
                }
                FieldError::Unterminated => syntax("password has no closing double quote"),
            })?;
            let secret = Secret::from_auth_field(password).map_err(|bad| match bad {
                BadSecret::Md5 => UserlistError::BadMd5 {
                    line,
                    user: user.clone(),
                },
                BadSecret::Scram => UserlistError::BadScram {
                    line,
                    user: user.clone(),
                },
            })?;
            users.insert(user, secret);
        }
        Ok(Userlist { users })
    }

    /// Adds or replaces one user (a login given outside the file, such as an upstream URL's).
    pub fn insert(&mut self, user: String, secret: Secret) {
        self.users.insert(user, secret);
    }

    pub fn get(&self, user: &str) -> Option<&Secret> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// User names, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

impl fmt::Debug for Userlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Userlist")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A line of the `auth_file` that cannot be read. `line` is 1-based; the file's path is added by
/// whoever read the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserlistError {
    #[error("auth_file line {line}: {problem}")]
    Syntax { line: usize, problem: &'static str },
    #[error(
        "auth_file line {line}: password of user \"{user}\" starts with \"md5\" but is not \"md5\" \
         followed by 32 hex digits"
    )]
    BadMd5 { line: usize, user: String },
    #[error(
        "auth_file line {line}: password of user \"{user}\" starts with \"SCRAM-SHA-256$\" but is \
         not a valid SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> verifier"
    )]
    BadScram { line: usize, user: String },
}

impl UserlistError {
    /// The 1-based line the error is on.
    pub fn line(&self) -> usize {
        match self {
            UserlistError::Syntax { line, .. }
            | UserlistError::BadMd5 { line, .. }
            | UserlistError::BadScram { line, .. } => *line,
        }
    }
}

enum FieldError {
    NotQuoted,
    Unterminated,
}

/// Reads one `"..."` field with `""` as an escaped quote; returns it and what follows it.
fn quoted_field(s: &str) -> Result<(String, &str), FieldError> {
    let mut rest = s.strip_prefix('"').ok_or(FieldError::NotQuoted)?;
    let mut value = String::new();
    loop {
        let (chunk, after) = rest.split_once('"').ok_or(FieldError::Unterminated)?;
        value.push_str(chunk);
        match after.strip_prefix('"') {
            Some(after_escape) => {
                value.push('"');
                rest = after_escape;
            }
            None => return Ok((value, after)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256 verifier
// ---------------------------------------------------------------------------------------------

/// A SCRAM-SHA-256 verifier: what a server needs to check a client's proof, without the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses PostgreSQL's `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64
    /// fields). `None` if anything is off, including zero iterations or an empty salt.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix(SCRAM_PREFIX)?;
        let (iterations_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iterations_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let iterations = parse_decimal(iterations)
            .and_then(|i| u32::try_from(i).ok())
            .filter(|&i| i > 0)?;
        let salt = BASE64.decode(salt).ok().filter(|salt| !salt.is_empty())?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }

    /// A verifier for `password` with a random 16-byte salt and [`SCRAM_DEFAULT_ITERATIONS`],
    /// made by postgres-protocol, which SASLpreps the password exactly as PostgreSQL does.
    pub fn from_password(password: &str) -> ScramVerifier {
        let encoded = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramVerifier::parse(&encoded).unwrap_or_else(|| {
            // postgres-protocol writes exactly the format `parse` reads; this is a safety net.
            let salt: [u8; 16] = rand::random();
            ScramVerifier::from_password_with(password, &salt, SCRAM_DEFAULT_ITERATIONS)
        })
    }

    /// A verifier with the given salt and iteration count (0 counts as 1); deterministic, for
    /// tests. Exact for ASCII passwords, which SASLprep leaves alone. Other text is hashed as its
    /// UTF-8 bytes without SASLprep (that needs Unicode tables this crate does not carry), which
    /// matches PostgreSQL only where SASLprep changes nothing, e.g. NFC text without non-ASCII
    /// spaces or soft hyphens. Verifiers for real passwords come from
    /// [`from_password`](Self::from_password).
    pub fn from_password_with(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let iterations = iterations.max(1);
        let (client_key, server_key) = password_keys(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key,
        }
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256, server side
// ---------------------------------------------------------------------------------------------

/// A failed SCRAM exchange. On the server side the client caused it; on the client side, the
/// server. Messages never quote a nonce, proof or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding (p=) was requested, but only SCRAM-SHA-256 without channel binding is offered")]
    ChannelBindingUnsupported,
    #[error("SCRAM channel binding data does not match the gs2 header of the first message")]
    ChannelBindingMismatch,
    #[error("SCRAM feature not supported: {0}")]
    Unsupported(&'static str),
    #[error("SCRAM nonce does not match the nonce of this exchange")]
    NonceMismatch,
    #[error("SCRAM iteration count {0} is outside the accepted range 1..={max}", max = SCRAM_MAX_ITERATIONS)]
    IterationCount(u64),
    #[error("SCRAM proof is wrong: the client does not know the password")]
    WrongProof,
    #[error("SCRAM server signature is wrong: the server does not hold the verifier")]
    WrongServerSignature,
    #[error("server refused SCRAM authentication: {0}")]
    ServerRejected(String),
    #[error("SCRAM message arrived out of order")]
    OutOfOrder,
}

/// The server side of one SCRAM-SHA-256 exchange (RFC 5802/7677 as PostgreSQL does it): feed it
/// the client's two messages and send back what it returns. Channel binding is not offered, so
/// a gs2 header of `n,,` or `y,,` is accepted and `p=` is refused. To keep unknown users from
/// being told apart from wrong passwords, run the same exchange for them against a verifier of a
/// random password: it ends in [`ScramError::WrongProof`] like a wrong password does.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ServerState,
}

enum ServerState {
    AwaitingClientFirst,
    AwaitingClientFinal {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    Verified {
        client_key: [u8; 32],
    },
    Failed,
}

impl ScramServer {
    pub fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer::with_nonce(verifier, random_nonce())
    }

    fn with_nonce(verifier: ScramVerifier, server_nonce: String) -> ScramServer {
        ScramServer {
            verifier,
            server_nonce,
            state: ServerState::AwaitingClientFirst,
        }
    }

    /// Takes the client-first-message (the SASLInitialResponse data) and returns the
    /// server-first-message `r=...,s=...,i=...`. The username in it is ignored: PostgreSQL clients
    /// send it empty, the user comes from the startup packet.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ServerState::AwaitingClientFirst) {
            return Err(ScramError::OutOfOrder);
        }
        self.state = ServerState::Failed;
        let first = ClientFirst::parse(msg)?;
        let nonce = format!("{}{}", first.nonce, self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = ServerState::AwaitingClientFinal {
            gs2_header: first.gs2_header,
            client_first_bare: first.bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(reply)
    }

    /// Takes the client-final-message, checks channel binding, nonce and proof, and returns the
    /// server-final-message `v=...` to send with AuthenticationSASLFinal.
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let (gs2_header, client_first_bare, server_first, nonce) =
            match mem::replace(&mut self.state, ServerState::Failed) {
                ServerState::AwaitingClientFinal {
                    gs2_header,
                    client_first_bare,
                    server_first,
                    nonce,
                } => (gs2_header, client_first_bare, server_first, nonce),
                other => {
                    self.state = other;
                    return Err(ScramError::OutOfOrder);
                }
            };
        let last = ClientFinal::parse(msg)?;
        if last.channel_binding != gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if last.nonce != nonce {
            return Err(ScramError::NonceMismatch);
        }
        let auth_message = format!("{client_first_bare},{server_first},{}", last.without_proof);
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor(&last.proof, &client_signature);
        if !ct_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        self.state = ServerState::Verified { client_key };
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }

    /// The client's ClientKey, recovered from its proof once [`client_final`](Self::client_final)
    /// has verified it. With the verifier's ServerKey it logs in to a server that has the same
    /// verifier, without the password (see [`ServerCredential::ScramKeys`]).
    pub fn client_key(&self) -> Option<[u8; 32]> {
        match self.state {
            ServerState::Verified { client_key } => Some(client_key),
            _ => None,
        }
    }

    /// [`client_key`](Self::client_key) paired with the verifier's ServerKey, ready for
    /// [`ScramClient`].
    pub fn server_credential(&self) -> Option<ServerCredential> {
        self.client_key()
            .map(|client_key| ServerCredential::ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            })
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ServerState::AwaitingClientFirst => "AwaitingClientFirst",
            ServerState::AwaitingClientFinal { .. } => "AwaitingClientFinal",
            ServerState::Verified { .. } => "Verified",
            ServerState::Failed => "Failed",
        };
        f.debug_struct("ScramServer")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

struct ClientFirst<'a> {
    gs2_header: String,
    bare: &'a str,
    nonce: &'a str,
}

impl<'a> ClientFirst<'a> {
    /// gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce ["," extensions]
    fn parse(msg: &'a [u8]) -> Result<ClientFirst<'a>, ScramError> {
        let text = utf8(msg)?;
        let (cbind_flag, rest) = text.split_once(',').ok_or(ScramError::Malformed(
            "client-first-message has no gs2 header",
        ))?;
        match cbind_flag {
            "n" | "y" => {}
            flag if flag.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
            _ => {
                return Err(ScramError::Malformed(
                    "unknown channel binding flag in gs2 header",
                ))
            }
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header is not closed by a comma"))?;
        if authzid.starts_with("a=") {
            return Err(ScramError::Unsupported("authorization identity (a=)"));
        }
        if !authzid.is_empty() {
            return Err(ScramError::Malformed("unknown field in gs2 header"));
        }
        let mut attrs = bare.split(',');
        match attrs.next() {
            Some(user) if user.starts_with("n=") => {}
            Some(mext) if mext.starts_with("m=") => {
                return Err(ScramError::Unsupported("mandatory extension (m=)"))
            }
            _ => {
                return Err(ScramError::Malformed(
                    "client-first-message has no username (n=)",
                ))
            }
        }
        let nonce = attrs
            .next()
            .and_then(|attr| attr.strip_prefix("r="))
            .ok_or(ScramError::Malformed(
                "client-first-message has no nonce (r=)",
            ))?;
        if !is_nonce(nonce) {
            return Err(ScramError::Malformed(
                "client nonce is empty or not printable",
            ));
        }
        check_extensions(attrs)?;
        Ok(ClientFirst {
            gs2_header: format!("{cbind_flag},,"),
            bare,
            nonce,
        })
    }
}

struct ClientFinal<'a> {
    channel_binding: Vec<u8>,
    nonce: &'a str,
    without_proof: &'a str,
    proof: [u8; 32],
}

impl<'a> ClientFinal<'a> {
    /// channel-binding "," nonce ["," extensions] "," proof
    fn parse(msg: &'a [u8]) -> Result<ClientFinal<'a>, ScramError> {
        let text = utf8(msg)?;
        // No value may contain a comma, so the last ",p=" starts the proof, which must be last.
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(ScramError::Malformed(
            "client-final-message has no proof (p=)",
        ))?;
        let mut attrs = without_proof.split(',');
        let channel_binding = attrs
            .next()
            .and_then(|attr| attr.strip_prefix("c="))
            .ok_or(ScramError::Malformed(
                "client-final-message does not start with channel binding (c=)",
            ))?;
        let nonce = attrs
            .next()
            .and_then(|attr| attr.strip_prefix("r="))
            .ok_or(ScramError::Malformed(
                "client-final-message has no nonce (r=)",
            ))?;
        check_extensions(attrs)?;
        let channel_binding = BASE64
            .decode(channel_binding)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        let proof =
            decode_key(proof).ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
        Ok(ClientFinal {
            channel_binding,
            nonce,
            without_proof,
            proof,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// SCRAM-SHA-256, client side
// ---------------------------------------------------------------------------------------------

/// How Breakwater proves itself to a PostgreSQL server.
#[derive(Clone, PartialEq, Eq)]
pub enum ServerCredential {
    /// The password itself (from the database's `password` setting or a plaintext auth_file entry).
    Password(String),
    /// ClientKey recovered by [`ScramServer::client_key`] plus the verifier's ServerKey: enough for
    /// SCRAM against a server whose verifier is the same one, as PgBouncer does; never for md5.
    ScramKeys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// md5(password || user), as `pg_shadow` keeps it (an auth_query result): enough to answer
    /// a server's md5 challenge, as PgBouncer does; never for SCRAM.
    Md5Hash([u8; 16]),
}

impl fmt::Debug for ServerCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerCredential::Password(_) => f.write_str("Password(<redacted>)"),
            ServerCredential::ScramKeys { .. } => f.write_str("ScramKeys(<redacted>)"),
            ServerCredential::Md5Hash(_) => f.write_str("Md5Hash(<redacted>)"),
        }
    }
}

/// The client side of one SCRAM-SHA-256 exchange with a PostgreSQL server, without channel
/// binding: send [`client_first`](Self::client_first) in SASLInitialResponse, answer
/// AuthenticationSASLContinue with [`server_first`](Self::server_first) and check
/// AuthenticationSASLFinal with [`server_final`](Self::server_final). Messages are checked here
/// as strictly as libpq does (no extensions), before any work is done for them.
pub struct ScramClient {
    nonce: String,
    client_first: Vec<u8>,
    state: ClientState,
}

enum ClientState {
    AwaitingServerFirst(Prover),
    AwaitingServerFinal(SignatureCheck),
    Done,
    Failed,
}

/// What computes the proof.
enum Prover {
    /// postgres-protocol's client: it SASLpreps the password and runs PBKDF2 as libpq does.
    Password(ScramSha256),
    Keys {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
}

enum SignatureCheck {
    Password(ScramSha256),
    Expected([u8; 32]),
}

impl ScramClient {
    pub fn new(credential: &ServerCredential) -> ScramClient {
        match credential {
            ServerCredential::Password(password) => {
                // "unsupported" is the gs2 header "n,,". postgres-protocol's "unrequested" sends
                // "y,,", which a server offering SCRAM-SHA-256-PLUS over TLS refuses as a
                // downgrade.
                let scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                let client_first = scram.message().to_vec();
                // The message is "n,,n=,r=<nonce>"; the nonce is kept to check the server's
                // against before postgres-protocol sees it (it checks too).
                let nonce = client_first
                    .strip_prefix(b"n,,n=,r=")
                    .and_then(|nonce| std::str::from_utf8(nonce).ok())
                    .unwrap_or_default()
                    .to_owned();
                ScramClient {
                    nonce,
                    client_first,
                    state: ClientState::AwaitingServerFirst(Prover::Password(scram)),
                }
            }
            ServerCredential::ScramKeys {
                client_key,
                server_key,
            } => ScramClient::with_keys(*client_key, *server_key, random_nonce()),
            // An md5 hash holds nothing SCRAM can prove; callers check first (the login refuses
            // with its own message). Keys of zeros make a proof the server refuses, never a
            // false success.
            ServerCredential::Md5Hash(_) => {
                ScramClient::with_keys([0; 32], [0; 32], random_nonce())
            }
        }
    }

    fn with_keys(client_key: [u8; 32], server_key: [u8; 32], nonce: String) -> ScramClient {
        ScramClient {
            client_first: format!("n,,n=,r={nonce}").into_bytes(),
            nonce,
            state: ClientState::AwaitingServerFirst(Prover::Keys {
                client_key,
                server_key,
            }),
        }
    }

    /// The client-first-message `n,,n=,r=<nonce>`; the server takes the user from the startup
    /// packet, so the username is left empty as libpq does.
    pub fn client_first(&self) -> Vec<u8> {
        self.client_first.clone()
    }

    /// Takes the server-first-message and returns the client-final-message with the proof. With a
    /// password this runs PBKDF2 with the server's salt and iteration count, so the count is
    /// capped at [`SCRAM_MAX_ITERATIONS`]; [`ServerCredential::ScramKeys`] need neither.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, ScramError> {
        let prover = match mem::replace(&mut self.state, ClientState::Failed) {
            ClientState::AwaitingServerFirst(prover) => prover,
            other => {
                self.state = other;
                return Err(ScramError::OutOfOrder);
            }
        };
        let first = ServerFirst::parse(msg)?;
        // The server must extend our nonce, not replace it: that is what ties its answer to us.
        if first.nonce.len() <= self.nonce.len() || !first.nonce.starts_with(&self.nonce) {
            return Err(ScramError::NonceMismatch);
        }
        if first.iterations == 0 {
            return Err(ScramError::IterationCount(first.iterations));
        }
        match prover {
            Prover::Password(mut scram) => {
                if first.iterations > u64::from(SCRAM_MAX_ITERATIONS) {
                    return Err(ScramError::IterationCount(first.iterations));
                }
                scram.update(msg).map_err(|_| {
                    ScramError::Malformed("server-first-message refused by postgres-protocol")
                })?;
                let reply = scram.message().to_vec();
                self.state = ClientState::AwaitingServerFinal(SignatureCheck::Password(scram));
                Ok(reply)
            }
            Prover::Keys {
                client_key,
                server_key,
            } => {
                // c=biws is base64("n,,"): no channel binding.
                let without_proof = format!("c=biws,r={}", first.nonce);
                let auth_message = format!("n=,r={},{},{without_proof}", self.nonce, first.text);
                let client_signature = hmac(&sha256(&client_key), auth_message.as_bytes());
                let proof = xor(&client_key, &client_signature);
                self.state = ClientState::AwaitingServerFinal(SignatureCheck::Expected(hmac(
                    &server_key,
                    auth_message.as_bytes(),
                )));
                Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
            }
        }
    }

    /// Takes the server-final-message and checks that the server knew the verifier too.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), ScramError> {
        let check = match mem::replace(&mut self.state, ClientState::Failed) {
            ClientState::AwaitingServerFinal(check) => check,
            other => {
                self.state = other;
                return Err(ScramError::OutOfOrder);
            }
        };
        let signature = parse_server_final(msg)?;
        let verified = match check {
            SignatureCheck::Password(mut scram) => scram.finish(msg).is_ok(),
            SignatureCheck::Expected(expected) => ct_eq(&signature, &expected),
        };
        if !verified {
            return Err(ScramError::WrongServerSignature);
        }
        self.state = ClientState::Done;
        Ok(())
    }
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ClientState::AwaitingServerFirst(_) => "AwaitingServerFirst",
            ClientState::AwaitingServerFinal(_) => "AwaitingServerFinal",
            ClientState::Done => "Done",
            ClientState::Failed => "Failed",
        };
        f.debug_struct("ScramClient")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

struct ServerFirst<'a> {
    text: &'a str,
    nonce: &'a str,
    iterations: u64,
}

impl<'a> ServerFirst<'a> {
    /// nonce "," salt "," iteration-count, and nothing else: PostgreSQL sends no extensions.
    fn parse(msg: &'a [u8]) -> Result<ServerFirst<'a>, ScramError> {
        let text = utf8(msg)?;
        let mut attrs = text.split(',');
        let nonce = match attrs.next() {
            Some(mext) if mext.starts_with("m=") => {
                return Err(ScramError::Unsupported("mandatory extension (m=)"))
            }
            first => {
                first
                    .and_then(|attr| attr.strip_prefix("r="))
                    .ok_or(ScramError::Malformed(
                        "server-first-message has no nonce (r=)",
                    ))?
            }
        };
        let salt = attrs
            .next()
            .and_then(|attr| attr.strip_prefix("s="))
            .ok_or(ScramError::Malformed(
                "server-first-message has no salt (s=)",
            ))?;
        let iterations = attrs
            .next()
            .and_then(|attr| attr.strip_prefix("i="))
            .ok_or(ScramError::Malformed(
                "server-first-message has no iteration count (i=)",
            ))?;
        if attrs.next().is_some() {
            return Err(ScramError::Malformed(
                "server-first-message has data after the iteration count",
            ));
        }
        if !is_nonce(nonce) {
            return Err(ScramError::Malformed(
                "server nonce is empty or not printable",
            ));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("salt is empty"));
        }
        let iterations = parse_decimal(iterations)
            .ok_or(ScramError::Malformed("iteration count is not a number"))?;
        Ok(ServerFirst {
            text,
            nonce,
            iterations,
        })
    }
}

/// `v=<ServerSignature>` or `e=<error>`, and nothing else: PostgreSQL sends no extensions.
fn parse_server_final(msg: &[u8]) -> Result<[u8; 32], ScramError> {
    let text = utf8(msg)?;
    if let Some(reason) = text.strip_prefix("e=") {
        return Err(ScramError::ServerRejected(reason.to_owned()));
    }
    let signature = text.strip_prefix("v=").ok_or(ScramError::Malformed(
        "server-final-message has neither a signature (v=) nor an error (e=)",
    ))?;
    decode_key(signature).ok_or(ScramError::Malformed(
        "server signature is not 32 bytes of base64",
    ))
}

// ---------------------------------------------------------------------------------------------
// md5
// ---------------------------------------------------------------------------------------------

/// A random salt for AuthenticationMD5Password.
pub fn md5_salt() -> [u8; 4] {
    rand::random()
}

/// Checks a client's PasswordMessage answer to an md5 challenge: `"md5"` followed by
/// hex(md5(hex(md5(password || user)) || salt)), with or without its trailing NUL. Works with a
/// plaintext or md5 secret. Always false for a SCRAM verifier, which holds nothing md5 can be
/// computed from (such users need SCRAM), and for an empty password.
pub fn md5_verify(user: &str, secret: &Secret, salt: [u8; 4], response: &[u8]) -> bool {
    let response = response.strip_suffix(b"\0").unwrap_or(response);
    let password_hash = match secret {
        Secret::Plain(password) if password.is_empty() => return false,
        Secret::Plain(password) => md5_password_hash(user, password),
        Secret::Md5(hash) => *hash,
        Secret::Scram(_) => return false,
    };
    ct_eq(&md5_salted_response(&password_hash, salt), response)
}

/// The PasswordMessage answer to a server's md5 challenge, without the NUL terminator the framing
/// adds.
pub fn md5_password_response(user: &str, password: &str, salt: [u8; 4]) -> Vec<u8> {
    md5_salted_response(&md5_password_hash(user, password), salt)
}

/// The same answer from the stored hash md5(password || user) instead of the password.
pub fn md5_hash_response(password_hash: &[u8; 16], salt: [u8; 4]) -> Vec<u8> {
    md5_salted_response(password_hash, salt)
}

fn md5_password_hash(user: &str, password: &str) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(password.as_bytes());
    md5.update(user.as_bytes());
    md5.finalize().into()
}

fn md5_salted_response(password_hash: &[u8; 16], salt: [u8; 4]) -> Vec<u8> {
    let mut md5 = Md5::new();
    md5.update(hex(password_hash));
    md5.update(salt);
    let digest: [u8; 16] = md5.finalize().into();
    let mut response = b"md5".to_vec();
    response.extend_from_slice(&hex(&digest));
    response
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// ClientKey and ServerKey of a password, as RFC 5802 derives them through SaltedPassword, with no
/// SASLprep (see [`ScramVerifier::from_password_with`]).
fn password_keys(password: &str, salt: &[u8], iterations: u32) -> ([u8; 32], [u8; 32]) {
    let salted_password = hi(password.as_bytes(), salt, iterations);
    (
        hmac(&salted_password, b"Client Key"),
        hmac(&salted_password, b"Server Key"),
    )
}

/// Hi() of RFC 5802: PBKDF2-HMAC-SHA-256 with one output block (the `pbkdf2` crate, so the
/// security code to audit is RustCrypto's, not ours).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password, salt, iterations)
}

// HMAC hashes or pads the key to the block size, so every length is valid: this cannot fail.
#[allow(clippy::expect_used)]
fn hmac_with_key(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = hmac_with_key(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = *a;
    for (o, b) in out.iter_mut().zip(b) {
        *o ^= b;
    }
    out
}

/// Compares in constant time (`subtle`), so timing does not say how much of a guess was right.
/// The length is not secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn random_nonce() -> String {
    BASE64.encode(rand::random::<[u8; SCRAM_NONCE_LEN]>())
}

fn utf8(msg: &[u8]) -> Result<&str, ScramError> {
    std::str::from_utf8(msg).map_err(|_| ScramError::Malformed("message is not UTF-8"))
}

/// printable = %x21-2B / %x2D-7E: visible ASCII except the comma.
fn is_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, 0x21..=0x2b | 0x2d..=0x7e))
}

/// Extensions are `ALPHA "=" 1*value-char`; unknown ones are ignored as RFC 5802 says, but they
/// must have that form.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), ScramError> {
    for attr in attrs {
        let mut bytes = attr.bytes();
        let well_formed = matches!(
            (bytes.next(), bytes.next(), bytes.next()),
            (Some(name), Some(b'='), Some(_)) if name.is_ascii_alphabetic()
        );
        if !well_formed {
            return Err(ScramError::Malformed(
                "attribute is not of the form x=value",
            ));
        }
    }
    Ok(())
}

fn decode_key(b64: &str) -> Option<[u8; 32]> {
    BASE64.decode(b64).ok()?.try_into().ok()
}

/// ASCII digits only (no sign, no spaces), as PostgreSQL writes them.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn decode_hex16(hex: &str) -> Option<[u8; 16]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
        if let [hi, lo] = *pair {
            *byte = (nibble(hi)? << 4) | nibble(lo)?;
        }
    }
    Some(out)
}

fn hex(bytes: &[u8; 16]) -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        let digit = |nibble: u8| DIGITS.get(usize::from(nibble)).copied().unwrap_or(b'0');
        pair.copy_from_slice(&[digit(byte >> 4), digit(byte & 0x0f)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const PG_VERIFIER_PENCIL: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
        WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    fn exchange(client: &mut ScramClient, server: &mut ScramServer) -> Result<(), ScramError> {
        let server_first = server.client_first(&client.client_first())?;
        let client_final = client.server_first(&server_first)?;
        let server_final = server.client_final(&client_final)?;
        client.server_final(&server_final)
    }

    fn pg_client_exchange(
        password: &str,
        channel_binding: ChannelBinding,
        server: &mut ScramServer,
    ) -> Result<(), String> {
        let mut client = ScramSha256::new(password.as_bytes(), channel_binding);
        let server_first = server
            .client_first(client.message())
            .map_err(|e| e.to_string())?;
        client.update(&server_first).map_err(|e| e.to_string())?;
        let server_final = server
            .client_final(client.message())
            .map_err(|e| e.to_string())?;
        client.finish(&server_final).map_err(|e| e.to_string())
    }

    /// A server that has seen a valid client-first message from a client with nonce "cnonce".
    fn server_after_client_first(password: &str) -> ScramServer {
        let verifier = ScramVerifier::from_password_with(password, b"salt", 1);
        let mut server = ScramServer::with_nonce(verifier, "snonce".to_owned());
        server
            .client_first(b"n,,n=,r=cnonce")
            .expect("valid client-first");
        server
    }

    /// A client that sends nonce "cnonce" and proves with the keys `password` gives for a
    /// verifier from `from_password_with(password, b"salt", 1)`.
    fn keys_client(password: &str) -> ScramClient {
        let (client_key, server_key) = password_keys(password, b"salt", 1);
        ScramClient::with_keys(client_key, server_key, "cnonce".into())
    }

    /// The client-final message a client with `password` sends to `server_after_client_first`.
    fn client_final_for(password: &str) -> String {
        let mut client = keys_client(password);
        let server_first = format!("r=cnoncesnonce,s={},i=1", BASE64.encode(b"salt"));
        String::from_utf8(client.server_first(server_first.as_bytes()).unwrap()).unwrap()
    }

    /// A client and the server-final message that completes its exchange, for each way to prove.
    fn clients_awaiting_server_final() -> Vec<(ScramClient, String)> {
        let (client_key, server_key) = password_keys("pw", b"salt", 1);
        let credentials = [
            ServerCredential::Password("pw".into()),
            ServerCredential::ScramKeys {
                client_key,
                server_key,
            },
        ];
        credentials
            .iter()
            .map(|credential| {
                let mut client = ScramClient::new(credential);
                let mut server =
                    ScramServer::new(ScramVerifier::from_password_with("pw", b"salt", 1));
                let server_first = server.client_first(&client.client_first()).unwrap();
                let client_final = client.server_first(&server_first).unwrap();
                let server_final = server.client_final(&client_final).unwrap();
                (client, String::from_utf8(server_final).unwrap())
            })
            .collect()
    }

    // --- auth_file -------------------------------------------------------------------------

    #[test]
    fn userlist_reads_each_secret_kind_and_quoting() {
        let md5 = postgres_protocol::password::md5(b"md5_pw", "md5user");
        let verifier = ScramVerifier::parse(PG_VERIFIER_PENCIL).unwrap();
        let cases: &[(&str, &str, Secret)] = &[
            (
                r#""alice" "secret""#,
                "alice",
                Secret::Plain("secret".into()),
            ),
            (
                r#""bo""b" "pa""ss""""#,
                "bo\"b",
                Secret::Plain("pa\"ss\"".into()),
            ),
            ("\t\"tab\"\t\"sep\"\t", "tab", Secret::Plain("sep".into())),
            (
                r#""spaces in" "pass word""#,
                "spaces in",
                Secret::Plain("pass word".into()),
            ),
            (r#""nopass" """#, "nopass", Secret::Plain(String::new())),
            (r#""u" "p" trailing "junk""#, "u", Secret::Plain("p".into())),
            (r#""ünï" "cödé""#, "ünï", Secret::Plain("cödé".into())),
            (
                &format!(r#""md5user" "{md5}""#),
                "md5user",
                Secret::Md5(md5_password_hash("md5user", "md5_pw")),
            ),
            (
                r#""upper" "md5B1116845021429C9CD5C0C6BB22019DE""#,
                "upper",
                Secret::Md5(md5_password_hash("md5user", "md5_pw")),
            ),
            (
                &format!(r#""scram" "{PG_VERIFIER_PENCIL}""#),
                "scram",
                Secret::Scram(verifier),
            ),
        ];
        for (text, user, want) in cases {
            let list = Userlist::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(list.len(), 1, "{text}");
            assert_eq!(list.get(user), Some(want), "{text}");
        }
    }

    #[test]
    fn userlist_skips_comments_blank_lines_and_windows_line_ends() {
        let text =
            "; pgbouncer comment\r\n# hash comment\r\n\r\n   \r\n  \"a\" \"1\"\r\n\"b\" \"2\"\n";
        let list = Userlist::parse(text).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.get("a"), Some(&Secret::Plain("1".into())));
        assert_eq!(list.get("b"), Some(&Secret::Plain("2".into())));
        assert_eq!(list.get("c"), None);
        assert!(Userlist::parse("").unwrap().is_empty());
        assert!(Userlist::parse("; only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn userlist_last_entry_for_a_user_wins() {
        let list = Userlist::parse("\"a\" \"old\"\n\"a\" \"new\"\n").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list.get("a"), Some(&Secret::Plain("new".into())));
    }

    #[test]
    fn userlist_reports_bad_lines_with_their_line_number() {
        let syntax = |line, problem| UserlistError::Syntax { line, problem };
        let bad_md5 = |line| UserlistError::BadMd5 {
            line,
            user: "u".into(),
        };
        let bad_scram = |line| UserlistError::BadScram {
            line,
            user: "u".into(),
        };
        let cases: &[(&str, UserlistError)] = &[
            (
                "alice \"x\"",
                syntax(1, "line does not start with a double-quoted username"),
            ),
            ("\"alice", syntax(1, "username has no closing double quote")),
            ("\"al\"\"ice\" ", syntax(1, "password is missing after the username")),
            (
                "\"alice\" x",
                syntax(1, "expected a double-quoted password after the username"),
            ),
            ("\"alice\" \"x", syntax(1, "password has no closing double quote")),
            ("\"alice\" \"x\"\"", syntax(1, "password has no closing double quote")),
            ("\"\" \"x\"", syntax(1, "username is empty")),
            (
                "; comment\n\n\"ok\" \"1\"\n  bad",
                syntax(4, "line does not start with a double-quoted username"),
            ),
            ("\"u\" \"md5\"", bad_md5(1)),
            ("\"u\" \"md5abc\"", bad_md5(1)),
            ("\"u\" \"md5b1116845021429c9cd5c0c6bb22019dg\"", bad_md5(1)),
            ("\"u\" \"md5b1116845021429c9cd5c0c6bb22019de0\"", bad_md5(1)),
            ("\n\"ok\" \"1\"\n\"u\" \"md5 b1116845021429c9cd5c0c6bb22019d\"", bad_md5(3)),
            ("\"u\" \"SCRAM-SHA-256$\"", bad_scram(1)),
            ("\"u\" \"SCRAM-SHA-256$4096:xx$yy:zz\"", bad_scram(1)),
            ("#\n\"u\" \"SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=\"", bad_scram(2)),
        ];
        for (text, want) in cases {
            let got = Userlist::parse(text).expect_err(text);
            assert_eq!(&got, want, "{text}");
            assert_eq!(got.line(), want.line());
        }
        let message = Userlist::parse("\"ok\" \"1\"\n\"u\" \"md5abc\"")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 2") && message.contains("\"u\""),
            "{message}"
        );
        assert!(
            !message.contains("md5abc"),
            "the error must not quote the password: {message}"
        );
    }

    #[test]
    fn debug_output_never_shows_passwords_or_keys() {
        let list = Userlist::parse(&format!(
            "\"alice\" \"hunter2\"\n\"bob\" \"{PG_VERIFIER_PENCIL}\"\n\"carol\" \"md5b1116845021429c9cd5c0c6bb22019de\""
        ))
        .unwrap();
        let shown = format!(
            "{list:?} {:?} {:?} {:?} {:?}",
            list.get("alice"),
            list.get("bob"),
            list.get("carol"),
            ServerCredential::Password("hunter2".into()),
        );
        for secret in ["hunter2", "WG5d8", "wfPLw", "b111", "W22Za"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("alice"), "{shown}");
    }

    // --- SCRAM verifier -------------------------------------------------------------------

    #[test]
    fn scram_verifier_parse_accepts_postgres_format_and_rejects_the_rest() {
        let parsed = ScramVerifier::parse(PG_VERIFIER_PENCIL).unwrap();
        assert_eq!(parsed.iterations, 4096);
        assert_eq!(BASE64.encode(&parsed.salt), "W22ZaJ0SNY7soEsUEjb6gQ==");
        assert_eq!(
            parsed,
            ScramVerifier::from_password_with("pencil", &parsed.salt, 4096)
        );

        let (stored, server) = (
            "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=",
            "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=",
        );
        let bad = [
            String::new(),
            "SCRAM-SHA-256".into(),
            format!("SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$-1:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$+9:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$4294967296:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$x:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:not*base64${stored}:{server}"),
            format!("SCRAM-SHA-256$4096W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${stored}"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}$"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:{server}:"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${stored}:c2hvcnQ="),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$:{server}"),
        ];
        for text in &bad {
            assert_eq!(ScramVerifier::parse(text), None, "{text}");
        }
    }

    #[test]
    fn from_password_with_matches_postgres_protocol_where_saslprep_changes_nothing() {
        // The tab is prohibited by SASLprep, so PostgreSQL too uses the raw bytes.
        for password in ["pencil", "tab\there", "", "pässwörd", "密码"] {
            let from_pg = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
                password.as_bytes(),
            ))
            .unwrap();
            assert_eq!(from_pg.iterations, SCRAM_DEFAULT_ITERATIONS);
            let ours =
                ScramVerifier::from_password_with(password, &from_pg.salt, from_pg.iterations);
            assert_eq!(ours, from_pg, "{password:?}");
        }
    }

    #[test]
    fn from_password_uses_a_fresh_salt_and_default_iterations() {
        let a = ScramVerifier::from_password("pw");
        let b = ScramVerifier::from_password("pw");
        assert_eq!(a.iterations, SCRAM_DEFAULT_ITERATIONS);
        assert_eq!(a.salt.len(), 16);
        assert_ne!(a.salt, b.salt);
        assert_eq!(
            a,
            ScramVerifier::from_password_with("pw", &a.salt, a.iterations)
        );
        assert_eq!(
            ScramVerifier::from_password_with("pw", b"s", 0).iterations,
            1
        );
    }

    #[test]
    fn secret_gives_a_scram_verifier_only_when_scram_can_work() {
        let plain = Secret::Plain("pw".into()).scram_verifier().unwrap();
        assert_eq!(
            plain,
            ScramVerifier::from_password_with("pw", &plain.salt, 4096)
        );
        let stored = ScramVerifier::parse(PG_VERIFIER_PENCIL).unwrap();
        assert_eq!(Secret::Scram(stored.clone()).scram_verifier(), Some(stored));
        assert_eq!(Secret::Plain(String::new()).scram_verifier(), None);
        assert_eq!(Secret::Md5([0; 16]).scram_verifier(), None);
    }

    // --- SCRAM exchanges ------------------------------------------------------------------

    #[test]
    fn scram_server_matches_the_rfc7677_test_vector() {
        let verifier = ScramVerifier::parse(PG_VERIFIER_PENCIL).unwrap();
        let mut server = ScramServer::with_nonce(verifier, "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let server_first = server
            .client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(
            server_first,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let server_final = server
            .client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .unwrap();
        assert_eq!(
            server_final,
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let (client_key, _) = password_keys(
            "pencil",
            &BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        );
        assert_eq!(server.client_key(), Some(client_key));
    }

    #[test]
    fn scram_client_first_has_no_channel_binding_no_username_and_a_fresh_nonce() {
        let credentials = [
            ServerCredential::Password("pw".into()),
            ServerCredential::ScramKeys {
                client_key: [1; 32],
                server_key: [2; 32],
            },
        ];
        for credential in &credentials {
            let a = ScramClient::new(credential);
            let b = ScramClient::new(credential);
            let first = String::from_utf8(a.client_first()).unwrap();
            assert_eq!(first, format!("n,,n=,r={}", a.nonce));
            assert!(a.nonce.len() >= 24 && is_nonce(&a.nonce), "{first}");
            assert_ne!(a.nonce, b.nonce);
        }
    }

    #[test]
    fn scram_exchange_with_the_right_password_succeeds_on_both_sides() {
        for password in ["secret", "pässwörd", "\u{2168}"] {
            let verifier = ScramVerifier::from_password(password);
            let mut server = ScramServer::new(verifier.clone());
            let mut client = ScramClient::new(&ServerCredential::Password(password.into()));
            exchange(&mut client, &mut server).unwrap();
            let client_key = server.client_key().unwrap();
            assert_eq!(sha256(&client_key), verifier.stored_key);
            assert_eq!(
                server.server_credential(),
                Some(ServerCredential::ScramKeys {
                    client_key,
                    server_key: verifier.server_key
                })
            );
        }
    }

    #[test]
    fn scram_exchange_with_the_wrong_password_fails_with_wrong_proof() {
        let mut server = ScramServer::new(ScramVerifier::from_password("right"));
        let mut client = ScramClient::new(&ServerCredential::Password("wrong".into()));
        assert_eq!(
            exchange(&mut client, &mut server),
            Err(ScramError::WrongProof)
        );
        assert_eq!(server.client_key(), None);
        assert_eq!(server.server_credential(), None);
        assert_eq!(
            server.client_final(b"c=biws,r=x,p=x"),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn recovered_client_key_logs_in_again_without_the_password() {
        let verifier = ScramVerifier::from_password("only-the-client-knows");
        let mut first_login = ScramServer::new(verifier.clone());
        let mut client =
            ScramClient::new(&ServerCredential::Password("only-the-client-knows".into()));
        exchange(&mut client, &mut first_login).unwrap();
        let credential = first_login.server_credential().unwrap();

        // The "PostgreSQL server" has the same verifier and a new nonce.
        let mut server = ScramServer::new(verifier.clone());
        let mut pooler = ScramClient::new(&credential);
        exchange(&mut pooler, &mut server).unwrap();
        assert_eq!(server.server_credential(), Some(credential.clone()));

        // A server with another verifier for the same password rejects the keys.
        let mut other = ScramServer::new(ScramVerifier::from_password("only-the-client-knows"));
        let mut pooler = ScramClient::new(&credential);
        assert_eq!(
            exchange(&mut pooler, &mut other),
            Err(ScramError::WrongProof)
        );
    }

    #[test]
    fn scram_client_rejects_a_server_that_does_not_know_the_verifier() {
        let verifier = ScramVerifier::from_password("pw");
        let mut server = ScramServer::new(ScramVerifier {
            server_key: [7; 32],
            ..verifier.clone()
        });
        let mut client = ScramClient::new(&ServerCredential::Password("pw".into()));
        assert_eq!(
            exchange(&mut client, &mut server),
            Err(ScramError::WrongServerSignature)
        );
    }

    #[test]
    fn postgres_protocol_client_logs_in_against_our_server() {
        let pg_verifier = postgres_protocol::password::scram_sha_256("päss".as_bytes());
        let from_pg = ScramVerifier::parse(&pg_verifier).unwrap();
        let ours = ScramVerifier::from_password("päss");
        for verifier in [from_pg, ours] {
            // unsupported sends "n,,", unrequested sends "y,,"
            for cb in [ChannelBinding::unrequested(), ChannelBinding::unsupported()] {
                let mut server = ScramServer::new(verifier.clone());
                pg_client_exchange("päss", cb, &mut server).unwrap();
                assert!(server.client_key().is_some());
            }
            let mut server = ScramServer::new(verifier.clone());
            let wrong = pg_client_exchange("pass", ChannelBinding::unrequested(), &mut server);
            assert_eq!(wrong, Err(ScramError::WrongProof.to_string()));
        }
    }

    #[test]
    fn our_client_logs_in_with_a_verifier_from_postgres_protocol() {
        for password in ["secret", "I\u{00AD}X", "tab\there"] {
            let verifier = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
                password.as_bytes(),
            ))
            .unwrap();
            let mut server = ScramServer::new(verifier);
            let mut client = ScramClient::new(&ServerCredential::Password(password.into()));
            exchange(&mut client, &mut server).unwrap();
        }
    }

    #[test]
    fn scram_server_rejects_bad_client_first_messages() {
        use ScramError::*;
        let cases: &[(&[u8], Option<ScramError>)] = &[
            (b"n,,n=,r=abc", None),
            (b"y,,n=,r=abc", None),
            (b"n,,n=someone,r=abc", None),
            (b"n,,n=,r=abc,x=ignored-extension", None),
            (
                b"p=tls-server-end-point,,n=,r=abc",
                Some(ChannelBindingUnsupported),
            ),
            (
                b"n,a=bob,n=,r=abc",
                Some(Unsupported("authorization identity (a=)")),
            ),
            (
                b"n,,m=ext,n=,r=abc",
                Some(Unsupported("mandatory extension (m=)")),
            ),
            (
                b"",
                Some(Malformed("client-first-message has no gs2 header")),
            ),
            (
                b"n",
                Some(Malformed("client-first-message has no gs2 header")),
            ),
            (
                b"n,",
                Some(Malformed("gs2 header is not closed by a comma")),
            ),
            (
                b"x,,n=,r=abc",
                Some(Malformed("unknown channel binding flag in gs2 header")),
            ),
            (
                b"n,b,n=,r=abc",
                Some(Malformed("unknown field in gs2 header")),
            ),
            (
                b"n,,r=abc",
                Some(Malformed("client-first-message has no username (n=)")),
            ),
            (
                b"n,,",
                Some(Malformed("client-first-message has no username (n=)")),
            ),
            (
                b"n,,n=",
                Some(Malformed("client-first-message has no nonce (r=)")),
            ),
            (
                b"n,,n=,x=abc",
                Some(Malformed("client-first-message has no nonce (r=)")),
            ),
            (
                b"n,,n=,r=",
                Some(Malformed("client nonce is empty or not printable")),
            ),
            (
                b"n,,n=,r=a b",
                Some(Malformed("client nonce is empty or not printable")),
            ),
            (
                b"n,,n=,r=abc,",
                Some(Malformed("attribute is not of the form x=value")),
            ),
            (
                b"n,,n=,r=abc,x=",
                Some(Malformed("attribute is not of the form x=value")),
            ),
            (
                b"n,,n=,r=abc,1=x",
                Some(Malformed("attribute is not of the form x=value")),
            ),
            (b"n,,n=,r=\xff", Some(Malformed("message is not UTF-8"))),
        ];
        for (msg, want) in cases {
            let mut server = ScramServer::new(ScramVerifier::from_password_with("pw", b"s", 1));
            let got = server.client_first(msg);
            let shown = String::from_utf8_lossy(msg);
            match want {
                None => {
                    let reply = String::from_utf8(got.unwrap()).unwrap();
                    assert!(reply.starts_with("r=abc"), "{shown}: {reply}");
                    assert!(reply.ends_with(",s=cw==,i=1"), "{shown}: {reply}");
                }
                Some(want) => assert_eq!(got.as_ref(), Err(want), "{shown}"),
            }
        }
    }

    #[test]
    fn scram_server_rejects_bad_client_final_messages() {
        use ScramError::*;
        let good = client_final_for("pw");
        let proof = good.rsplit_once(",p=").unwrap().1.to_owned();
        let short_proof = BASE64.encode([1u8; 31]);
        let cases: Vec<(String, ScramError)> = vec![
            (
                good.replace("r=cnoncesnonce", "r=cnoncesnoncX"),
                NonceMismatch,
            ),
            (good.replace("r=cnoncesnonce", "r=cnonce"), NonceMismatch),
            (good.replace("c=biws", "c=eSws"), ChannelBindingMismatch),
            (
                good.replace("c=biws", "c=*"),
                Malformed("channel binding is not base64"),
            ),
            (
                good.replace(&proof, &short_proof),
                Malformed("proof is not 32 bytes of base64"),
            ),
            (
                format!("{good},x=after-proof"),
                Malformed("proof is not 32 bytes of base64"),
            ),
            (
                format!("c=biws,r=cnoncesnonce,p={}", BASE64.encode([0u8; 32])),
                WrongProof,
            ),
            (
                format!("r=cnoncesnonce,c=biws,p={proof}"),
                Malformed("client-final-message does not start with channel binding (c=)"),
            ),
            (
                format!("c=biws,p={proof}"),
                Malformed("client-final-message has no nonce (r=)"),
            ),
            (
                format!("c=biws,r=cnoncesnonce,bad,p={proof}"),
                Malformed("attribute is not of the form x=value"),
            ),
            (
                "c=biws,r=cnoncesnonce".into(),
                Malformed("client-final-message has no proof (p=)"),
            ),
            (
                String::new(),
                Malformed("client-final-message has no proof (p=)"),
            ),
        ];
        for (msg, want) in cases {
            let mut server = server_after_client_first("pw");
            assert_eq!(server.client_final(msg.as_bytes()), Err(want), "{msg}");
            assert_eq!(server.client_key(), None);
        }
        // Unknown extensions before the proof are ignored; the proof covers them.
        let mut server = server_after_client_first("pw");
        assert!(server.client_final(good.as_bytes()).is_ok());
    }

    #[test]
    fn scram_client_with_y_header_must_send_matching_channel_binding() {
        let mut server = ScramServer::with_nonce(
            ScramVerifier::from_password_with("pw", b"salt", 1),
            "snonce".into(),
        );
        server.client_first(b"y,,n=,r=cnonce").unwrap();
        // Our client always sends c=biws ("n,,"), which does not match a "y,," header.
        let msg = client_final_for("pw");
        assert_eq!(
            server.client_final(msg.as_bytes()),
            Err(ScramError::ChannelBindingMismatch)
        );
    }

    #[test]
    fn scram_steps_out_of_order_are_errors() {
        let mut server = ScramServer::new(ScramVerifier::from_password_with("pw", b"s", 1));
        assert_eq!(
            server.client_final(b"c=biws,r=a,p=b"),
            Err(ScramError::OutOfOrder)
        );
        server.client_first(b"n,,n=,r=abc").unwrap();
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );

        let mut client = ScramClient::new(&ServerCredential::Password("pw".into()));
        assert_eq!(client.server_final(b"v=x"), Err(ScramError::OutOfOrder));
        let mut server = ScramServer::new(ScramVerifier::from_password_with("pw", b"s", 1));
        exchange(&mut client, &mut server).unwrap();
        assert_eq!(
            client.server_first(b"r=x,s=eA==,i=1"),
            Err(ScramError::OutOfOrder)
        );
        assert_eq!(client.server_final(b"v=x"), Err(ScramError::OutOfOrder));
        assert_eq!(
            server.client_final(b"c=biws,r=a,p=b"),
            Err(ScramError::OutOfOrder)
        );
        assert!(
            server.client_key().is_some(),
            "a late call must not lose the result"
        );
    }

    #[test]
    fn scram_client_rejects_bad_server_first_messages() {
        use ScramError::*;
        let password = ServerCredential::Password("pw".into());
        let keys = ServerCredential::ScramKeys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        let cases: &[(&ServerCredential, &str, Option<ScramError>)] = &[
            (&password, "r=cnonceS,s=c2FsdA==,i=4096", None),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=4096,x=ext",
                Some(Malformed(
                    "server-first-message has data after the iteration count",
                )),
            ),
            (&keys, "r=cnonceS,s=c2FsdA==,i=4294967295", None),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=0",
                Some(IterationCount(0)),
            ),
            (&keys, "r=cnonceS,s=c2FsdA==,i=0", Some(IterationCount(0))),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=100001",
                Some(IterationCount(100_001)),
            ),
            (&keys, "r=cnonceS,s=c2FsdA==,i=100001", None),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=99999999999",
                Some(IterationCount(99_999_999_999)),
            ),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=99999999999999999999999",
                Some(Malformed("iteration count is not a number")),
            ),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=-1",
                Some(Malformed("iteration count is not a number")),
            ),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=",
                Some(Malformed("iteration count is not a number")),
            ),
            (
                &password,
                "r=XnonceS,s=c2FsdA==,i=4096",
                Some(NonceMismatch),
            ),
            (&password, "r=cnonce,s=c2FsdA==,i=4096", Some(NonceMismatch)),
            (&password, "r=cnon,s=c2FsdA==,i=4096", Some(NonceMismatch)),
            (
                &password,
                "r=,s=c2FsdA==,i=4096",
                Some(Malformed("server nonce is empty or not printable")),
            ),
            (
                &password,
                "r=cnonce\u{7f},s=c2FsdA==,i=4096",
                Some(Malformed("server nonce is empty or not printable")),
            ),
            (
                &password,
                "r=cnonceS,s=,i=4096",
                Some(Malformed("salt is empty")),
            ),
            (
                &password,
                "r=cnonceS,s=***,i=4096",
                Some(Malformed("salt is not base64")),
            ),
            (
                &password,
                "r=cnonceS,i=4096",
                Some(Malformed("server-first-message has no salt (s=)")),
            ),
            (
                &password,
                "r=cnonceS,s=c2FsdA==",
                Some(Malformed(
                    "server-first-message has no iteration count (i=)",
                )),
            ),
            (
                &password,
                "s=c2FsdA==,r=cnonceS,i=4096",
                Some(Malformed("server-first-message has no nonce (r=)")),
            ),
            (
                &password,
                "",
                Some(Malformed("server-first-message has no nonce (r=)")),
            ),
            (
                &password,
                "m=x,r=cnonceS,s=c2FsdA==,i=4096",
                Some(Unsupported("mandatory extension (m=)")),
            ),
            (
                &password,
                "r=cnonceS,s=c2FsdA==,i=4096,",
                Some(Malformed(
                    "server-first-message has data after the iteration count",
                )),
            ),
        ];
        for (credential, msg, want) in cases {
            let mut client = ScramClient::new(credential);
            let msg = msg.replace("cnonce", &client.nonce);
            let got = client.server_first(msg.as_bytes());
            match want {
                None => assert!(got.is_ok(), "{msg}: {got:?}"),
                Some(want) => assert_eq!(got.as_ref(), Err(want), "{msg}"),
            }
        }
    }

    #[test]
    fn scram_client_rejects_bad_server_final_messages() {
        use ScramError::*;
        // GOOD stands for the server-final message that completes the exchange.
        let other_signature = format!("v={}", BASE64.encode([9u8; 32]));
        let cases: Vec<(&str, Result<(), ScramError>)> = vec![
            ("GOOD", Ok(())),
            (
                "e=invalid-proof",
                Err(ServerRejected("invalid-proof".into())),
            ),
            (&other_signature, Err(WrongServerSignature)),
            (
                "GOOD,x=ext",
                Err(Malformed("server signature is not 32 bytes of base64")),
            ),
            (
                "v=abc",
                Err(Malformed("server signature is not 32 bytes of base64")),
            ),
            (
                "",
                Err(Malformed(
                    "server-final-message has neither a signature (v=) nor an error (e=)",
                )),
            ),
        ];
        for (template, want) in &cases {
            for (mut client, good) in clients_awaiting_server_final() {
                let msg = template.replace("GOOD", &good);
                assert_eq!(&client.server_final(msg.as_bytes()), want, "{msg}");
            }
        }
    }

    #[test]
    fn truncated_or_corrupted_messages_are_errors_not_panics() {
        let first = b"n,,n=,r=cnonce".to_vec();
        let last = client_final_for("pw").into_bytes();
        let server_first = b"r=cnonceS,s=c2FsdA==,i=1".to_vec();
        let corruptions = |msg: &[u8]| {
            let mut out = Vec::new();
            for i in 0..=msg.len() {
                out.push(msg[..i].to_vec());
                for b in [0u8, b',', b'=', 0xff, b'p'] {
                    let mut m = msg.to_vec();
                    if i < m.len() {
                        m[i] = b;
                        out.push(m);
                    }
                }
            }
            out
        };
        for msg in corruptions(&first) {
            let _ = ScramServer::new(ScramVerifier::from_password_with("pw", b"s", 1))
                .client_first(&msg);
        }
        for msg in corruptions(&last) {
            let _ = server_after_client_first("pw").client_final(&msg);
        }
        for msg in corruptions(&server_first) {
            let _ = keys_client("pw").server_first(&msg);
            let mut client = ScramClient::new(&ServerCredential::Password("pw".into()));
            let msg = String::from_utf8_lossy(&msg).replace("cnonce", &client.nonce);
            let _ = client.server_first(msg.as_bytes());
        }
        for (_, good) in clients_awaiting_server_final() {
            for msg in corruptions(good.as_bytes()) {
                for (mut client, _) in clients_awaiting_server_final() {
                    let _ = client.server_final(&msg);
                }
            }
        }
    }

    // --- md5 ------------------------------------------------------------------------------

    #[test]
    fn md5_verify_accepts_known_vectors() {
        let plain = Secret::Plain("md5_pw".into());
        // printf 'md5_pwmd5user' | md5sum -> b111...; printf 'b111...\x01\x02\x03\x04' | md5sum
        let literal: &[(&[u8; 4], &str)] = &[
            (&[1, 2, 3, 4], "md5bc2fe593422f66b87e0e529c6d7cc534"),
            (
                &[0xde, 0xad, 0xbe, 0xef],
                "md5d913dfe77a117ce79c614128211846ac",
            ),
        ];
        for (salt, response) in literal {
            assert!(md5_verify("md5user", &plain, **salt, response.as_bytes()));
            assert_eq!(
                md5_password_response("md5user", "md5_pw", **salt),
                response.as_bytes()
            );
        }

        let salt = [0x7f, 0x00, 0xff, 0x10];
        let inner = Md5::digest(b"md5_pwmd5user");
        let inner_hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(inner_hex, "b1116845021429c9cd5c0c6bb22019de");
        let mut outer = Md5::new();
        outer.update(inner_hex.as_bytes());
        outer.update(salt);
        let expected: String = outer
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let expected = format!("md5{expected}");
        assert!(md5_verify("md5user", &plain, salt, expected.as_bytes()));
        assert!(md5_verify(
            "md5user",
            &plain,
            salt,
            format!("{expected}\0").as_bytes()
        ));
        assert_eq!(
            md5_password_response("md5user", "md5_pw", salt),
            postgres_protocol::authentication::md5_hash(b"md5user", b"md5_pw", salt).into_bytes()
        );
    }

    #[test]
    fn md5_verify_works_with_a_stored_md5_secret() {
        let list = Userlist::parse(&format!(
            "\"md5user\" \"{}\"",
            postgres_protocol::password::md5(b"md5_pw", "md5user")
        ))
        .unwrap();
        let secret = list.get("md5user").unwrap();
        for _ in 0..4 {
            let salt = md5_salt();
            let response = md5_password_response("md5user", "md5_pw", salt);
            assert!(md5_verify("md5user", secret, salt, &response));
        }
    }

    #[test]
    fn md5_verify_rejects_everything_else() {
        let salt = [1, 2, 3, 4];
        let right = "md5bc2fe593422f66b87e0e529c6d7cc534";
        let plain = Secret::Plain("md5_pw".into());
        let cases: Vec<(&str, Secret, [u8; 4], Vec<u8>)> = vec![
            ("md5user", Secret::Plain("other".into()), salt, right.into()),
            ("other", plain.clone(), salt, right.into()),
            ("md5user", plain.clone(), [4, 3, 2, 1], right.into()),
            ("md5user", plain.clone(), salt, right.to_uppercase().into()),
            (
                "md5user",
                plain.clone(),
                salt,
                right.trim_start_matches("md5").into(),
            ),
            (
                "md5user",
                plain.clone(),
                salt,
                format!("{right}\0\0").into(),
            ),
            ("md5user", plain.clone(), salt, format!("{right}0").into()),
            ("md5user", plain.clone(), salt, Vec::new()),
            ("md5user", plain.clone(), salt, b"\0".to_vec()),
            ("md5user", Secret::Md5([0; 16]), salt, right.into()),
            (
                "md5user",
                Secret::Plain(String::new()),
                salt,
                md5_password_response("md5user", "", salt),
            ),
            (
                "md5user",
                Secret::Scram(ScramVerifier::from_password_with("md5_pw", b"s", 1)),
                salt,
                right.into(),
            ),
        ];
        for (user, secret, salt, response) in cases {
            assert!(
                !md5_verify(user, &secret, salt, &response),
                "{user} {secret:?} {salt:?} {:?}",
                String::from_utf8_lossy(&response)
            );
        }
    }
}
