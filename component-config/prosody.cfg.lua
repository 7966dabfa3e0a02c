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
