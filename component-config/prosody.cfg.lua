-- Prosody: register redeliver as an external component (XEP-0114).
-- Add to /etc/prosody/prosody.cfg.lua (or a file in conf.d/), then
-- `prosodyctl reload` or restart Prosody.

-- Listen for components on loopback only; redeliver runs on the same host.
component_ports = { 5347 }
component_interfaces = { "127.0.0.1" }

Component "relay.example.com"
    -- The same secret redeliver gets through REDELIVER_SECRET or secret_file.
    component_secret = "CHANGE-ME"

-- Server offline storage (mod_offline) may stay on: redeliver confirms the
-- server's own offline copy by its receipt and does not replay it.
