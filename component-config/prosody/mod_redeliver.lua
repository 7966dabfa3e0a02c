-- mod_redeliver: transparent mode for redeliver (an XEP-0114 component).
--
-- Hands redeliver each message this server would store offline, believes
-- redeliver's replays (XEP-0356) only when they come from it, and copies to
-- it the recipients' receipts for those replays. The contract, stanza by
-- stanza, is docs/transparent.md; the Prosody behaviour it relies on is in
-- SERVER-FACTS.md ("Transparent mode").
--
-- plugin_paths = { "/dir/holding/this/file" }   -- global section
-- VirtualHost "example.com"
--     modules_enabled = { "privilege", "redeliver" }   -- and mod_offline on
--     privileged_entities = { ["relay.example.com"] = { message = "outgoing"; ... } }
--     redeliver_component = "relay.example.com"
--     -- optional: redeliver_handoff_timeout = 30          (seconds)
--     --           redeliver_login_timeout = 5             (seconds)
--     --           redeliver_confirmation_window = 86400   (seconds)

local st = require "util.stanza";
local jid = require "util.jid";
local new_id = require "util.id".medium;
local async = require "util.async";
local parse_xml = require "util.xml".parse;
local time_now = require "util.time".now;

local NS = "urn:redeliver:handoff:0";
local NS_PRIVILEGE = "urn:xmpp:privilege:2";
local NS_FORWARD = "urn:xmpp:forward:0";
local NS_DELAY = "urn:xmpp:delay";
local NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas";
local NS_RECEIPTS = "urn:xmpp:receipts";
local NS_MARKERS = "urn:xmpp:chat-markers:0";
local MARKERS = { received = true, displayed = true, acknowledged = true };

-- mod_offline's store keeps an item's `with`; ours say "this copy was handed
-- off", so nothing in the stanza a client later receives carries the mark.
local HANDOFF_WITH = "redeliver";

-- module:send_iq() tracks at most 256 iqs per host and fails the oldest
-- beyond that; staying well below keeps a burst from losing answers.
local MAX_IN_FLIGHT = 128;
-- A connected but silent component answers nothing: past this many waiting
-- hand-offs the copy just stays, and is handed off at the recipient's login.
-- (A burst of 10,000 to a component that answers had at most ~500 waiting.)
local MAX_QUEUED = 2000;

local host = module.host;
local component = module:get_option_string("redeliver_component");
local timeout = module:get_option_number("redeliver_handoff_timeout", 30);
-- How long a login waits for the copies it hands off again (the user's own
-- stream waits; past this, mod_offline delivers what was not answered).
local login_timeout = module:get_option_number("redeliver_login_timeout", 5);
local window = module:get_option_number("redeliver_confirmation_window", 86400);

if not component then
	module:log("error", "redeliver_component is not set; nothing is handed off");
	return;
end

-- The copy this module stores is delivered by mod_offline when redeliver does
-- not take it: without mod_offline it would be kept and never delivered.
module:depends("offline");
local store = module:open_store("offline", "archive");

local full_sessions, bare_sessions = prosody.full_sessions, prosody.bare_sessions;

-- A replay is posted by mod_privilege synchronously, from inside the
-- component's message/host event, and may reach a recipient on another host:
-- the replay being dispatched is shared by every host running this module.
local replaying = module:shared("/*/redeliver/replaying");

local function log_error(what, err)
	module:log("error", "%s: %s", what, tostring(err));
end

-- A Lua error in a stanza handler drops the stanza: log it and let the
-- server go on as if this module were not there.
local function safe(what, f)
	return function (...)
		local ok, ret = pcall(f, ...);
		if ok then return ret; end
		log_error(what, ret);
	end;
end

local function stamp(t)
	local s = math.floor(t);
	return os.date("!%Y-%m-%dT%H:%M:%S", s) .. (".%03dZ"):format(math.floor((t - s) * 1000));
end

-- Only the component may mark a replay; anything else loses the mark.
local function strip_marks(stanza)
	if stanza:get_child(nil, NS) then
		stanza:maptags(function (tag)
			if tag.attr.xmlns ~= NS then return tag; end
		end);
		return true;
	end
end

local function chat_or_normal(stanza)
	local t = stanza.attr.type or "normal";
	return stanza.name == "message" and (t == "chat" or t == "normal");
end

-- The replay being dispatched, if this stanza is it.
local function replay_of(stanza)
	local r = replaying.current;
	if r and stanza.attr.id == r.id and jid.bare(stanza.attr.from) == r.from then
		return r;
	end
end

---------------------------------------------------------------------------
-- Hand-offs: never more than MAX_IN_FLIGHT unanswered; logins go first,
-- since a recipient waits for those.

-- Two FIFOs (head/tail indices: a burst may queue thousands).
local function fifo() return { head = 1, tail = 0 }; end
local queue = { first = fifo(), later = fifo() };
local in_flight, pumping, queue_full = 0, false, nil;

local function handoff_iq(job)
	local message = job.xml and assert(parse_xml(job.xml)) or st.clone(job.stanza);
	message.attr.xmlns = "jabber:client";
	return st.iq({ type = "set", from = host, to = component, id = new_id() })
		:tag("handoff", { xmlns = NS })
			:tag("forwarded", { xmlns = NS_FORWARD })
				:tag("delay", { xmlns = NS_DELAY, stamp = stamp(job.when) }):up()
				:add_child(message)
		:reset();
end

local pump;

local unanswered = {}; -- settle functions of the hand-offs in flight

local function send_handoff(job)
	job.sent = true;
	in_flight = in_flight + 1;
	local settled = false;
	local function settle(taken, why)
		if settled then return; end
		settled = true;
		unanswered[settle] = nil;
		in_flight = in_flight - 1;
		module:log(taken and "debug" or "info", "Hand-off of %s for %s: %s",
			tostring(job.id), job.node, taken and "taken" or tostring(why));
		local ok, err = pcall(job.done, taken);
		if not ok then log_error("after hand-off", err); end
		pump();
	end
	unanswered[settle] = true;
	local ok, p = pcall(function () return module:send_iq(handoff_iq(job), nil, timeout); end);
	if not ok then return settle(false, p); end
	-- With the component away send_iq resolves with an error stanza; only a
	-- result means redeliver holds the message.
	p:next(function (event)
		local reply = event and event.stanza;
		local t = reply and reply.attr.type;
		settle(t == "result", t == "error" and select(2, reply:get_error()) or t);
	end, function (err)
		settle(false, type(err) == "table" and err.condition or err);
	end);
end

function pump()
	if pumping then return; end -- an answer settled inside send_handoff
	pumping = true;
	while in_flight < MAX_IN_FLIGHT do
		local q = queue.first.head <= queue.first.tail and queue.first or queue.later;
		if q.head > q.tail then break; end
		local job = q[q.head];
		q[q.head], q.head = nil, q.head + 1;
		if q == queue.later and q.head > q.tail then queue_full = nil; end
		if not job.cancelled then
			local ok, err = pcall(send_handoff, job);
			if not ok then log_error("hand-off", err); end
		end
	end
	pumping = false;
end

local function hand_off(job, urgent)
	local q = urgent and queue.first or queue.later;
	if not urgent and q.tail - q.head + 1 >= MAX_QUEUED then
		if not queue_full then
			queue_full = true; -- once, not for every message
			module:log("warn", "%d hand-offs waiting for %s; new copies stay until their recipient's login",
				MAX_QUEUED, component);
		end
		return;
	end
	job.id = job.stanza.attr.id;
	if in_flight >= MAX_IN_FLIGHT then
		-- A stanza is many tables for the GC to go through on every cycle:
		-- 10,000 waiting ones made every stanza on the server cost about
		-- twice the CPU. A string is one object.
		job.xml, job.stanza = tostring(job.stanza), nil;
	end
	q.tail = q.tail + 1;
	q[q.tail] = job;
	pump();
end

-- Hand-offs in flight when the component goes are never answered: fail them
-- now, rather than hold every slot (and a login) until they time out.
local function component_gone()
	local settles = {};
	for settle in pairs(unanswered) do settles[#settles + 1] = settle; end
	if #settles > 0 then
		module:log("info", "%s disconnected: %d hand-offs unanswered, their copies stay", component, #settles);
	end
	-- Its session still sends until this event is over: queue, don't send.
	pumping = true;
	for _, settle in ipairs(settles) do settle(false, "component disconnected"); end
	pumping = false;
	module:add_timer(0, function () pump(); end);
end
local function watch_component(h)
	if h == component then
		module:context(component):hook("component-disconnected", safe("disconnect", component_gone));
	end
end
if prosody.hosts[component] then watch_component(component); end
module:hook_global("host-activated", watch_component);

local function delete_copy(node, key)
	-- Only the key: mod_storage_internal deletes what matches any one field.
	local ok, err = store:delete(node, { key = key });
	if not ok then
		module:log("warn", "Could not remove the copy %s for %s (mod_offline will deliver it): %s",
			key, node, tostring(err));
	end
end

-- Removing one item rewrites mod_storage_internal's whole list, so answers
-- are removed in batches: one at a time, 10,000 messages to one offline user
-- kept the server busy for 199 s (2.7 s without this module).
local storagemanager = require "core.storagemanager";
local internal = select(2, storagemanager.get_driver(host, "offline")) == "internal";
local dm = storagemanager.olddm;
local taken_keys, flush_timers, flush_cost, logging_in = {}, {}, {}, {};

local function flush(node)
	local keys = taken_keys[node];
	taken_keys[node] = nil;
	if flush_timers[node] then flush_timers[node]:stop(); flush_timers[node] = nil; end
	if not keys then return; end
	local started = time_now();
	-- The last one through the store, which keeps its item count (quota) right.
	local last = next(keys);
	keys[last] = nil;
	if next(keys) and internal then
		local items, err = dm.list_load(node, host, "offline");
		if items then
			local kept = {};
			for _, item in ipairs(items) do
				if not keys[item.key] then kept[#kept + 1] = item; end
			end
			if #kept < #items and not dm.list_store(node, host, "offline", kept) then
				module:log("warn", "Could not remove %d copies for %s (mod_offline will deliver them)", #items - #kept, node);
			end
		elseif err then
			module:log("warn", "Could not read the copies for %s: %s", node, tostring(err));
		end
	else
		for key in pairs(keys) do delete_copy(node, key); end
	end
	delete_copy(node, last);
	flush_cost[node] = time_now() - started;
end

local function remove_copy(node, key)
	local keys = taken_keys[node];
	if not keys then keys = {}; taken_keys[node] = keys; end
	keys[key] = true;
	-- A login removes what it got answered at once, when it is done.
	if logging_in[node] then return; end
	-- A big list costs more to rewrite: then less often, at most ~10% busy.
	local delay = math.max(0.5, 10 * (flush_cost[node] or 0));
	flush_timers[node] = flush_timers[node] or module:add_timer(delay, function ()
		flush_timers[node] = nil;
		local ok, err = pcall(flush, node);
		if not ok then log_error("removing copies", err); end
	end);
end

-- Stopping or unloading: what was answered goes now, or its copy would
-- outlive the stop and be delivered by mod_offline as well as replayed.
local function flush_all()
	for node in pairs(taken_keys) do
		local ok, err = pcall(flush, node);
		if not ok then log_error("removing copies", err); end
	end
end
module:hook_global("server-stopping", flush_all);
function module.unload() flush_all(); end

---------------------------------------------------------------------------
-- 1. A message the server would store offline.

-- redeliver's answer to a replay nobody could receive: it replays again when
-- presence shows the recipient back.
local function replay_unavailable(to, from, id)
	module:send(st.message({ type = "error", from = to, to = component, id = id })
		:tag("replay", { xmlns = NS, from = from }):up()
		:tag("error", { type = "wait" })
			:tag("recipient-unavailable", { xmlns = NS_STANZAS }));
end


module:hook("message/offline/handle", safe("offline message", function (event)
	local stanza, origin, node = event.stanza, event.origin, event.username;
	if not (stanza and node and chat_or_normal(stanza)) then return; end
	local to_bare = jid.bare(stanza.attr.to) or (node .. "@" .. host);
	local from = jid.bare(stanza.attr.from);

	local replay = replay_of(stanza);
	-- A replay delivered to a session that then timed out (mod_smacks hands
	-- back its clone): it still carries the mark `incoming` put on it, and
	-- no user's stanza reaches here with one (their marks are removed).
	if not replay and stanza:get_child("replay", NS) and origin and origin.type == "c2s"
	and origin.username == node and origin.host == host then
		replay = { from = from, id = stanza.attr.id };
	end
	if replay then
		module:log("debug", "Replay %s to %s undelivered; telling redeliver", tostring(replay.id), to_bare);
		replay_unavailable(to_bare, replay.from, replay.id);
		return true;
	end

	-- Only a user can be replayed as; redeliver retries what it sent itself
	-- (relay addresses). The rest is mod_offline's.
	local from_node, from_host = jid.split(from);
	if not from_node or from_host == component then return; end
	-- The recipient is logging in: mod_offline delivers this one in a moment
	-- (handed off now, it could be replayed as well).
	if logging_in[node] then return; end

	if not stanza.attr.id then stanza.attr.id = new_id(); end
	local key, err = store:append(node, nil, stanza, os.time(), HANDOFF_WITH);
	if not key then
		module:log("warn", "Could not store %s for %s, leaving it to mod_offline: %s",
			stanza.attr.id, node, tostring(err));
		return;
	end
	-- The sender's stream goes on now: the answer only removes the copy.
	hand_off({ node = node, key = key, stanza = stanza, when = time_now(), done = function (taken)
		if taken then remove_copy(node, key); end
	end });
	return true;
end), -0.5); -- below mod_cloud_notify (1), which pushes and goes on; above mod_offline (-1)

---------------------------------------------------------------------------
-- 4. The recipient logs in: copies still held are handed off again first.
-- Below mod_mam (0), which stops the broadcast for clients that read their
-- archive; above mod_offline (-1), which delivers and removes what is left.

module:hook("message/offline/broadcast", safe("login", function (event)
	local origin = event.origin;
	local node = origin and origin.username;
	if not node then return; end
	local iter, err = store:find(node, { with = HANDOFF_WITH });
	if not iter then
		module:log("warn", "Could not read the copies for %s: %s", node, tostring(err));
		return;
	end
	local jobs = {};
	for key, stanza, when in iter do
		jobs[#jobs + 1] = { node = node, key = key, stanza = stanza, when = when or os.time() };
	end
	if #jobs == 0 then return; end
	for _, q in pairs(queue) do
		for i = q.head, q.tail do
			if q[i].node == node then q[i].cancelled = true; end -- handed off below
		end
	end
	if not async.ready() then
		module:log("warn", "No async context at %s's login: mod_offline delivers %d copies", node, #jobs);
		return;
	end

	local wait, done = async.waiter();
	local remaining, taken, finished = #jobs, 0, false;
	logging_in[node] = true;
	local function finish()
		if finished then return; end
		finished = true;
		-- What is still waiting now is mod_offline's to deliver.
		for _, job in ipairs(jobs) do
			if not job.sent then job.cancelled = true; end
		end
		done();
	end
	for _, job in ipairs(jobs) do
		job.done = function (ok)
			if ok then
				taken = taken + 1;
				remove_copy(node, job.key);
			end
			remaining = remaining - 1;
			if remaining == 0 then finish(); end
		end;
		hand_off(job, true);
	end
	-- The recipient's own stream waits, not a sender's; still bounded.
	local timer = module:add_timer(login_timeout, finish);
	wait();
	timer:stop();
	logging_in[node] = nil;
	flush(node); -- before mod_offline reads the store
	module:log("info", "%s logged in: %d held copies handed off again, %d taken, %d left to mod_offline",
		node, #jobs, taken, #jobs - taken);
end), -0.5);

---------------------------------------------------------------------------
-- 2. Replays: the component sends them through mod_privilege, which posts
-- the inner message from inside this event. While it does, the replay is
-- `replaying.current`, wherever it goes.

local function replay_info(event)
	local origin, stanza = event.origin, event.stanza;
	local privilege = stanza:get_child("privilege", NS_PRIVILEGE);
	local forwarded = privilege and privilege:get_child("forwarded", NS_FORWARD);
	local inner = forwarded and forwarded:get_child("message", "jabber:client");
	if not inner then return; end
	local marked = inner:get_child("replay", NS);
	if not strip_marks(inner) then return; end -- no mark: the component sending as a user
	if not (marked and origin and origin.type == "component" and origin.host == component) then
		module:log("warn", "Ignoring a replay mark from %s", tostring(stanza.attr.from));
		return;
	end
	return { from = jid.bare(inner.attr.from), to = inner.attr.to, id = inner.attr.id };
end

module:wrap_event("message/host", function (handlers, name, event)
	local ok, info = pcall(replay_info, event);
	if not ok then log_error("replay", info); end
	if not (ok and info) then return handlers(name, event); end
	local outer = replaying.current;
	replaying.current = info;
	local done, ret = pcall(handlers, name, event);
	replaying.current = outer;
	if not done then error(ret, 0); end
	return ret;
end);

-- (recipient, sender) pairs of delivered replays, for confirmation copies.
local replayed = {};

local function deliverable(to)
	-- mod_message's rule: a full JID's session, else the top resources.
	if full_sessions[to] then return true; end
	local user = bare_sessions[jid.bare(to)];
	return user and user.top_resources and #user.top_resources > 0;
end

local function incoming(event)
	local stanza = event.stanza;
	if stanza.name ~= "message" then return; end
	local replay = replay_of(stanza);
	if not replay then
		if strip_marks(stanza) then
			module:log("warn", "Removed a replay mark from %s to %s", tostring(stanza.attr.from), tostring(stanza.attr.to));
		end
		return;
	end
	replay.delivering = true;
	local to = stanza.attr.to;
	if not to then return; end
	local to_bare = jid.bare(to);
	if not deliverable(to) then
		-- Not stored, not handed off: redeliver keeps it and replays later.
		module:log("debug", "Replay %s to offline %s dropped", tostring(replay.id), to_bare);
		replay_unavailable(to_bare, replay.from, replay.id);
		return true;
	end
	local senders = replayed[to_bare];
	if not senders then senders = {}; replayed[to_bare] = senders; end
	senders[replay.from] = os.time();
	module:log("debug", "Replay %s from %s delivered to %s", tostring(replay.id), replay.from, to);
	-- Marked for mod_smacks' path: if the session times out before it acks
	-- this, the clone it hands back is known as a replay (above).
	stanza:tag("replay", { xmlns = NS }):up();
end
module:hook("message/bare", safe("replay", incoming), 1000);
module:hook("message/full", safe("replay", incoming), 1000);

-- Archived when it first came: once is enough (mod_mam decides at -1).
module:hook("archive-should-store", function (event)
	if event.stanza and replay_of(event.stanza) then return false; end
end, 10);

-- Not a new message from its sender: no "sent" carbons to the sender's
-- clients (those to the recipient's other clients come after `delivering`).
module:hook("carbons-should-copy", function (event)
	local replay = event.stanza and replay_of(event.stanza);
	if replay and not replay.delivering then return false; end
end, 10);

-- A component's error iq without <error/> would break send_iq's handler.
module:hook("iq/host", function (event)
	local stanza = event.stanza;
	if stanza.attr.type == "error" and stanza.attr.from == component and not stanza:get_child("error") then
		stanza:tag("error", { type = "cancel" }):tag("undefined-condition", { xmlns = NS_STANZAS }):reset();
	end
end, 10);

---------------------------------------------------------------------------
-- 3. A local user's receipt or marker to the sender of a replay it got.

local function outgoing(event)
	local stanza, origin = event.stanza, event.origin;
	if stanza.name ~= "message" then return; end
	if replay_of(stanza) then return; end
	if strip_marks(stanza) then
		module:log("warn", "Removed a replay mark sent by %s", tostring(origin and origin.full_jid));
	end
	if not (origin and origin.type == "c2s" and origin.full_jid and origin.username) then return; end
	local to = stanza.attr.to;
	if not to or stanza.attr.type == "error" then return; end
	local senders = replayed[origin.username .. "@" .. origin.host];
	local since = senders and senders[jid.bare(to)];
	if not since or os.time() - since > window then return; end

	local copy;
	for _, tag in ipairs(stanza.tags) do -- (childtags() skips other namespaces)
		if (tag.attr.xmlns == NS_RECEIPTS and tag.name == "received")
		or (tag.attr.xmlns == NS_MARKERS and MARKERS[tag.name]) then
			copy = copy or st.message({ xmlns = "jabber:client", from = origin.full_jid, to = to, id = stanza.attr.id });
			copy:add_child(st.clone(tag));
		end
	end
	if not copy then return; end
	module:log("debug", "Confirmation copy of %s's %s to %s", origin.full_jid, tostring(stanza.attr.id), to);
	module:send(st.message({ from = host, to = component })
		:tag("confirmation", { xmlns = NS })
			:tag("forwarded", { xmlns = NS_FORWARD })
				:add_child(copy)
		:reset());
end
module:hook("pre-message/bare", safe("receipt", outgoing), 1000);
module:hook("pre-message/full", safe("receipt", outgoing), 1000);

module:add_timer(3600, function ()
	local cutoff = os.time() - window;
	for recipient, senders in pairs(replayed) do
		for sender, t in pairs(senders) do
			if t < cutoff then senders[sender] = nil; end
		end
		if next(senders) == nil then replayed[recipient] = nil; end
	end
	return 3600;
end);

module:log("info", "Handing off offline messages to %s (timeout %ds)", component, timeout);
