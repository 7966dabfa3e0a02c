//! `status`: the link, the server, the build and the configuration in use.

use tokio_xmpp::parsers::data_forms::DataFormType;
use tokio_xmpp::parsers::stanza_error::StanzaError;

use crate::admin::{Ops, Step, field, form};

pub(crate) fn run<O: Ops>(ops: &O) -> Result<Step, StanzaError> {
    let snap = ops.snapshot();
    let fields = vec![
        field(
            "link",
            "Component link",
            if snap.link_up_since.is_some() {
                "up"
            } else {
                "down"
            },
        ),
        field(
            "connected-since",
            "Connected since (UTC)",
            snap.link_up_since
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
        ),
        field("server", "Server component listener", snap.server),
        field("domain", "Component domain", snap.domain),
        field("version", "redeliver version", env!("CARGO_PKG_VERSION")),
        field("durability", "Store durability", snap.durability),
        field(
            "config-path",
            "Configuration file",
            snap.config_path.unwrap_or_default(),
        ),
        field("uptime-seconds", "Uptime (s)", snap.uptime.as_secs()),
    ];
    Ok(Step::done(form(
        DataFormType::Result_,
        "redeliver status",
        None,
        fields,
    )))
}
