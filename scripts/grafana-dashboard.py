#!/usr/bin/env python3
# Writes the Grafana dashboard shipped in component-config/ (its panels are
# described in docs/operating.md, "Metrics"):
#   python3 scripts/grafana-dashboard.py > component-config/grafana-dashboard.json
# tests/metrics.rs checks that every metric it queries is exported.
import json
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
panels = []
def panel(title, kind, exprs, x, y, w=12, h=8, unit="short", desc="", up_is_good=False):
    p = {
        "id": len(panels) + 1,
        "title": title,
        "description": desc,
        "type": kind,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
            for i, (e, l) in enumerate(exprs)
        ],
    }
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "none"}
        # Red below 1 only where 1 means healthy (link, leader); elsewhere
        # the figure is shown without a verdict.
        steps = ([{"color": "red", "value": None}, {"color": "green", "value": 1}]
                 if up_is_good else [{"color": "blue", "value": None}])
        p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": steps}
    panels.append(p)
I = '{instance=~"$instance"}'
def sel(extra=""):
    return '{instance=~"$instance"%s}' % extra
panel("Link up", "stat", [(f"redeliver_link_up{I}", "{{instance}}")], 0, 0, 6, 4,
      desc="1 while the component link to the server is up. 0 on every instance means senders get errors.", up_is_good=True)
panel("Leader", "stat", [(f"redeliver_leader{I}", "{{instance}}")], 6, 0, 6, 4,
      desc="1 on the instance that delivers. With a shared store exactly one should show 1.", up_is_good=True)
panel("Pending messages", "stat", [(f"max(redeliver_pending_messages{I})", "pending")], 12, 0, 6, 4,
      desc="Stored and not yet confirmed (read by the leader).")
panel("Oldest pending", "stat", [(f"max(redeliver_oldest_pending_age_seconds{I})", "age")], 18, 0, 6, 4, unit="s",
      desc="Age of the oldest pending message. It grows while a recipient stays offline; close to message_ttl_s means expiry is near.")
panel("Messages accepted and confirmed", "timeseries", [
    (f"sum(rate(redeliver_messages_accepted_total{I}[5m]))", "accepted"),
    (f"sum by (how) (rate(redeliver_messages_confirmed_total{I}[5m]))", "confirmed by {{how}}"),
], 0, 4, unit="ops",
      desc="Per second. Over time confirmed follows accepted; a gap that stays open is a backlog.")
panel("Sends", "timeseries", [
    (f"sum(rate(redeliver_messages_relayed_total{I}[5m]))", "first sends"),
    (f"sum(rate(redeliver_messages_replayed_total{I}[5m]))", "replays"),
    (f"sum(rate(redeliver_messages_bounced_total{I}[5m]))", "bounces"),
], 12, 4, unit="ops",
      desc="First sends, re-sends (after a bounce, a timeout or a restart) and bounces per second.")
panel("Refused, by condition", "timeseries", [
    (f"sum by (condition) (rate(redeliver_messages_refused_total{I}[5m]))", "{{condition}}"),
], 0, 12, unit="ops",
      desc="Messages refused with an error to their sender. resource-constraint: a limit or the store; policy-violation: size or rate.")
panel("Lost to time or refusal", "timeseries", [
    (f"sum(increase(redeliver_messages_expired_total{I}[1h]))", "expired"),
    (f"sum(increase(redeliver_messages_rejected_total{I}[1h]))", "rejected by the recipient's side"),
    (f"sum(increase(redeliver_messages_purged_total{I}[1h]))", "purged by an admin"),
], 12, 12,
      desc="Per hour: messages removed without being confirmed. Their senders were told.")
panel("Accept to confirm latency", "timeseries", [
    (f"histogram_quantile(0.5, sum by (le) (rate(redeliver_accept_to_confirm_seconds_bucket{I}[5m])))", "p50"),
    (f"histogram_quantile(0.99, sum by (le) (rate(redeliver_accept_to_confirm_seconds_bucket{I}[5m])))", "p99"),
], 0, 20, unit="s",
      desc="From acceptance to receipt, marker or no_receipt. Includes the time a recipient was offline.")
panel("Accept to first send latency", "timeseries", [
    (f"histogram_quantile(0.5, sum by (le) (rate(redeliver_accept_to_relay_seconds_bucket{I}[5m])))", "p50"),
    (f"histogram_quantile(0.99, sum by (le) (rate(redeliver_accept_to_relay_seconds_bucket{I}[5m])))", "p99"),
], 12, 20, unit="s",
      desc="From acceptance to the first send. For an online recipient this is the relay's own delay (the fsync, the window).")
panel("Pending store", "timeseries", [
    (f"max(redeliver_pending_messages{I})", "messages"),
    (f"max(redeliver_pending_recipients{I})", "recipients"),
], 0, 28,
      desc="Pending messages and the recipients they wait for.")
panel("Stored bytes", "timeseries", [
    (f"max(redeliver_pending_bytes{I})", "pending"),
    (f"max(redeliver_kept_bytes{I})", "kept for a late bounce"),
    (f"max(redeliver_pending_bytes{I}) + max(redeliver_kept_bytes{I})", "against max_store_bytes"),
], 12, 28, unit="bytes",
      desc="Bytes of pending stanzas and of those counted delivered without a receipt and kept for a late bounce; new messages are refused when the two together reach limits.max_store_bytes.")
panel("Delivery state", "timeseries", [
    (f"sum(redeliver_recipients_online{I})", "recipients online"),
    (f"sum(redeliver_in_flight_messages{I})", "in flight"),
], 0, 36,
      desc="Recipients the relay sees available, and messages sent awaiting their receipt.")
panel("Store failures and handovers", "timeseries", [
    (f"sum(increase(redeliver_store_failures_total{I}[1h]))", "store failures"),
    (f"sum(rate(redeliver_stanzas_handed_over_total{I}[5m]))", "handed to the leader /s"),
    (f"sum(increase(redeliver_late_bounces_total{I}[1h]))", "late bounces"),
], 12, 36,
      desc="Any store failure makes the instance refuse messages and exit 75 to reopen the store. Handovers: all-active instances.")
dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "__requires": [{"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}],
    "title": "redeliver",
    "uid": "redeliver",
    "description": "redeliver, the reliable-delivery XMPP component: docs/operating.md, Metrics.",
    "tags": ["xmpp", "redeliver"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {"list": [{
        "name": "instance", "label": "Instance", "type": "query", "datasource": DS,
        "query": "label_values(redeliver_link_up, instance)", "refresh": 2,
        "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    }]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
