//! iq stanzas: disco answers, XEP-0050 commands, and the relay's own queries.

use super::*;

impl Router {
    pub(super) async fn on_iq(&mut self, iq: Iq) {
        let to = match &iq {
            Iq::Get { to, .. }
            | Iq::Set { to, .. }
            | Iq::Result { to, .. }
            | Iq::Error { to, .. } => to,
        };
        if to
            .as_ref()
            .is_some_and(|t| t.domain().as_str() != self.book.component().as_str())
        {
            // An answer would carry a foreign `from`, which ends the link.
            debug!(?to, "iq for another domain dropped");
            return;
        }
        match iq {
            Iq::Result {
                id, payload, from, ..
            } => {
                if self.on_roster_set_answer(&id, from.as_ref(), None).await {
                    return;
                }
                let Some(q) = self.take_disco(&id, from.as_ref()) else {
                    return;
                };
                let supports = payload
                    .and_then(|p| DiscoInfoResult::try_from(p).ok())
                    .map(|info| info.features.contains(ns::RECEIPTS));
                if let Some(peer) = self.peers.get_mut(&q.recipient)
                    && let Some(r) = peer.resources.get_mut(&q.resource)
                {
                    r.receipts = supports;
                    debug!(to = %q.recipient, resource = %q.resource, ?supports, "receipt support");
                }
            }
            Iq::Error {
                id, from, error, ..
            } => {
                if self
                    .on_roster_set_answer(&id, from.as_ref(), Some(&error))
                    .await
                {
                    return;
                }
                self.take_disco(&id, from.as_ref());
            }
            Iq::Get {
                from,
                to,
                id,
                payload,
            } => {
                let from_us = from
                    .as_ref()
                    .is_some_and(|f| f.domain().as_str() == self.book.component().as_str());
                if from_us
                    && payload.is("ping", ns::PING)
                    && let Some(verdict) = self.instance.judge(&id)
                {
                    // Not answered: the answer could reach the other one.
                    self.on_twin_probe(verdict).await;
                    return;
                }
                let reply = self.answer_get(&from, &to, &payload);
                self.reply_iq(from, to, id, reply).await;
            }
            Iq::Set {
                from,
                to,
                id,
                payload,
            } => {
                let to_domain = to.as_ref().is_some_and(|t| t.node().is_none());
                if to_domain
                    && payload.is("handoff", handoff::NS)
                    && let Some(server) = from.clone()
                {
                    self.on_handoff(server, to, id, payload).await;
                    return;
                }
                let reply = match &from {
                    Some(f) if to_domain && payload.is("command", COMMANDS) => {
                        self.on_command(f, payload).await
                    }
                    _ => Err(no_such_service()),
                };
                self.reply_iq(from, to, id, reply).await;
            }
        }
    }

    /// The disco#info query `id` answered by `from`: only the full JID it
    /// was sent to may answer it (anyone else's answer is ignored).
    pub(super) fn take_disco(&mut self, id: &str, from: Option<&Jid>) -> Option<DiscoQuery> {
        let q = self.disco_pending.get(id)?;
        if from != Some(&q.to) {
            warn!(?from, expected = %q.to, "disco#info answer from the wrong sender ignored");
            return None;
        }
        self.disco_pending.remove(id)
    }

    pub(super) fn is_admin(&self, from: Option<&Jid>) -> bool {
        let Some(from) = from else { return false };
        let bare = from.to_bare();
        self.config
            .admin
            .jids
            .iter()
            .any(|j| BareJid::from_str(j).is_ok_and(|j| j == bare))
    }

    /// An XEP-0050 request to the bare domain.
    pub(super) async fn on_command(
        &mut self,
        from: &Jid,
        payload: Element,
    ) -> Result<Option<Element>, StanzaError> {
        let admin = self.is_admin(Some(from));
        let node = payload.attr("node").unwrap_or_default().to_owned();
        let timeout = Duration::from_secs(self.config.admin.session_timeout_s);
        // The sessions live beside the router, which the commands borrow.
        let mut sessions = std::mem::take(&mut self.admin);
        let out = sessions
            .handle_element(self, from, admin, timeout, payload)
            .await;
        self.admin = sessions;
        match &out {
            Ok(c) => info!(%from, node, status = ?c.status, "admin command"),
            Err(e) => info!(%from, node, condition = ?e.defined_condition, "admin command refused"),
        }
        out.map(|c| Some(c.into()))
    }

    /// The result of an iq get, or the error to answer.
    #[allow(clippy::result_large_err)] // the error is the reply itself
    pub(super) fn answer_get(
        &self,
        from: &Option<Jid>,
        to: &Option<Jid>,
        payload: &Element,
    ) -> Result<Option<Element>, StanzaError> {
        let to_domain = to.as_ref().is_some_and(|t| t.node().is_none());
        if payload.is("ping", ns::PING) {
            return Ok(None);
        }
        if !to_domain {
            return Err(no_such_service());
        }
        let node = payload.attr("node");
        if payload.is("query", ns::DISCO_INFO) {
            let (identity, features): (_, &[&str]) = match node {
                None => (
                    Identity::new("component", "generic", "en", "redeliver"),
                    &[
                        ns::DISCO_INFO,
                        ns::DISCO_ITEMS,
                        COMMANDS,
                        ns::PING,
                        ns::RECEIPTS,
                        ns::SID,
                    ],
                ),
                // XEP-0050 §2.3: a command node describes itself.
                Some(n) if self.is_admin(from.as_ref()) && Node::from_name(n).is_some() => (
                    Identity::new(
                        "automation",
                        "command-node",
                        "en",
                        Node::from_name(n).map_or("", Node::title),
                    ),
                    &[COMMANDS, ns::DATA_FORMS],
                ),
                Some(_) => {
                    return Err(stanza_error(
                        ErrorType::Cancel,
                        DefinedCondition::ItemNotFound,
                        "no such node",
                    ));
                }
            };
            let info = DiscoInfoResult {
                node: node.map(String::from),
                identities: vec![identity],
                features: features.iter().map(|f| f.to_string()).collect(),
                extensions: vec![],
            };
            return Ok(Some(info.into()));
        }
        if payload.is("query", ns::DISCO_ITEMS) {
            // Commands are listed to admins only; others see none.
            let items = if node == Some(COMMANDS) && self.is_admin(from.as_ref()) {
                Node::ALL
                    .iter()
                    .map(|n| DiscoItem {
                        jid: self.me.clone(),
                        node: Some(n.name().to_owned()),
                        name: Some(n.title().to_owned()),
                    })
                    .collect()
            } else {
                vec![]
            };
            let items = DiscoItemsResult {
                node: node.map(String::from),
                items,
                rsm: None,
            };
            return Ok(Some(items.into()));
        }
        Err(no_such_service())
    }

    pub(super) async fn reply_iq(
        &mut self,
        from: Option<Jid>,
        to: Option<Jid>,
        id: String,
        reply: Result<Option<Element>, StanzaError>,
    ) {
        let Some(from) = from else { return };
        if id.len() > sizes::MAX_ID_BYTES {
            // Written back (up to five times its length escaped) it could
            // pass the server's limit and close the link.
            warn!(%from, bytes = id.len(), "iq with an id over the cap not answered");
            return;
        }
        let our = to.unwrap_or_else(|| self.me.clone());
        let iq = match reply {
            Ok(payload) => {
                let iq = Iq::Result {
                    from: Some(our.clone()),
                    to: Some(from.clone()),
                    id: id.clone(),
                    payload,
                };
                // Measured whole, as it will be written (iqs are few: a
                // ping, disco, an admin command's table).
                if sizes::written_len(&iq) > self.config.limits.max_stanza_bytes {
                    let e = stanza_error(
                        ErrorType::Wait,
                        DefinedCondition::ResourceConstraint,
                        "the answer would be too large",
                    );
                    Iq::from_error(id, e).with_from(our).with_to(from)
                } else {
                    iq
                }
            }
            Err(e) => Iq::from_error(id, e).with_from(our).with_to(from),
        };
        self.send(iq).await;
    }
}
