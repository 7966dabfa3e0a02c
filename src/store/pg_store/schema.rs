//! The PostgreSQL schema, created and migrated by redeliver itself.
//!
//! Every table is named `redeliver_*`, so the store may share a database
//! with the XMPP server's own tables. Text keys use the "C" collation, so
//! that they sort by bytes as sled's keys do. Keys made of parts a sender
//! chooses (a message id, a resource) are unique by their SHA-256
//! (`k`, see `key_digest`): a B-tree entry holds at most 2704 bytes, and
//! an id may be longer. The version is in
//! `redeliver_meta`; a newer one than this build reads is refused, an
//! older one is migrated in one transaction, under an advisory lock so
//! that instances starting together do not migrate twice.
//!
//! | table | one row per |
//! |---|---|
//! | `redeliver_pending` | pending message (the queue: recipient, seq) |
//! | `redeliver_entries` | accepted message still remembered (until its time to live ends) |
//! | `redeliver_dedup` | (recipient, sender, id) or origin-id → the seq that holds it |
//! | `redeliver_recipients` | recipient: subscription and counters |
//! | `redeliver_totals` | (one row) counters over the whole store |
//! | `redeliver_tombstones` | message counted delivered without a receipt |
//! | `redeliver_contacts` | relay contact (recipient, sender) |
//! | `redeliver_habits` | client (recipient, resource): what it does with receipts |
//! | `redeliver_inbox` | stanza an instance that does not lead handed to the leader |

/// Version of the schema below.
pub const SCHEMA_VERSION: u32 = 2;

/// Key of the advisory lock held while the schema is created or migrated.
pub const MIGRATION_LOCK: i64 = 0x7265_6465_6c69_7672; // "redelivr"

pub const META: &str = "CREATE TABLE IF NOT EXISTS redeliver_meta (
    name text COLLATE \"C\" PRIMARY KEY,
    value text NOT NULL
)";

/// Version 1, from nothing.
pub const V1: &str = "
CREATE SEQUENCE redeliver_seq;
CREATE TABLE redeliver_entries (
    seq bigint PRIMARY KEY,
    recipient text COLLATE \"C\" NOT NULL,
    accepted_at_ms bigint NOT NULL
);
CREATE TABLE redeliver_pending (
    recipient text COLLATE \"C\" NOT NULL,
    seq bigint NOT NULL,
    accepted_at_ms bigint NOT NULL,
    sender text NOT NULL,
    id text NOT NULL,
    stanza text NOT NULL,
    PRIMARY KEY (recipient, seq)
);
CREATE UNIQUE INDEX redeliver_pending_seq ON redeliver_pending (seq);
CREATE TABLE redeliver_dedup (
    k bytea PRIMARY KEY,
    recipient text COLLATE \"C\" NOT NULL,
    sender text COLLATE \"C\" NOT NULL,
    origin boolean NOT NULL,
    key text COLLATE \"C\" NOT NULL,
    seq bigint NOT NULL,
    hash bigint
);
CREATE INDEX redeliver_dedup_seq ON redeliver_dedup (seq);
CREATE TABLE redeliver_recipients (
    recipient text COLLATE \"C\" PRIMARY KEY,
    subscription smallint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0
);
CREATE TABLE redeliver_totals (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    pending bigint NOT NULL,
    bytes bigint NOT NULL,
    recipients bigint NOT NULL,
    assumed bigint NOT NULL,
    assumed_bytes bigint NOT NULL
);
INSERT INTO redeliver_totals VALUES (true, 0, 0, 0, 0, 0);
CREATE TABLE redeliver_tombstones (
    recipient text COLLATE \"C\" NOT NULL,
    seq bigint NOT NULL,
    assumed_at_ms bigint NOT NULL,
    accepted_at_ms bigint NOT NULL,
    sender text NOT NULL,
    id text NOT NULL,
    stanza text NOT NULL,
    PRIMARY KEY (recipient, seq)
);
CREATE UNIQUE INDEX redeliver_tombstones_seq ON redeliver_tombstones (seq);
CREATE INDEX redeliver_tombstones_age ON redeliver_tombstones (assumed_at_ms, seq);
CREATE TABLE redeliver_contacts (
    k bytea PRIMARY KEY,
    recipient text COLLATE \"C\" NOT NULL,
    sender text COLLATE \"C\" NOT NULL,
    subscription smallint NOT NULL,
    asked_at_ms bigint NOT NULL
);
CREATE TABLE redeliver_habits (
    k bytea PRIMARY KEY,
    recipient text COLLATE \"C\" NOT NULL,
    resource text COLLATE \"C\" NOT NULL,
    answers smallint NOT NULL,
    missed smallint NOT NULL,
    seen_at_ms bigint NOT NULL
);
CREATE INDEX redeliver_habits_recipient ON redeliver_habits (recipient);
INSERT INTO redeliver_meta VALUES ('schema', '1');
";

/// Version 2: stanzas handed from the instances that do not lead to the
/// one that does, when every instance is connected (`store.instances =
/// "all-active"`). A row lives from the forwarding commit to the leader's
/// commit of the burst that handled it.
pub const V2: &str = "
CREATE TABLE redeliver_inbox (
    id bigserial PRIMARY KEY,
    arrived_us bigint NOT NULL,
    stanza text NOT NULL
);
UPDATE redeliver_meta SET value = '2' WHERE name = 'schema';
";

/// The tables, for sizes and for `store check`.
pub const TABLES: &[&str] = &[
    "redeliver_meta",
    "redeliver_entries",
    "redeliver_pending",
    "redeliver_dedup",
    "redeliver_recipients",
    "redeliver_totals",
    "redeliver_tombstones",
    "redeliver_contacts",
    "redeliver_habits",
    "redeliver_inbox",
];
