//! The session's side of transaction-mode LISTEN (`crate::listen`): recognising a client's
//! LISTEN / UNLISTEN, answering it, and sending the client its notifications while it is idle.

use std::time::Duration;

use proto::backend::{self, TxStatus};
use proto::frame::{Header, HEADER_LEN};
use proto::frontend;

use super::{Held, Session};
use crate::listen::{self, Command, Subscription};
use crate::settings::PoolMode;

impl Session {
    /// The LISTEN or UNLISTEN that is the whole of the Query at the head of the client's
    /// buffer, taken out of the buffer; `None` (and the buffer untouched) for anything else.
    /// In session mode the client's own server listens, as with PostgreSQL directly.
    pub(super) fn listen_command(&mut self, h: Header) -> Option<Command> {
        if h.tag != frontend::QUERY || self.mode == PoolMode::Session {
            return None;
        }
        let cmd = listen::command(self.client.buf.get(HEADER_LEN..h.total())?)?;
        bytes::Buf::advance(&mut self.client.buf, h.total());
        Some(cmd)
    }

    /// A LISTEN or UNLISTEN the client sent inside its transaction (or while an advisory lock
    /// pins its server), when it is all the client sent and the server owes nothing: then the
    /// transaction's status is known and Breakwater answers with it. Otherwise (pipelined
    /// after other statements, in a failed transaction) the server runs it, as before.
    ///
    /// Unlike PostgreSQL, which starts listening at COMMIT and not at all after a ROLLBACK,
    /// the client listens from here on either way.
    pub(super) fn listen_in_transaction(
        &self,
        h: &Held,
        hdr: Header,
        text: &[u8],
    ) -> Option<Command> {
        let status = h.ledger.status();
        if self.mode == PoolMode::Session
            || !(status == TxStatus::InTransaction || (status == TxStatus::Idle && h.pinned))
        {
            return None;
        }
        let cmd = listen::command(text)?;
        let quiet = h.ledger.ready_owed() == 0
            && !h.ledger.batch_open()
            && self.client.buf.len() == hdr.total()
            && self.scratch.to_server.is_empty()
            && self.scratch.to_client.is_empty();
        quiet.then_some(cmd)
    }

    /// Runs a LISTEN or UNLISTEN for the client and writes PostgreSQL's answer to it
    /// (CommandComplete or an ERROR, then ReadyForQuery with `status`).
    pub(super) async fn run_listen(&mut self, cmd: &Command, status: TxStatus) {
        let sub = match (&self.listening, cmd) {
            (Some(s), _) => s,
            // Nothing to leave.
            (None, Command::Unlisten(_) | Command::UnlistenAll) => {
                backend::write_command_complete(&mut self.client.out, cmd.tag());
                backend::write_ready_for_query(&mut self.client.out, status);
                return;
            }
            (None, Command::Listen(_)) => self.listening.insert(Box::new(Subscription::new(
                &self.entry.listen,
                self.client.id,
            ))),
        };
        // The client waits for the listener connection as it would for a server.
        let wait = self
            .settings
            .query_wait_timeout
            .unwrap_or(Duration::from_secs(120));
        match sub.run(cmd, wait).await {
            Ok(()) => backend::write_command_complete(&mut self.client.out, cmd.tag()),
            Err(e) => {
                self.shared.stats.client_errors.record(e.code.0);
                e.write(&mut self.client.out);
            }
        }
        backend::write_ready_for_query(&mut self.client.out, status);
    }

    /// Sends the client every notification waiting for it.
    pub(super) async fn deliver_notifications(&mut self) -> std::io::Result<()> {
        let Some(sub) = &self.listening else {
            return Ok(());
        };
        if sub.inbox().take_into(&mut self.client.out) > 0 {
            self.client.flush().await?;
        }
        Ok(())
    }

    /// DISCARD ALL ran for the client: as on PostgreSQL, it listens to nothing any more.
    pub(super) fn discarded_all(&mut self) {
        if let Some(sub) = &self.listening {
            sub.unlisten_all();
        }
    }
}

/// Until a notification arrives for a listening client; never for any other. The wait is
/// boxed so that an idle client's task does not carry it unless the client listens.
pub(super) async fn mail(sub: Option<&Subscription>) {
    match sub {
        Some(s) => Box::pin(s.inbox().ready.notified()).await,
        None => std::future::pending().await,
    }
}
