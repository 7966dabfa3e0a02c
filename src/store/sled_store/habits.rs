//! What each of a recipient's clients does with receipt requests, as
//! learned from the receipts it sent (`l` keys).
//!
//! Written only when a receipt or marker confirms a message the relay
//! sent to that client, so a recipient cannot grow these by sending
//! receipts for nothing; and at most [`MAX_HABITS`] per recipient.

use super::Writes;
use super::keys::{decode, encode, recipient_prefix};
use super::{Answers, Habit, MAX_HABITS, SledStore, StoreError};

fn habit_prefix(recipient: &str) -> Vec<u8> {
    recipient_prefix(b'l', recipient)
}

fn habit_key(recipient: &str, resource: &str) -> Vec<u8> {
    let mut k = habit_prefix(recipient);
    k.extend_from_slice(resource.as_bytes());
    k
}

impl SledStore {
    /// Every remembered client of `recipient`, by resource.
    pub fn habits(&self, recipient: &str) -> Result<Vec<(String, Habit)>, StoreError> {
        let prefix = habit_prefix(recipient);
        let mut out = Vec::new();
        for kv in self.scan(&prefix) {
            let (k, v) = kv?;
            let resource = String::from_utf8(k[prefix.len()..].to_vec())
                .map_err(|_| StoreError::Corrupt("habit key is not UTF-8".into()))?;
            out.push((resource, decode(&v, "habit")?));
        }
        Ok(out)
    }

    /// Remember (`Some`) or forget (`None`) what the client at
    /// `resource` does. A new client past [`MAX_HABITS`] replaces the
    /// one heard from longest ago.
    pub fn set_habit(
        &self,
        recipient: &str,
        resource: &str,
        habit: Option<Habit>,
    ) -> Result<(), StoreError> {
        let mut w = Writes::default();
        let k = habit_key(recipient, resource);
        match habit {
            None => w.remove(k),
            Some(h) => {
                if self.read(&k)?.is_none() {
                    let known = self.habits(recipient)?;
                    if known.len() >= MAX_HABITS
                        && let Some((oldest, _)) = known.iter().min_by_key(|(_, h)| h.seen_at_ms)
                    {
                        w.remove(habit_key(recipient, oldest));
                    }
                }
                w.insert(k, encode(&h));
            }
        }
        self.write(w)
    }

    /// How many clients are remembered answering all and answering
    /// contacts only (a scan: for the admin's `stats`).
    pub fn habit_counts(&self) -> Result<(u64, u64), StoreError> {
        let (mut all, mut contacts) = (0, 0);
        for kv in self.scan(b"l") {
            let (_, v) = kv?;
            match decode::<Habit>(&v, "habit")?.answers {
                Answers::All => all += 1,
                Answers::Contacts => contacts += 1,
            }
        }
        Ok((all, contacts))
    }
}
