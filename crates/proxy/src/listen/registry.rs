//! Who listens to what, in one pool, and each listening client's inbox: plain data, no I/O, so
//! the fan-out is tested without a socket. The listener connection (`server.rs`) and the
//! sessions both reach it through the hub's lock; nothing here awaits.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

/// Notifications one client may have waiting. A client that does not read for a while (a long
/// transaction, a slow consumer) loses the oldest first: notifications are mostly "something
/// changed, look again" hints, so the newest ones are the ones worth keeping, and the client
/// stays connected. 1,000 is a few hundred KiB with PostgreSQL's 8,000-byte payload cap.
pub(crate) const INBOX_CAP: usize = 1000;

/// Channels one client may listen to at once, so one client cannot grow the registry without
/// bound. PostgreSQL has no such limit; applications listen to a handful.
pub(crate) const MAX_CHANNELS_PER_CLIENT: usize = 1000;

/// What one client has not been sent yet: NotificationResponse messages as the listener
/// connection received them (encoded once, shared by every client on the channel).
#[derive(Default)]
pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    /// Rung when something is queued; the session waits on it while the client is idle.
    pub(crate) ready: Notify,
}

#[derive(Default)]
struct Queue {
    msgs: VecDeque<Bytes>,
    /// Dropped messages since the client last took its inbox: one log line per episode.
    overflowing: bool,
}

/// How a push went.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    Queued,
    /// The inbox was full: its oldest message went. `first` for the first drop since the
    /// client last took its inbox (log it then, not at every drop).
    DroppedOldest {
        first: bool,
    },
}

impl Inbox {
    pub(crate) fn push(&self, msg: Bytes) -> Pushed {
        let pushed = {
            let mut q = lock(&self.queue);
            let pushed = if q.msgs.len() >= INBOX_CAP {
                q.msgs.pop_front();
                let first = !q.overflowing;
                q.overflowing = true;
                Pushed::DroppedOldest { first }
            } else {
                Pushed::Queued
            };
            q.msgs.push_back(msg);
            pushed
        };
        // A stored permit if the client is not waiting right now: it will not miss this.
        self.ready.notify_one();
        pushed
    }

    /// Appends every waiting message to `out`; returns how many.
    pub(crate) fn take_into(&self, out: &mut BytesMut) -> usize {
        let mut q = lock(&self.queue);
        q.overflowing = false;
        let n = q.msgs.len();
        for m in q.msgs.drain(..) {
            out.extend_from_slice(&m);
        }
        n
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        lock(&self.queue).msgs.is_empty()
    }
}

/// A poisoned lock only means another task panicked while holding it; the data is still
/// consistent enough for counting and queueing.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Channels and their listening clients, by client id.
#[derive(Default)]
pub(crate) struct Registry {
    channels: HashMap<String, Vec<u64>>,
    clients: HashMap<u64, Listening>,
}

struct Listening {
    inbox: Arc<Inbox>,
    channels: HashSet<String>,
}

/// What a fan-out did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FanOut {
    /// Inboxes the notification went into.
    pub delivered: u64,
    /// Inboxes that dropped their oldest message for it.
    pub dropped: u64,
    /// Clients whose inbox started overflowing with this one (for the log).
    pub started_overflowing: Vec<u64>,
}

/// Refused: the client listens to [`MAX_CHANNELS_PER_CLIENT`] channels already.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooManyChannels;

impl Registry {
    /// Adds `client` (with its inbox) to `channel`; true when nobody listened to it before
    /// (the listener connection must LISTEN).
    pub(crate) fn listen(
        &mut self,
        client: u64,
        inbox: &Arc<Inbox>,
        channel: &str,
    ) -> Result<bool, TooManyChannels> {
        let l = self.clients.entry(client).or_insert_with(|| Listening {
            inbox: inbox.clone(),
            channels: HashSet::new(),
        });
        if l.channels.contains(channel) {
            return Ok(false);
        }
        if l.channels.len() >= MAX_CHANNELS_PER_CLIENT {
            if l.channels.is_empty() {
                self.clients.remove(&client);
            }
            return Err(TooManyChannels);
        }
        l.channels.insert(channel.to_owned());
        let listeners = self.channels.entry(channel.to_owned()).or_default();
        listeners.push(client);
        Ok(listeners.len() == 1)
    }

    /// Takes `client` off `channel`; true when nobody listens to it any more.
    pub(crate) fn unlisten(&mut self, client: u64, channel: &str) -> bool {
        let Some(l) = self.clients.get_mut(&client) else {
            return false;
        };
        if !l.channels.remove(channel) {
            return false;
        }
        if l.channels.is_empty() {
            self.clients.remove(&client);
        }
        self.leave(client, channel)
    }

    /// Takes `client` off every channel; returns the channels nobody listens to any more.
    pub(crate) fn unlisten_all(&mut self, client: u64) -> Vec<String> {
        let Some(l) = self.clients.remove(&client) else {
            return Vec::new();
        };
        l.channels
            .into_iter()
            .filter(|ch| self.leave(client, ch))
            .collect()
    }

    fn leave(&mut self, client: u64, channel: &str) -> bool {
        let Some(listeners) = self.channels.get_mut(channel) else {
            return false;
        };
        listeners.retain(|c| *c != client);
        if listeners.is_empty() {
            self.channels.remove(channel);
            return true;
        }
        false
    }

    /// Puts `msg` (a NotificationResponse for `channel`) into the inbox of every client
    /// listening to `channel`.
    pub(crate) fn fan_out(&self, channel: &str, msg: &Bytes) -> FanOut {
        let mut out = FanOut::default();
        for client in self.channels.get(channel).into_iter().flatten() {
            let Some(l) = self.clients.get(client) else {
                continue;
            };
            out.delivered += 1;
            if let Pushed::DroppedOldest { first } = l.inbox.push(msg.clone()) {
                out.dropped += 1;
                if first {
                    out.started_overflowing.push(*client);
                }
            }
        }
        out
    }

    /// Does `client` listen to `channel`?
    pub(crate) fn listens(&self, client: u64, channel: &str) -> bool {
        self.clients
            .get(&client)
            .is_some_and(|l| l.channels.contains(channel))
    }

    pub(crate) fn is_wanted(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    pub(crate) fn channels(&self) -> impl Iterator<Item = &String> {
        self.channels.keys()
    }

    pub(crate) fn channel_count(&self) -> usize {
        self.channels.len()
    }

    pub(crate) fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> Bytes {
        Bytes::from(n.to_be_bytes().to_vec())
    }

    fn taken(inbox: &Inbox) -> Vec<u32> {
        let mut out = BytesMut::new();
        inbox.take_into(&mut out);
        // Each test message is one u32, big-endian; read them back without
        // the codec (this crate leaves byte order to proto).
        out.chunks(4)
            .map(|c| c.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)))
            .collect()
    }

    #[test]
    fn a_notification_reaches_every_client_on_its_channel_and_no_one_else() {
        let mut r = Registry::default();
        let (a, b, c) = (
            Arc::new(Inbox::default()),
            Arc::new(Inbox::default()),
            Arc::new(Inbox::default()),
        );
        assert_eq!(r.listen(1, &a, "jobs"), Ok(true));
        assert_eq!(r.listen(2, &b, "jobs"), Ok(false));
        assert_eq!(r.listen(3, &c, "other"), Ok(true));
        let out = r.fan_out("jobs", &msg(7));
        assert_eq!(out.delivered, 2);
        assert_eq!(r.fan_out("nobody", &msg(8)).delivered, 0);
        assert_eq!(taken(&a), [7]);
        assert_eq!(taken(&b), [7]);
        assert!(c.is_empty());
        assert_eq!((r.channel_count(), r.client_count()), (2, 3));
    }

    #[test]
    fn listening_twice_to_a_channel_delivers_once() {
        let mut r = Registry::default();
        let a = Arc::new(Inbox::default());
        assert_eq!(r.listen(1, &a, "jobs"), Ok(true));
        assert_eq!(r.listen(1, &a, "jobs"), Ok(false));
        assert!(r.listens(1, "jobs") && !r.listens(1, "other") && !r.listens(2, "jobs"));
        r.fan_out("jobs", &msg(1));
        assert_eq!(taken(&a), [1]);
    }

    #[test]
    fn a_channel_is_given_up_only_when_its_last_client_leaves() {
        let mut r = Registry::default();
        let (a, b) = (Arc::new(Inbox::default()), Arc::new(Inbox::default()));
        r.listen(1, &a, "jobs").unwrap();
        r.listen(2, &b, "jobs").unwrap();
        r.listen(2, &b, "mail").unwrap();
        assert!(!r.unlisten(1, "jobs"), "client 2 still listens");
        assert!(!r.unlisten(1, "jobs"), "client 1 is not on it any more");
        assert!(r.is_wanted("jobs"));
        r.fan_out("jobs", &msg(3));
        assert!(a.is_empty(), "an unlistened client gets nothing");
        assert_eq!(taken(&b), [3]);
        let mut emptied = r.unlisten_all(2);
        emptied.sort();
        assert_eq!(emptied, ["jobs", "mail"]);
        assert!(r.is_empty());
        assert_eq!(r.client_count(), 0);
        assert!(r.unlisten_all(2).is_empty());
    }

    #[test]
    fn a_full_inbox_drops_its_oldest_and_says_so_once_per_episode() {
        let mut r = Registry::default();
        let a = Arc::new(Inbox::default());
        r.listen(1, &a, "jobs").unwrap();
        for n in 0..INBOX_CAP as u32 {
            assert_eq!(r.fan_out("jobs", &msg(n)).dropped, 0);
        }
        let out = r.fan_out("jobs", &msg(5000));
        assert_eq!((out.dropped, out.started_overflowing), (1, vec![1]));
        let out = r.fan_out("jobs", &msg(5001));
        assert_eq!((out.dropped, out.started_overflowing), (1, vec![]));
        let got = taken(&a);
        assert_eq!(got.len(), INBOX_CAP);
        assert_eq!(got.first(), Some(&2), "the two oldest went");
        assert_eq!(got.last(), Some(&5001));
        // Taken, the inbox starts a new episode.
        for n in 0..=INBOX_CAP as u32 {
            r.fan_out("jobs", &msg(n));
        }
        assert_eq!(a.push(msg(1)), Pushed::DroppedOldest { first: false });
    }

    #[test]
    fn a_client_cannot_listen_to_more_than_the_cap() {
        let mut r = Registry::default();
        let a = Arc::new(Inbox::default());
        for n in 0..MAX_CHANNELS_PER_CLIENT {
            r.listen(1, &a, &format!("c{n}")).unwrap();
        }
        assert_eq!(r.listen(1, &a, "one_more"), Err(TooManyChannels));
        assert!(!r.is_wanted("one_more"));
        assert_eq!(r.listen(1, &a, "c0"), Ok(false), "a channel it has is fine");
    }

    #[tokio::test]
    async fn a_push_wakes_a_client_that_starts_waiting_later() {
        let a = Inbox::default();
        a.push(msg(1));
        // The permit was stored: this returns at once.
        a.ready.notified().await;
        assert_eq!(taken(&a), [1]);
    }
}
