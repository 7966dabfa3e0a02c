-- Prosody: register redeliver as an external component (XEP-0114).
-- Add to /etc/prosody/prosody.cfg.lua (or a file in conf.d/), then
-- `prosodyctl reload` or restart Prosody.

-- Listen for components on loopback only; redeliver runs on the same host.
component_ports = { 5347 }
component_interfaces = { "127.0.0.1" }

Component "relay.example.com"
    -- The same secret redeliver gets through REDELIVER_SECRET or secret_file.
    component_secret = "CHANGE-ME"
    -- Privileged mode (XEP-0356, optional): see the VirtualHost part below.
    -- mod_privilege must be enabled here too, or the server refuses the
    -- component's roster sets with <forbidden/>.
    -- modules_enabled = { "privilege" }

-- Privileged mode (XEP-0356, optional; Debian: apt-get install
-- prosody-modules). In the VirtualHost section of the domain your users
-- are on: the relay then puts each correspondent's relay address into the
-- recipient's roster with subscription "both" (no prompt, and clients that
-- answer receipts only to contacts answer it), and gets users' presence
-- without subscribing. Grant no more than this: "both" would let it read
-- every roster, and a message permission would let it write as any user.
-- Leave both parts out to run without privileges: the relay then asks
-- each recipient to approve (docs/operating.md).
--
-- VirtualHost "example.com"
--     modules_enabled = { "privilege" }
--     privileged_entities = {
--         ["relay.example.com"] = { roster = "set"; presence = "managed_entity"; };
--     }

-- Server offline storage (mod_offline) may stay on: redeliver confirms the
-- server's own offline copy by its receipt and does not replay it.

-- Transparent mode (optional; docs/transparent.md): senders write to the
-- real address (bob@example.com) and mod_redeliver hands redeliver each
-- message Prosody would store offline, then removes Prosody's copy once
-- redeliver holds it. It needs privileged mode with the message permission
-- (redeliver replays as the original sender, so it can write as any user
-- of the domain) and mod_offline, which stays on and delivers whatever
-- redeliver does not take. Put component-config/prosody/mod_redeliver.lua
-- in a directory of its own; in the global section:
--
-- plugin_paths = { "/usr/local/lib/prosody/redeliver" }
--
-- and instead of the VirtualHost part above:
--
-- VirtualHost "example.com"
--     modules_enabled = { "privilege", "redeliver" }
--     privileged_entities = {
--         ["relay.example.com"] = { roster = "set"; message = "outgoing"; presence = "managed_entity"; };
--     }
--     redeliver_component = "relay.example.com"
--     -- Seconds to wait for redeliver's answer before Prosody keeps the
--     -- message.
--     -- redeliver_handoff_timeout = 30
--     -- Seconds a login waits for the copies it hands off again before
--     -- Prosody delivers them itself (the recipient's stream waits).
--     -- redeliver_login_timeout = 5
--     -- Seconds after a replay during which the recipient's receipts and
--     -- markers to its sender are copied to redeliver.
--     -- redeliver_confirmation_window = 86400
--
-- Enable it on every VirtualHost whose users send or receive through the
-- relay: a replay is recognised on the recipient's host, and its sender's
-- host keeps it out of the sender's archive and carbons.
