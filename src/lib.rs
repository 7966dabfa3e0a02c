//! redeliver: an XEP-0114 component that makes message delivery reliable.
//!
//! Data flows one way: [`link`] (the XEP-0114 session) hands stanzas to the
//! [`router`], which accepts, stores ([`store`]), forwards and confirms
//! messages, tracks presence and drives replays, and sends through the
//! link's bounded outbox. See docs/architecture.md.

pub mod address;
pub mod admin;
pub mod app;
pub mod config;
pub mod depthlimit;
pub mod gate;
pub mod handoff;
pub mod link;
pub mod memory;
pub mod message_kind;
pub mod privilege;
pub mod prometheus;
pub mod ratelimit;
pub mod router;
pub mod stats;
pub mod store;
pub mod twin;
pub mod xep0050;
pub mod xmltree;
