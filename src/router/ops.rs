//! The admin commands' view of the router (the `Ops` trait).

use super::*;

impl Ops for Router {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.stats.clone(),
            in_flight: self.peers.in_flight() as u64,
            uptime: self.started.elapsed(),
            link_up_since: self.link_up_since,
            server: self.config.component.server.clone(),
            domain: self.config.component.domain.clone(),
            durability: self.config.store.durability.as_str(),
            config_path: self.config_path.as_ref().map(|p| p.display().to_string()),
        }
    }

    fn store(&self) -> &dyn StoreView {
        &*self.store
    }

    fn resolve(&self, jid: &str) -> Result<String, String> {
        let j = BareJid::from_str(jid).map_err(|e| format!("{jid:?} is not a bare JID: {e}"))?;
        if j.domain().as_str() == self.book.component().as_str() {
            // A relay address stands for the user it reaches.
            return self
                .book
                .user_for(j.node().map(|n| n.as_str()))
                .map(|u| u.to_string())
                .map_err(|e| e.to_string());
        }
        if j.node().is_none() {
            return Err(format!("{jid:?} is a domain, not a recipient"));
        }
        Ok(j.to_string())
    }

    fn attempts(&self, recipient: &str, seq: u64) -> u32 {
        self.peers
            .get(recipient)
            .and_then(|p| p.attempts.get(&seq).copied())
            .unwrap_or(0)
    }

    fn now_ms(&self) -> i64 {
        now_ms()
    }

    async fn replay(&mut self, recipient: &str) -> Result<(u64, u64), String> {
        let pending = self
            .store
            .recipient(recipient)
            .map_err(|e| e.to_string())?
            .pending;
        if pending == 0 {
            return Ok((0, 0));
        }
        if self.epoch.is_none() {
            return Err("the component link is down".into());
        }
        let initial = self.config.retry_initial();
        let peer = self.peers.entry(recipient, initial);
        // Whatever was in flight goes again, from the head of the queue.
        peer.halt(&mut self.timers);
        peer.phase = Phase::Sending;
        peer.backoff = initial;
        peer.forced = true;
        info!(
            to = recipient,
            pending, "replay requested by an administrator"
        );
        let sent = self.pump(recipient).await;
        Ok((sent as u64, pending))
    }

    async fn purge(&mut self, recipient: &str, scope: PurgeScope) -> Result<u64, String> {
        let seqs = self
            .store
            .purge(recipient, scope)
            .map_err(|e| e.to_string())?;
        if !seqs.is_empty() {
            self.gate.removed();
        }
        for seq in &seqs {
            self.peers.removed(recipient, *seq, &mut self.timers);
        }
        self.stats.purged(seqs.len() as u64);
        info!(
            to = recipient,
            purged = seqs.len(),
            "purged by an administrator"
        );
        // Room in the window may have opened.
        self.pump(recipient).await;
        Ok(seqs.len() as u64)
    }

    fn reload(&mut self) -> Result<Vec<String>, String> {
        let Some(path) = self.config_path.clone() else {
            return Err("this instance was started without a config file".into());
        };
        let new = Config::load(&path).map_err(|e| e.to_string())?;
        let changes = self.config.changes(&new);
        let fixed: Vec<&str> = changes
            .iter()
            .filter(|c| c.needs_restart())
            .map(|c| c.key.as_str())
            .collect();
        if !fixed.is_empty() {
            return Err(format!(
                "{} can only change with a restart",
                fixed.join(", ")
            ));
        }
        self.book = address_book(&new);
        self.rate
            .set(new.limits.sender_rate_per_s, new.limits.sender_burst);
        self.config = Arc::new(new);
        let lines: Vec<String> = changes.iter().map(ToString::to_string).collect();
        info!(changes = ?lines, "configuration reloaded");
        Ok(lines)
    }
}
