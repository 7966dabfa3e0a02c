//! The XEP-0114 link: connect, handshake, keepalive and reconnect.
//!
//! [`Link`] owns the socket. The router reaches it through a bounded outbox
//! and hears from it through a bounded event channel. It knows nothing
//! about relaying. Unlike tokio-xmpp's `Component`, it tells one
//! unparseable stanza (answered by the router, the link stays up) from a
//! dead link (reconnect with capped, jittered backoff).

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_xmpp::Stanza;
use tokio_xmpp::parsers::component::Handshake;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::jid::Jid;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, StreamElementError, StreamHeader, Timeouts, XmppStream,
    XmppStreamElement, initiate_stream,
};
use tracing::{debug, error, info, warn};

use crate::depthlimit::DepthLimit;
use crate::xmltree;

/// Stable readiness line: scripts and tests wait for it.
pub const READY_LINE: &str = "redeliver ready: component link established";

/// Now, in µs since the Unix epoch, and later than every earlier call
/// (a clock stepped back does not reorder what this process read).
pub fn now_us() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering::Relaxed};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_micros();
    let mut prev = LAST.load(Relaxed);
    loop {
        let next = now.max(prev.saturating_add(1));
        match LAST.compare_exchange_weak(prev, next, Relaxed, Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Outbox and event channel capacity.
pub const CHANNEL_CAPACITY: usize = 1024;

/// A stanza for the link to send, tagged with the connection it was meant
/// for: a stanza queued for a link that has since dropped is discarded, so
/// that the router's view of what was sent stays true.
#[derive(Debug)]
pub struct Outbound {
    pub epoch: u64,
    pub stanza: Stanza,
}

/// What the link tells the router.
#[derive(Debug)]
pub enum LinkEvent {
    /// Handshake done; stanzas for this connection carry `epoch`.
    Up { epoch: u64 },
    /// The connection is gone; everything sent on it is in doubt.
    Down,
    /// A stanza, and when it was read (µs since the epoch): all-active
    /// instances order handed-over stanzas among direct ones by it.
    Stanza(Box<Stanza>, i64),
    /// A stanza that did not parse; the router answers it if it can.
    Invalid {
        kind: &'static str,
        from: Option<String>,
        to: Option<String>,
        id: Option<String>,
        type_: Option<String>,
        error: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("handshake refused by server: {0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error("server closed the stream")]
    Closed,
}

pub struct LinkSettings {
    /// The component's domain, sent in the stream header.
    pub domain: String,
    pub server: SocketAddr,
    pub secret: String,
    /// Silence after which a ping goes to the server; the link is declared
    /// dead after as much again with no answer.
    pub keepalive: Duration,
    /// Where keepalive pings go (a domain the server serves).
    pub ping_to: Jid,
    pub reconnect_max: Duration,
}

/// Owns the XEP-0114 connection across reconnects.
pub struct Link {
    /// Connection parameters, fixed for the process lifetime.
    settings: LinkSettings,
    /// Stanzas from the router.
    outbox: mpsc::Receiver<Outbound>,
    /// Events for the router.
    events: mpsc::Sender<LinkEvent>,
    /// Incremented at every successful handshake.
    epoch: u64,
    /// Cancelled once the router has stopped: write what it queued, close.
    shutdown: CancellationToken,
    /// Cancelled at the stop signal: read nothing more from the server,
    /// so that the router can handle all that was read before it stops.
    stop_reading: CancellationToken,
}

/// Reads pass through [`DepthLimit`]: payloads deeper than
/// [`xmltree::MAX_DEPTH`] are cut to one level more than allowed (stream
/// root and stanza come first), which `too_deep` then refuses.
const STREAM_MAX_DEPTH: usize = xmltree::MAX_DEPTH + 3;

type Stream = XmppStream<BufStream<DepthLimit<TcpStream>>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RECONNECT_MIN: Duration = Duration::from_millis(250);

impl Link {
    pub fn new(
        settings: LinkSettings,
        outbox: mpsc::Receiver<Outbound>,
        events: mpsc::Sender<LinkEvent>,
        shutdown: CancellationToken,
        stop_reading: CancellationToken,
    ) -> Link {
        Link {
            settings,
            outbox,
            events,
            epoch: 0,
            shutdown,
            stop_reading,
        }
    }

    /// Run until shutdown: connect, serve, reconnect.
    pub async fn run(mut self) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let shutdown = self.shutdown.clone();
            // While there is no connection, what the router queued was
            // for a lost one (void): drop it, so that the router never
            // waits on a full outbox for a link that is away.
            let connected = {
                let connect = connect(&self.settings);
                tokio::pin!(connect);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = &mut connect => break r,
                        Some(_) = self.outbox.recv() => {}
                    }
                }
            };
            match connected {
                Ok(stream) => {
                    backoff = RECONNECT_MIN;
                    self.epoch += 1;
                    info!(server = %self.settings.server, domain = %self.settings.domain, epoch = self.epoch, "{READY_LINE}");
                    if self
                        .events
                        .send(LinkEvent::Up { epoch: self.epoch })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let result = self.serve(stream).await;
                    if self.events.send(LinkEvent::Down).await.is_err() {
                        return;
                    }
                    match result {
                        Ok(()) => return,
                        Err(e) => warn!(error = %e, "component link lost"),
                    }
                }
                Err(e) => {
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot establish component link")
                }
            }
            // Full jitter in [backoff/2, backoff], so a fleet does not
            // reconnect in lockstep after a server restart.
            let ms = backoff.as_millis() as u64;
            let wait = tokio::time::sleep(Duration::from_millis(rand::random_range(ms / 2..=ms)));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = &mut wait => break,
                    Some(_) = self.outbox.recv() => {}
                }
            }
            backoff = (backoff * 2).min(self.settings.reconnect_max);
        }
    }
    /// Serve one connection. `Ok` means the router is done (shutdown was
    /// requested, or it returned) and the stream was closed cleanly.
    async fn serve(&mut self, mut stream: Stream) -> Result<(), SessionError> {
        // An event read from the stream that the router has not taken yet.
        // While it waits, the outbox keeps draining, so the router (which
        // may be blocked on a full outbox) and the link never wait on each
        // other.
        let mut pending: Option<LinkEvent> = None;
        let mut ping_seq: u64 = 0;
        let (events, shutdown) = (self.events.clone(), self.shutdown.clone());
        let stop_reading = self.stop_reading.clone();
        let result = loop {
            tokio::select! {
                biased;
                // The router has stopped (app.rs cancels this token after
                // it; its channels close when it returns): send what it
                // handed over, then close.
                _ = shutdown.cancelled() => {
                    self.close(&mut stream).await?;
                    break Ok(());
                }
                permit = events.reserve(), if pending.is_some() => {
                    match permit {
                        Ok(p) => p.send(pending.take().expect("guarded by is_some")),
                        Err(_) => {
                            self.close(&mut stream).await?;
                            break Ok(());
                        }
                    }
                }
                out = self.outbox.recv() => {
                    let Some(out) = out else {
                        self.close(&mut stream).await?;
                        break Ok(());
                    };
                    self.write_batch(&mut stream, out).await?;
                }
                // At the stop signal nothing more is read: what the server
                // sends from then on stays with it (or is lost with the
                // stream, as at any stop: XEP-0114 has no acknowledgement),
                // and the router handles all that was read before.
                _ = stop_reading.cancelled(), if !stop_reading.is_cancelled() => {}
                item = stream.next(), if pending.is_none() && !stop_reading.is_cancelled() => {
                    match item {
                        None => break Err(SessionError::Closed),
                        Some(Err(ReadError::SoftTimeout)) => {
                            ping_seq += 1;
                            let iq = Iq::from_get(format!("keepalive-{ping_seq}"), Ping)
                                .with_to(self.settings.ping_to.clone())
                                .with_from(Jid::new(&self.settings.domain).expect("validated domain"));
                            debug!(to = %self.settings.ping_to, "link idle, sending keepalive ping");
                            stream.send(&XmppStreamElement::Stanza(iq.into())).await?;
                        }
                        Some(Err(ReadError::ParseError(e))) => {
                            warn!(error = %e, "dropped an element that did not parse");
                        }
                        Some(Err(ReadError::HardError(e))) => break Err(e.into()),
                        Some(Err(ReadError::StreamFooterReceived)) => break Err(SessionError::Closed),
                        Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(st)))) => {
                            pending = Some(if xmltree::too_deep(&st) {
                                refuse_deep(st)
                            } else {
                                LinkEvent::Stanza(Box::new(st), now_us())
                            });
                        }
                        Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                            error!(condition = ?e.0.condition, text = ?e.0.texts, "server sent a stream error");
                            break Err(SessionError::Closed);
                        }
                        Some(Ok(FallibleStreamElement::Ok(other))) => {
                            warn!(element = ?other, "ignoring unexpected nonza on component stream");
                        }
                        Some(Ok(FallibleStreamElement::Err(StreamElementError::InvalidStanza { name, header, error, .. }))) => {
                            pending = Some(LinkEvent::Invalid {
                                kind: match name.to_string().as_str() {
                                    "message" => "message",
                                    "presence" => "presence",
                                    _ => "iq",
                                },
                                from: header.from,
                                to: header.to,
                                id: header.id,
                                type_: header.type_,
                                error: error.to_string(),
                            });
                        }
                        Some(Ok(FallibleStreamElement::Err(e @ StreamElementError::InvalidNonza { .. }))) => {
                            warn!(error = %e, "dropped an invalid nonza");
                        }
                    }
                }
            }
        };
        // Whatever the router queued for this connection is now void.
        let mut dropped = 0usize;
        while let Ok(out) = self.outbox.try_recv() {
            if out.epoch == self.epoch {
                dropped += 1;
            }
        }
        if dropped > 0 {
            debug!(dropped, "discarded stanzas queued for the lost connection");
        }
        result
    }

    /// The router is done: write what it queued for this connection,
    /// then close the stream.
    async fn close(&mut self, stream: &mut Stream) -> Result<(), SessionError> {
        while let Ok(out) = self.outbox.try_recv() {
            if out.epoch == self.epoch {
                stream.feed(&XmppStreamElement::Stanza(out.stanza)).await?;
            }
        }
        SinkExt::<&XmppStreamElement>::flush(stream).await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.shutdown()).await;
        info!("component stream closed");
        Ok(())
    }

    /// Write `first` and whatever else is queued, then flush once.
    async fn write_batch(
        &mut self,
        stream: &mut Stream,
        first: Outbound,
    ) -> Result<(), SessionError> {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(out) = next {
            if out.epoch == self.epoch {
                stream.feed(&XmppStreamElement::Stanza(out.stanza)).await?;
                n += 1;
            }
            next = if n < 256 {
                self.outbox.try_recv().ok()
            } else {
                None
            };
        }
        SinkExt::<&XmppStreamElement>::flush(stream).await?;
        Ok(())
    }
}

/// A stanza nested too deeply to handle safely: reported as invalid (the
/// router answers it) and taken apart without recursion.
fn refuse_deep(st: Stanza) -> LinkEvent {
    let (kind, from, to, id, type_) = match &st {
        Stanza::Message(m) => (
            "message",
            m.from.as_ref(),
            m.to.as_ref(),
            m.id.as_ref().map(|i| i.0.clone()),
            Some(format!("{:?}", m.type_).to_lowercase()),
        ),
        Stanza::Presence(p) => (
            "presence",
            p.from.as_ref(),
            p.to.as_ref(),
            p.id.clone(),
            None,
        ),
        Stanza::Iq(iq) => {
            let (from, to, id, t) = match iq {
                Iq::Get { from, to, id, .. } => (from, to, id, "get"),
                Iq::Set { from, to, id, .. } => (from, to, id, "set"),
                Iq::Result { from, to, id, .. } => (from, to, id, "result"),
                Iq::Error { from, to, id, .. } => (from, to, id, "error"),
            };
            (
                "iq",
                from.as_ref(),
                to.as_ref(),
                Some(id.clone()),
                Some(t.to_owned()),
            )
        }
    };
    let event = LinkEvent::Invalid {
        kind,
        from: from.map(|j| j.to_string()),
        to: to.map(|j| j.to_string()),
        id,
        type_,
        error: format!("payload nested deeper than {} levels", xmltree::MAX_DEPTH),
    };
    xmltree::dismantle_stanza(st);
    event
}

/// Connect and do the XEP-0114 handshake.
async fn connect(s: &LinkSettings) -> Result<Stream, SessionError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(s.server))
        .await
        .map_err(|_| SessionError::Timeout("connect"))?
        .map_err(|e| SessionError::Connect(s.server, e))?;
    tcp.set_nodelay(true)?;
    let timeouts = Timeouts {
        read_timeout: s.keepalive,
        response_timeout: s.keepalive,
    };
    let handshake = async {
        let mut pending = initiate_stream(
            BufStream::new(DepthLimit::new(tcp, STREAM_MAX_DEPTH)),
            ns::COMPONENT,
            StreamHeader {
                to: Some(Cow::Borrowed(s.domain.as_str())),
                from: None,
                id: None,
            },
            timeouts,
        )
        .await?;
        let stream_id = pending
            .take_header()
            .id
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no stream id"))?
            .into_owned();
        let mut stream: Stream = pending.skip_features();
        let hs = Handshake::from_stream_id_and_password(stream_id, &s.secret);
        stream
            .send(&XmppStreamElement::ComponentHandshake(hs))
            .await?;
        loop {
            match stream.next().await {
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::ComponentHandshake(_)))) => {
                    return Ok(stream);
                }
                Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                    return Err(SessionError::Refused(format!("{:?}", e.0.condition)));
                }
                Some(Ok(other)) => {
                    return Err(SessionError::Refused(format!(
                        "unexpected reply to handshake: {other:?}"
                    )));
                }
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(e)) => return Err(io::Error::other(e.to_string()).into()),
                None => return Err(SessionError::Closed),
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| SessionError::Timeout("handshake"))?
}
