//! A client's connection: its socket, the bytes it sent that are not handled yet, and the bytes
//! on their way to it. The login and the session both talk to the client through this.

use std::sync::Arc;

use bytes::BytesMut;
use proto::error::PgError;
use proto::frame::{self, FrameError, Message};

use crate::{read_into, reserve_read, Shared};
use upstream::Stream;

pub(crate) struct ClientConn {
    pub id: u64,
    pub stream: Stream,
    pub buf: BytesMut,
    pub out: BytesMut,
    /// For counting the errors this connection is sent, by SQLSTATE class.
    pub shared: Arc<Shared>,
}

impl ClientConn {
    /// Reads what the client has sent already, without waiting (see
    /// [`Stream::try_read_now`]).
    pub fn try_read_now(&mut self) -> Option<std::task::Poll<std::io::Result<usize>>> {
        reserve_read(&mut self.buf);
        self.stream.try_read_now(&mut self.buf)
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            self.stream.send(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Reads one whole message of at most `max` bytes (during login, where every message is
    /// small). `Ok(Err)`: the message is malformed; `Err`: the client is gone.
    pub async fn read_message(
        &mut self,
        max: usize,
    ) -> std::io::Result<Result<Message, FrameError>> {
        loop {
            match frame::take_message(&mut self.buf, max) {
                Ok(Some(m)) => return Ok(Ok(m)),
                Ok(None) => {}
                Err(e) => return Ok(Err(e)),
            }
            if read_into(&mut self.stream, &mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Sends an error (the caller closes afterwards for FATAL ones). Best effort: the client
    /// may already be gone.
    pub async fn send_error(&mut self, err: &PgError) {
        self.shared.stats.client_errors.record(err.code.0);
        err.write(&mut self.out);
        let _ = self.flush().await;
    }
}
