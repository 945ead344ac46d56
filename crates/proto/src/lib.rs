#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

//! The PostgreSQL wire format as Breakwater needs it: find message boundaries with a size cap
//! checked *before* anything is allocated, parse the few messages the pooler must understand, and
//! write the messages it sends. This crate never does I/O and never decides policy: it turns bytes
//! into messages and messages into bytes.

pub mod auth;
pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod startup;

pub use error::{PgError, SqlState};
pub use frame::{FrameError, Message};

/// Default cap on one protocol message (PgBouncer's `pkt_buf` is smaller; Postgres allows 1 GB).
/// Larger messages are refused with 08P01 before any buffer grows to hold them.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;
