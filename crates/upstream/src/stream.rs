//! A byte stream to a peer: TCP or a Unix socket. Both client and server connections use it, so
//! the TLS issue adds its variant in one place.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Is the peer still there with nothing unread? Asks the kernel directly (a non-blocking
    /// `MSG_PEEK`), because tokio's cached readiness may not yet know about bytes or a FIN that
    /// arrived while nobody was polling this idle socket. `false` when the peer closed, sent
    /// something unexpected (typically a FATAL before closing), or the socket errored.
    pub fn is_idle_and_open(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut probe = [0u8; 1];
        // SAFETY: recv into a one-byte buffer we own; MSG_PEEK leaves the data in place.
        let n = unsafe {
            libc::recv(
                fd,
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }

    /// The local and remote socket addresses (`None` for Unix sockets), for SHOW CLIENTS/SERVERS.
    pub fn addrs(&self) -> (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>) {
        match self {
            Stream::Tcp(s) => (s.local_addr().ok(), s.peer_addr().ok()),
            Stream::Unix(_) => (None, None),
        }
    }

    /// A second handle on the same socket, so an operator can shut it down (KILL) while its
    /// task owns the stream; the task then sees end-of-stream and cleans up as for any
    /// disconnect.
    pub fn shutdown_handle(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match self {
            Stream::Tcp(s) => s.as_fd().try_clone_to_owned().ok(),
            Stream::Unix(s) => s.as_fd().try_clone_to_owned().ok(),
        }
    }

    /// Disables Nagle: the pooler forwards whole protocol messages and must not sit on them.
    pub fn set_nodelay(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}
