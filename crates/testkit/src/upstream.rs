//! A hostile PostgreSQL server for the pooler's login path: it speaks just enough of the
//! protocol to reach one bad step (an absurd SCRAM iteration count, a server signature that does
//! not verify, a message announced far over any cap), then records how soon the pooler hung up.
//! What a real server never does, so no real server can stand in for it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::port::free_port;

/// The one bad thing the fake server does during login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostility {
    /// SCRAM server-first-message with this iteration count (`i=`).
    ScramIterations(u64),
    /// A well-formed SCRAM exchange whose server-final signature is wrong.
    WrongServerSignature,
    /// A message header announcing about 2 GB, then a trickle of bytes.
    OversizedMessage,
    /// AuthenticationCleartextPassword, as a server downgrading authentication (or someone in
    /// the middle) would ask; [`Outcome::password_sent`] says whether the pooler answered.
    AsksCleartext,
    /// A SCRAM exchange that ends in AuthenticationOk without the server's signature
    /// (SASLFinal): a server that never proves it knows the password.
    ScramWithoutProof,
}

/// How one login against the fake went, from the fake's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// From the bad step to the pooler closing the connection; `None` if it did not close within
    /// the fake's 10 s read timeout.
    pub cut_after: Option<Duration>,
    /// The pooler sent a password message in answer to the bad step.
    pub password_sent: bool,
}

pub struct FakeUpstream {
    port: u16,
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<JoinHandle<()>>,
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// How long the fake waits for the pooler's next move before giving up on it.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

impl FakeUpstream {
    /// Listens on 127.0.0.1:<[`free_port`]>; each connection gets the same hostility.
    pub fn start(hostility: Hostility) -> anyhow::Result<FakeUpstream> {
        let port = free_port();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("fake upstream: binding 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (thread_stop, thread_outcomes) = (stop.clone(), outcomes.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fake-upstream-{port}"))
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let outcomes = thread_outcomes.clone();
                            std::thread::spawn(move || {
                                if let Ok(Some(outcome)) = serve(conn, hostility) {
                                    if let Ok(mut o) = outcomes.lock() {
                                        o.push(outcome);
                                    }
                                }
                            });
                        }
                        // Non-blocking accept, so that dropping the handle stops the thread.
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .context("fake upstream: spawning its thread")?;
        Ok(FakeUpstream {
            port,
            stop,
            outcomes,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Logins that reached the bad step, in the order they ended.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One login: startup, then the hostility. `Ok(None)` when the pooler left before the bad step.
fn serve(mut conn: TcpStream, hostility: Hostility) -> anyhow::Result<Option<Outcome>> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    // SSLRequest / GSSENCRequest get 'N'; then the StartupMessage.
    loop {
        let packet = read_packet(&mut conn, None)?;
        let code = packet
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        match code {
            Some(SSL_REQUEST | GSSENC_REQUEST) => conn.write_all(b"N")?,
            _ => break,
        }
    }
    if hostility == Hostility::AsksCleartext {
        write_auth(&mut conn, 3, b"")?;
        // Either a PasswordMessage or the end of the connection.
        let start = Instant::now();
        let mut tag = [0u8; 1];
        let password_sent = matches!(conn.read(&mut tag), Ok(1) if tag[0] == b'p');
        let closed = wait_for_close(&mut conn, false);
        return Ok(Some(Outcome {
            cut_after: closed.cut_after.map(|_| start.elapsed()),
            password_sent,
        }));
    }
    if hostility == Hostility::OversizedMessage {
        conn.write_all(&[b'R', 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])?;
        return Ok(Some(wait_for_close(&mut conn, true)));
    }
    // AuthenticationSASL, SCRAM-SHA-256.
    write_auth(&mut conn, 10, b"SCRAM-SHA-256\0\0")?;
    let initial = read_packet(&mut conn, Some(b'p'))?;
    let text = String::from_utf8_lossy(&initial).into_owned();
    let nonce = text.rsplit("r=").next().unwrap_or_default().to_owned();
    let iterations = match hostility {
        Hostility::ScramIterations(i) => i,
        _ => 4096,
    };
    // "salt" in base64; the nonce extended, as a server must.
    let first = format!("r={nonce}fake,s=c2FsdA==,i={iterations}");
    write_auth(&mut conn, 11, first.as_bytes())?;
    if let Hostility::ScramIterations(_) = hostility {
        return Ok(Some(wait_for_close(&mut conn, false)));
    }
    read_packet(&mut conn, Some(b'p'))?;
    if hostility == Hostility::ScramWithoutProof {
        write_auth(&mut conn, 0, b"")?;
        return Ok(Some(wait_for_close(&mut conn, false)));
    }
    // 32 zero bytes: no key signs to that.
    let fin = format!("v={}=", "A".repeat(43));
    write_auth(&mut conn, 12, fin.as_bytes())?;
    Ok(Some(wait_for_close(&mut conn, false)))
}

/// Waits for the pooler to close; with `trickle`, keeps sending a byte at a time meanwhile, as
/// the body of an oversized message would arrive.
fn wait_for_close(conn: &mut TcpStream, trickle: bool) -> Outcome {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let _ = conn.set_read_timeout(Some(Duration::from_millis(if trickle { 20 } else { 500 })));
    while start.elapsed() < READ_TIMEOUT {
        if trickle && conn.write_all(&[0]).is_err() {
            return Outcome {
                cut_after: Some(start.elapsed()),
                password_sent: false,
            };
        }
        match conn.read(&mut buf) {
            Ok(0) => {
                return Outcome {
                    cut_after: Some(start.elapsed()),
                    password_sent: false,
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                return Outcome {
                    cut_after: Some(start.elapsed()),
                    password_sent: false,
                }
            }
        }
    }
    Outcome {
        cut_after: None,
        password_sent: false,
    }
}

fn write_auth(conn: &mut TcpStream, code: i32, data: &[u8]) -> std::io::Result<()> {
    let mut m = vec![b'R'];
    m.extend_from_slice(&((8 + data.len()) as u32).to_be_bytes());
    m.extend_from_slice(&code.to_be_bytes());
    m.extend_from_slice(data);
    conn.write_all(&m)
}

/// Reads one packet: untagged (startup) when `tag` is `None`, else a message with that tag.
/// Returns the body.
fn read_packet(conn: &mut TcpStream, tag: Option<u8>) -> anyhow::Result<Vec<u8>> {
    if let Some(want) = tag {
        let mut t = [0u8; 1];
        conn.read_exact(&mut t)?;
        anyhow::ensure!(
            t[0] == want,
            "expected '{}', got '{}'",
            want as char,
            t[0] as char
        );
    }
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!((4..=64 * 1024).contains(&len), "bad length {len}");
    let mut body = vec![0u8; len - 4];
    conn.read_exact(&mut body)?;
    Ok(body)
}
