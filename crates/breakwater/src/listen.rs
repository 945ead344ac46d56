//! Client listeners: the addresses `listen_addr` names (PgBouncer's `*` and comma lists
//! included) and binding them, for the daemon and for `--check`, which tries the same binds so
//! that a busy port shows up before a start does. Nothing here accepts a connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// Every address to listen on: `"*"` is every IPv4 and IPv6 address, `"a,b"` is both, and a
/// host name is every address it resolves to.
pub fn addresses(listen_addr: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut all = Vec::new();
    for part in listen_addr.split(',').map(str::trim) {
        let found: Vec<SocketAddr> = match part {
            "" => continue,
            "*" => vec![
                (IpAddr::V4(Ipv4Addr::UNSPECIFIED), port).into(),
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), port).into(),
            ],
            // `[::1]` as well as `::1`.
            host => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                match host.parse::<IpAddr>() {
                    Ok(ip) => vec![(ip, port).into()],
                    Err(_) => (host, port)
                        .to_socket_addrs()
                        .map_err(|e| format!("cannot resolve \"{host}\": {e}"))?
                        .collect(),
                }
            }
        };
        for a in found {
            if !all.contains(&a) {
                all.push(a);
            }
        }
    }
    if all.is_empty() {
        return Err(
            "names no address; use an IP address, a host name, \"*\" or a comma list".into(),
        );
    }
    Ok(all)
}

/// A listening socket on `addr`. IPv6 sockets take IPv6 only, so `*` can bind `0.0.0.0` and
/// `::` on the same port (as PgBouncer does).
///
/// With `reuseport` (`so_reuseport`), another process may bind the same address too: a new
/// version takes over the port while this one drains, and the kernel spreads new connections
/// over every process listening.
pub fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted pooler must not wait for the old one's TIME_WAIT sockets.
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Bursts of logins (a fleet restarting) queue in the kernel rather than being refused.
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds every address. The IPv6 half of `*` (`::`) is skipped with a warning on a host without
/// IPv6, as long as something else was bound; any other failure is an error.
pub fn bind_all(
    addrs: &[SocketAddr],
    reuseport: bool,
) -> Result<Vec<std::net::TcpListener>, String> {
    let mut bound = Vec::new();
    let mut skipped = None;
    for a in addrs {
        match bind(*a, reuseport) {
            Ok(l) => bound.push(l),
            Err(e)
                if a.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                    && (matches!(
                        e.kind(),
                        std::io::ErrorKind::Unsupported | std::io::ErrorKind::AddrNotAvailable
                    ) || e.raw_os_error() == Some(libc::EAFNOSUPPORT)) =>
            {
                skipped = Some(format!("{a}: {e}"));
            }
            Err(e) => return Err(format!("cannot listen on {a}: {e}")),
        }
    }
    match (bound.is_empty(), skipped) {
        (true, Some(e)) => Err(format!("cannot listen on {e}")),
        (false, Some(e)) => {
            tracing::warn!("no IPv6 on this host, listening on IPv4 only ({e})");
            Ok(bound)
        }
        _ => Ok(bound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_and_comma_lists_name_every_address() {
        let v4 = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            addresses("*", 6432).unwrap(),
            vec![v4("0.0.0.0:6432"), v4("[::]:6432")]
        );
        assert_eq!(
            addresses("127.0.0.1, ::1", 7).unwrap(),
            vec![v4("127.0.0.1:7"), v4("[::1]:7")]
        );
        assert_eq!(addresses("[::1]", 7).unwrap(), vec![v4("[::1]:7")]);
        assert!(addresses(" , ", 7).is_err());
        assert!(addresses("no-such-host.invalid", 7)
            .unwrap_err()
            .contains("no-such-host.invalid"));
    }

    #[test]
    fn a_busy_port_is_reported_and_star_binds_both_families() {
        let first = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let taken = first.local_addr().unwrap();
        let err = bind(taken, false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let port = bind("0.0.0.0:0".parse().unwrap(), false)
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Both families on one port: only possible because the IPv6 socket is IPv6-only.
        let both: Vec<_> = addresses("*", port)
            .unwrap()
            .into_iter()
            .map(|a| bind(a, false))
            .collect();
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(both.iter().all(Result::is_ok), "{both:?}");
        }
    }

    #[test]
    fn with_so_reuseport_two_listeners_share_a_port_and_without_it_they_do_not() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true).expect("a second so_reuseport listener");
        assert_eq!(second.local_addr().unwrap(), addr);
        // Both must ask for it: a listener without the option is refused.
        assert_eq!(
            bind(addr, false).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
    }
}
