//! The store traits for the sled store: each call goes to the inherent
//! method of the same name.

use super::*;
use crate::store::{QueueStore, StoreView};

impl StoreView for SledStore {
    fn totals(&self) -> Result<Totals, StoreError> {
        SledStore::totals(self)
    }
    fn assumed_totals(&self) -> Result<AssumedTotals, StoreError> {
        SledStore::assumed_totals(self)
    }
    fn oldest(&self) -> Result<Option<(String, u64, Record)>, StoreError> {
        SledStore::oldest(self)
    }
    fn top_queues(&self, n: usize) -> Result<Vec<QueueSummary>, StoreError> {
        SledStore::top_queues(self, n)
    }
    fn recipient(&self, recipient: &str) -> Result<RecipientState, StoreError> {
        SledStore::recipient(self, recipient)
    }
    fn recipients(&self) -> Result<Vec<(String, RecipientState)>, StoreError> {
        SledStore::recipients(self)
    }
    fn pending_from(
        &self,
        recipient: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        SledStore::pending_from(self, recipient, from, limit)
    }
    fn count_purgeable(&self, recipient: &str, scope: PurgeScope) -> Result<u64, StoreError> {
        SledStore::count_purgeable(self, recipient, scope)
    }
    fn habit_counts(&self) -> Result<(u64, u64), StoreError> {
        SledStore::habit_counts(self)
    }
    fn next_seq(&self) -> Result<u64, StoreError> {
        SledStore::next_seq(self)
    }
    fn size_on_disk(&self) -> u64 {
        SledStore::size_on_disk(self)
    }
    fn check(&self) -> Result<CheckReport, StoreError> {
        SledStore::check(self)
    }
    fn schema_version(&self) -> u32 {
        SCHEMA_VERSION
    }
    fn remembered(&self, after: Option<u64>, limit: usize) -> Result<Vec<Remembered>, StoreError> {
        SledStore::remembered(self, after, limit)
    }
}

impl QueueStore for SledStore {
    fn begin(&self) {
        SledStore::begin(self)
    }
    fn commit(&self) -> Result<usize, StoreError> {
        SledStore::commit(self)
    }
    fn commit_can_wait(&self) -> bool {
        SledStore::commit_can_wait(self)
    }
    #[cfg(test)]
    fn fail_commits(&self) {
        SledStore::fail_commits(self)
    }
    fn flush(&self) -> Result<usize, StoreError> {
        SledStore::flush(self)
    }
    fn write_shutdown_marker(&self) -> Result<(), StoreError> {
        SledStore::write_shutdown_marker(self)
    }
    fn writable_again(&self) -> bool {
        probe_space(&self.path)
    }
    fn lead(&self, _domain: &str) -> Result<bool, StoreError> {
        Ok(true) // sled's lock already keeps a second process out
    }
    fn still_leads(&self, _domain: &str) -> Result<bool, StoreError> {
        Ok(true)
    }
    fn shared(&self) -> bool {
        false
    }
    fn forward(&self, _stanza: &str, _arrived_us: i64) -> Result<(), StoreError> {
        // Config validation keeps all-active instances off sled.
        Err(StoreError::Database(
            "a sled store is one instance's: there is no leader to hand stanzas to".into(),
        ))
    }
    fn take_forwarded(
        &self,
        _max: usize,
        _upto_us: Option<i64>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(Vec::new())
    }
    fn forwarded_wakeup(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        None
    }
    fn accept(&self, msg: NewMessage<'_>, limits: QueueLimits) -> Result<Accepted, StoreError> {
        SledStore::accept(self, msg, limits)
    }
    fn seq_of(
        &self,
        recipient: &str,
        sender_bare: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        SledStore::seq_of(self, recipient, sender_bare, id)
    }
    fn get(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        SledStore::get(self, recipient, seq)
    }
    fn confirm(&self, recipient: &str, seqs: &[u64]) -> Result<Confirmed, StoreError> {
        SledStore::confirm(self, recipient, seqs)
    }
    fn forget(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        SledStore::forget(self, recipient, seq)
    }
    fn purge(&self, recipient: &str, scope: PurgeScope) -> Result<Vec<u64>, StoreError> {
        SledStore::purge(self, recipient, scope)
    }
    fn expire(&self, cutoff_ms: i64, limit: usize) -> Result<Expired, StoreError> {
        SledStore::expire(self, cutoff_ms, limit)
    }
    fn pending_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        SledStore::pending_from_sender_upto(self, recipient, sender_bare, upto, limit)
    }
    fn contact(&self, recipient: &str, sender_bare: &str) -> Result<Option<Contact>, StoreError> {
        SledStore::contact(self, recipient, sender_bare)
    }
    fn set_contact(
        &self,
        recipient: &str,
        sender_bare: &str,
        contact: Contact,
    ) -> Result<(), StoreError> {
        SledStore::set_contact(self, recipient, sender_bare, contact)
    }
    fn set_subscription(&self, recipient: &str, sub: Subscription) -> Result<(), StoreError> {
        SledStore::set_subscription(self, recipient, sub)
    }
    fn assume(
        &self,
        recipient: &str,
        seqs: &[u64],
        now_ms: i64,
    ) -> Result<Vec<(u64, Record)>, StoreError> {
        SledStore::assume(self, recipient, seqs, now_ms)
    }
    fn restore(&self, recipient: &str, seq: u64) -> Result<Option<Record>, StoreError> {
        SledStore::restore(self, recipient, seq)
    }
    fn prune_assumed(&self, cutoff_ms: i64, limit: usize) -> Result<Pruned, StoreError> {
        SledStore::prune_assumed(self, cutoff_ms, limit)
    }
    fn assumed_from_sender_upto(
        &self,
        recipient: &str,
        sender_bare: &str,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<u64>, StoreError> {
        SledStore::assumed_from_sender_upto(self, recipient, sender_bare, upto, limit)
    }
    fn habits(&self, recipient: &str) -> Result<Vec<(String, Habit)>, StoreError> {
        SledStore::habits(self, recipient)
    }
    fn set_habit(
        &self,
        recipient: &str,
        resource: &str,
        habit: Option<Habit>,
    ) -> Result<(), StoreError> {
        SledStore::set_habit(self, recipient, resource, habit)
    }
    fn is_empty_of_data(&self) -> Result<bool, StoreError> {
        SledStore::is_empty_of_data(self)
    }
    fn skip_seqs_below(&self, next: u64) -> Result<(), StoreError> {
        SledStore::skip_seqs_below(self, next)
    }
    fn import(
        &self,
        recipients: &[(String, Subscription)],
        entries: &[Remembered],
    ) -> Result<(), StoreError> {
        SledStore::import(self, recipients, entries)
    }
}

/// Whether 256 KiB can be written and synced next to the store.
fn probe_space(store: &std::path::Path) -> bool {
    use std::io::Write;
    let probe = store.join(".space-probe");
    let ok = std::fs::File::create(&probe)
        .and_then(|mut f| {
            f.write_all(&vec![0u8; 256 << 10])?;
            f.sync_all()
        })
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}
