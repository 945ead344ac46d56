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
///
/// `clients`: TCP_NODELAY and these keepalive options are set on the listening socket before it
/// listens, so every client socket it accepts has them without a system call of its own (Linux
/// copies them to accepted sockets; see `upstream::Stream::tune_accepted`).
///
/// `defer_accept` (`tcp_defer_accept`, Linux): TCP_DEFER_ACCEPT of 45 s, as PgBouncer sets it.
/// How long the kernel holds a connection that has sent nothing (PgBouncer's fixed value).
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 45;

/// TCP_DEFER_ACCEPT, which socket2 does not offer.
#[cfg(target_os = "linux")]
fn set_defer_accept(socket: &impl std::os::fd::AsRawFd, secs: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt on a socket we own, reading one c_int we pass with its size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn bind(
    addr: SocketAddr,
    reuseport: bool,
    clients: Option<&upstream::TcpLiveness>,
    defer_accept: bool,
) -> std::io::Result<std::net::TcpListener> {
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
    #[cfg(target_os = "linux")]
    if let Some(l) = clients {
        l.apply_exactly(&socket)?;
    }
    #[cfg(target_os = "linux")]
    if defer_accept {
        set_defer_accept(&socket, DEFER_ACCEPT_SECS)?;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (clients, defer_accept);
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
    clients: Option<&upstream::TcpLiveness>,
    defer_accept: bool,
) -> Result<Vec<std::net::TcpListener>, String> {
    let mut bound = Vec::new();
    let mut skipped = None;
    for a in addrs {
        match bind(*a, reuseport, clients, defer_accept) {
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
    use std::time::Duration;

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
        let first = bind("127.0.0.1:0".parse().unwrap(), false, None, false).unwrap();
        let taken = first.local_addr().unwrap();
        let err = bind(taken, false, None, false).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        let port = bind("0.0.0.0:0".parse().unwrap(), false, None, false)
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Both families on one port: only possible because the IPv6 socket is IPv6-only.
        let both: Vec<_> = addresses("*", port)
            .unwrap()
            .into_iter()
            .map(|a| bind(a, false, None, false))
            .collect();
        if std::net::TcpListener::bind("[::1]:0").is_ok() {
            assert!(both.iter().all(Result::is_ok), "{both:?}");
        }
    }

    #[test]
    fn with_so_reuseport_two_listeners_share_a_port_and_without_it_they_do_not() {
        let first = bind("127.0.0.1:0".parse().unwrap(), true, None, false).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind(addr, true, None, false).expect("a second so_reuseport listener");
        assert_eq!(second.local_addr().unwrap(), addr);
        // Both must ask for it: a listener without the option is refused.
        assert_eq!(
            bind(addr, false, None, false).unwrap_err().kind(),
            std::io::ErrorKind::AddrInUse
        );
    }

    #[cfg(target_os = "linux")]
    fn keepalive_on() -> upstream::TcpLiveness {
        upstream::TcpLiveness {
            keepalive: Some((Duration::from_secs(11), Duration::from_secs(6), 4)),
            user_timeout: Some(Duration::from_millis(21_000)),
        }
    }

    /// What a socket accepted from a listener bound with `at_bind` (and then, if given, set
    /// again with `then`) carries, read back with getsockopt: TCP_NODELAY, SO_KEEPALIVE, its
    /// idle, interval and count, and TCP_USER_TIMEOUT in milliseconds.
    #[cfg(target_os = "linux")]
    fn accepted_options(
        at_bind: &upstream::TcpLiveness,
        then: Option<&upstream::TcpLiveness>,
    ) -> (bool, bool, u64, u64, u32, u128) {
        let listener = bind("127.0.0.1:0".parse().unwrap(), false, Some(at_bind), false).unwrap();
        if let Some(t) = then {
            t.apply_exactly(&listener).unwrap();
        }
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        (
            s.nodelay().unwrap(),
            s.keepalive().unwrap(),
            s.keepalive_time().unwrap().as_secs(),
            s.keepalive_interval().unwrap().as_secs(),
            s.keepalive_retries().unwrap(),
            s.tcp_user_timeout().unwrap().map_or(0, |d| d.as_millis()),
        )
    }

    /// Breakwater sets no option on an accepted client socket when its listener was bound with
    /// them: that rests on Linux copying them from the listener, which this checks.
    #[cfg(target_os = "linux")]
    #[test]
    fn accepted_sockets_inherit_nodelay_and_the_client_keepalive_options_set_at_bind() {
        assert_eq!(
            accepted_options(&keepalive_on(), None),
            (true, true, 11, 6, 4, 21_000)
        );
        let (nodelay, keepalive, .., user_timeout) =
            accepted_options(&upstream::TcpLiveness::default(), None);
        assert!(nodelay);
        assert!(!keepalive, "keepalive off stays off");
        assert_eq!(user_timeout, 0);
    }

    /// A reload that turns keepalive off re-tunes the listener: what it had is turned off, not
    /// left as it was.
    #[cfg(target_os = "linux")]
    #[test]
    fn options_set_again_exactly_turn_off_what_the_new_values_leave_off() {
        let off = upstream::TcpLiveness::default();
        let (nodelay, keepalive, .., user_timeout) = accepted_options(&keepalive_on(), Some(&off));
        assert!(nodelay);
        assert!(!keepalive);
        assert_eq!(user_timeout, 0);
    }
}
