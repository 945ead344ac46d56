//! A tiny DNS responder on UDP for tests: answers A queries from a table the test changes while it
//! runs, NXDOMAIN for names it is told to deny (and names it does not know), or nothing at all for
//! names it is told to ignore, so a resolver times out. It speaks just enough of RFC 1035 for a
//! stub resolver: one question per query, A answers with a TTL, no compression except the pointer
//! to the question's name.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

/// What the responder says about one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// These addresses, with this TTL in seconds (AAAA queries get an empty answer).
    A(Vec<Ipv4Addr>, u32),
    /// NXDOMAIN.
    NxDomain,
    /// No reply at all: the resolver times out.
    Silent,
}

type Table = Arc<Mutex<HashMap<String, DnsAnswer>>>;

/// A running responder on 127.0.0.1; stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    table: Table,
    queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    pub fn start() -> anyhow::Result<DnsServer> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding the test DNS server")?;
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .context("setting the DNS socket's read timeout")?;
        let addr = socket.local_addr().context("DNS server address")?;
        let table: Table = Arc::default();
        let queries = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (table, queries, stop) = (table.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || serve(&socket, &table, &queries, &stop))
        };
        Ok(DnsServer {
            addr,
            table,
            queries,
            stop,
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:PORT`, for the resolver's configuration.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets what `name` (without a trailing dot) resolves to from now on.
    pub fn set(&self, name: &str, answer: DnsAnswer) {
        if let Ok(mut t) = self.table.lock() {
            t.insert(name.trim_end_matches('.').to_ascii_lowercase(), answer);
        }
    }

    /// Queries received so far (any name, any type).
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(socket: &UdpSocket, table: &Table, queries: &AtomicU64, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let Some((name, qtype, question_end)) = parse_query(&buf[..n]) else {
            continue;
        };
        let answer = table
            .lock()
            .ok()
            .and_then(|t| t.get(&name).cloned())
            .unwrap_or(DnsAnswer::NxDomain);
        if let Some(reply) = build_reply(&buf[..question_end], qtype, &answer) {
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// The question's name (lower case, no trailing dot), its type, and where the question ends.
fn parse_query(q: &[u8]) -> Option<(String, u16, usize)> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((labels.join("."), qtype, i + 4))
}

fn build_reply(query: &[u8], qtype: u16, answer: &DnsAnswer) -> Option<Vec<u8>> {
    const TYPE_A: u16 = 1;
    let (rcode, addrs, ttl): (u16, &[Ipv4Addr], u32) = match answer {
        DnsAnswer::Silent => return None,
        DnsAnswer::NxDomain => (3, &[], 0),
        DnsAnswer::A(addrs, ttl) if qtype == TYPE_A => (0, addrs, *ttl),
        DnsAnswer::A(_, _) => (0, &[], 0),
    };
    let mut r = Vec::with_capacity(query.len() + 16 * addrs.len());
    r.extend_from_slice(query.get(..2)?);
    let rd = u16::from_be_bytes([*query.get(2)?, *query.get(3)?]) & 0x0100;
    // QR, AA, RD as asked, RA, rcode.
    let flags = 0x8000 | 0x0400 | rd | 0x0080 | rcode;
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..)?);
    for a in addrs {
        r.extend_from_slice(&[0xC0, 0x0C]);
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&a.octets());
    }
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn answers_a_queries_from_the_table_and_nxdomain_otherwise() {
        let server = DnsServer::start().unwrap();
        server.set(
            "Db.Test",
            DnsAnswer::A(vec![Ipv4Addr::new(10, 0, 0, 7)], 30),
        );
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 512];

        sock.send_to(&query("db.test", 1), server.addr()).unwrap();
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        let r = &buf[..n];
        assert_eq!(&r[..2], &[0x12, 0x34], "id echoed");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[n - 4..], &[10, 0, 0, 7]);

        sock.send_to(&query("other.test", 1), server.addr())
            .unwrap();
        let (n, _) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(buf[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), 0);
        let _ = n;

        server.set("db.test", DnsAnswer::Silent);
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        sock.send_to(&query("db.test", 1), server.addr()).unwrap();
        assert!(
            sock.recv_from(&mut buf).is_err(),
            "silent names get no reply"
        );
        assert_eq!(server.queries(), 3);
    }
}
