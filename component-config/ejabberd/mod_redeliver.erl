%%% mod_redeliver: ejabberd's side of redeliver's transparent mode.
%%%
%%% The contract is docs/transparent.md (namespace urn:redeliver:handoff:0);
%%% the facts about ejabberd 23.01 behind each choice are in
%%% SERVER-FACTS.md, "Transparent mode" and "Privileged entity".
%%%
%%%  1. Hand-off: a chat/normal message that ejabberd would store offline is
%%%     stored through mod_offline first, with a <copy/> mark of ours, then
%%%     offered to the component; only its `result` removes that copy.
%%%  2. Replays the component sends through mod_privilege carry <replay/>:
%%%     never stored, handed off or archived again; dropped with an error to
%%%     the component when the recipient has no session.
%%%  3. Receipts and markers a user sends to a sender whose replay reached
%%%     them within the confirmation window are copied to the component.
%%%  4. At login, before mod_offline delivers, marked copies are handed off
%%%     again; those the component takes are removed instead of delivered.
%%%
%%% Build: scripts/build-ejabberd-module DIR; run ejabberd with `-pa DIR`.
%%%
%%% Logging: what happens to each message in the normal course is ?DEBUG
%%% (an info line costs ~0.09 ms in the sender's process, and ejabberd's
%%% default level is info); removals per user, refusals, timeouts, dropped
%%% replays and logins with copies are ?INFO_MSG / ?WARNING_MSG.
-module(mod_redeliver).
-behaviour(gen_mod).
-behaviour(gen_server).

-export([start/2, stop/1, reload/3, depends/2, mod_options/1,
         mod_opt_type/1, mod_doc/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2,
         terminate/2, code_change/3]).
%% Hooks.
-export([offline_replay/1, offline_handoff/1, sm_receive_packet/1,
         privileged_message/1, user_receive_packet/1, user_send_packet/1,
         s2s_receive_packet/1, store_mam_message/7, c2s_self_presence/1,
         c2s_handle_info/2]).

-include("logger.hrl").
-include("xmpp.hrl").
-include("mod_offline.hrl").

-define(NS, <<"urn:redeliver:handoff:0">>).
%% Set while mod_privilege forwards a message our component sent: the one
%% moment a <replay/> can be believed (see privileged_message/1).
-define(TRUST_KEY, mod_redeliver_privileged).
%% Meta key on a believed replay; meta never crosses the wire, so only
%% this module can set it. Its value is the sender's bare JID.
-define(REPLAY_META, redeliver_replay).

%%%===================================================================
%%% gen_mod
%%%===================================================================
start(Host, Opts) ->
    case gen_mod:start_child(?MODULE, Host, Opts) of
        {ok, _} ->
            case mod_offline_use_mam(Host) of
                true ->
                    ?WARNING_MSG("mod_redeliver on ~ts: mod_offline's "
                                 "use_mam_for_storage keeps no copy of its "
                                 "own to hand off; hand-offs are disabled",
                                 [Host]);
                false -> ok
            end,
            lists:foreach(fun({Hook, F, Seq}) ->
                                  ejabberd_hooks:add(Hook, Host, ?MODULE, F, Seq)
                          end, hooks()),
            ok;
        Err ->
            Err
    end.

stop(Host) ->
    lists:foreach(fun({Hook, F, Seq}) ->
                          ejabberd_hooks:delete(Hook, Host, ?MODULE, F, Seq)
                  end, hooks()),
    gen_mod:stop_child(?MODULE, Host).

%% Every option is read when used, so a reload needs nothing.
reload(_Host, _NewOpts, _OldOpts) ->
    ok.

hooks() ->
    %% Replays leave the offline chain before mod_mam (49) can archive
    %% them and before anything can store or bounce them.
    [{offline_message_hook, offline_replay, 10},
     %% Hand-offs after mod_mam, which archives the message at 49 (ties
     %% run in module-name order: mod_mam before mod_redeliver), and
     %% before mod_offline stores it at 50.
     {offline_message_hook, offline_handoff, 49},
     %% Runs in the routing process for everything bound for a local
     %% user, ahead of mod_mam (50), carbons and the user's c2s.
     {sm_receive_packet, sm_receive_packet, 10},
     %% Just before mod_privilege (50) forwards a component's message.
     {local_send_to_resource_hook, privileged_message, 49},
     {user_receive_packet, user_receive_packet, 10},
     %% Before mod_mam (88) archives what the user sends.
     {user_send_packet, user_send_packet, 10},
     {s2s_receive_packet, s2s_receive_packet, 10},
     %% Before mod_mam's own writer (100).
     {store_mam_message, store_mam_message, 50},
     %% Before mod_offline (50) delivers the stored messages.
     {c2s_self_presence, c2s_self_presence, 40},
     {c2s_handle_info, c2s_handle_info, 50}].

%% mod_offline holds the copies; mod_privilege sends the replays (without
%% it the component refuses hand-offs with not-allowed).
depends(_Host, _Opts) ->
    [{mod_offline, hard}, {mod_privilege, soft}].

mod_opt_type(component) -> econf:domain();
mod_opt_type(handoff_timeout) -> econf:timeout(second);
mod_opt_type(login_timeout) -> econf:timeout(second);
mod_opt_type(confirmation_window) -> econf:timeout(second);
mod_opt_type(confirmation_pairs) -> econf:pos_int().

mod_options(_Host) ->
    [component,
     {handoff_timeout, timer:seconds(30)},
     {login_timeout, timer:seconds(5)},
     {confirmation_window, timer:hours(24)},
     {confirmation_pairs, 100000}].

mod_doc() ->
    #{desc =>
          [<<"Transparent mode for redeliver (an XEP-0114 component): hands "
             "it each chat or normal message ejabberd stores offline, and "
             "copies to it the receipts and markers for messages it "
             "replayed. The protocol is redeliver's docs/transparent.md.">>,
           <<"Needs mod_offline, and mod_privilege granting the component "
             "'message: outgoing'.">>],
      opts =>
          [{component,
            #{value => <<"Domain">>,
              desc => <<"The component's domain (required).">>}},
           {handoff_timeout,
            #{value => <<"timeout()">>,
              desc => <<"How long a hand-off may stay unanswered; the "
                        "server's copy stays either way. Default 30 s.">>}},
           {login_timeout,
            #{value => <<"timeout()">>,
              desc => <<"How long a login waits for the hand-offs of the "
                        "copies still held before mod_offline delivers "
                        "them. Default 5 s.">>}},
           {confirmation_window,
            #{value => <<"timeout()">>,
              desc => <<"How long after a replay the recipient's receipts "
                        "to its sender are copied. Default 24 h.">>}},
           {confirmation_pairs,
            #{value => <<"pos_integer()">>,
              desc => <<"At most this many (recipient, sender) pairs are "
                        "remembered per host. Default 100000.">>}}],
      example =>
          [<<"modules:">>,
           <<"  mod_redeliver:">>,
           <<"    component: relay.example.com">>]}.

opt(Host, Opt) ->
    gen_mod:get_module_opt(Host, ?MODULE, Opt).

mod_offline_use_mam(Host) ->
    try mod_offline_opt:use_mam_for_storage(Host)
    catch _:_ -> false
    end.

%%%===================================================================
%%% The module's process: owns the replay memory and takes the
%%% component's answers (ejabberd_iq would otherwise run our removal in its
%%% own process, which serves every iq answer on the node).
%%%===================================================================
-record(st, {host :: binary(), tab :: atom(), skipped = 0 :: integer()}).

init([Host, _Opts]) ->
    Tab = gen_mod:get_module_proc(Host, ?MODULE),
    ets:new(Tab, [named_table, public, set, {read_concurrency, true},
                  {write_concurrency, true}]),
    %% The last offline timestamp we gave out (microseconds): mod_offline's
    %% mnesia backend removes by timestamp, so each copy gets its own.
    ets:insert(Tab, {'$ts', atomics:new(1, [])}),
    schedule_sweep(Host),
    {ok, #st{host = Host, tab = Tab}}.

handle_call(_Request, _From, State) ->
    {reply, {error, badarg}, State}.

handle_cast(_Msg, State) ->
    {noreply, State}.

handle_info({iq_reply, _, {handoff, _, _, _, _}} = First, State) ->
    %% Answers come in bursts after an outage: take all waiting ones and
    %% read each user's offline store once.
    Replies = drain_replies([First]),
    Taken = lists:foldl(fun answered/2, #{}, Replies),
    maps:foreach(fun({U, S}, Tokens) -> remove_copies(U, S, Tokens) end,
                 Taken),
    {noreply, State};
handle_info(sweep, #st{host = Host, tab = Tab, skipped = Skipped0} = State) ->
    Now = erlang:monotonic_time(millisecond),
    catch ets:select_delete(Tab, [{{{'_', '_'}, '$1'},
                                   [{'<', '$1', Now}], [true]}]),
    Skipped = counter(Tab, '$skipped') - Skipped0,
    if Skipped > 0 ->
            ?WARNING_MSG("mod_redeliver on ~ts: the replay memory was full "
                         "(confirmation_pairs) and ~B replays were not "
                         "remembered; their receipts will not be copied",
                         [Host, Skipped]);
       true -> ok
    end,
    schedule_sweep(Host),
    {noreply, State#st{skipped = Skipped0 + Skipped}};
handle_info(_Info, State) ->
    {noreply, State}.

terminate(_Reason, _State) ->
    ok.

code_change(_OldVsn, State, _Extra) ->
    {ok, State}.

schedule_sweep(Host) ->
    Window = try opt(Host, confirmation_window) catch _:_ -> 60000 end,
    erlang:send_after(max(1000, min(Window, 60000)), self(), sweep).

counter(Tab, Key) ->
    try ets:lookup_element(Tab, Key, 2) catch _:_ -> 0 end.

drain_replies(Acc) ->
    receive
        {iq_reply, _, {handoff, _, _, _, _}} = R -> drain_replies([R | Acc])
    after 0 -> lists:reverse(Acc)
    end.

answered({iq_reply, #iq{type = result}, {handoff, U, S, Token, Desc}}, Acc) ->
    ?DEBUG("mod_redeliver: the component took ~ts", [Desc]),
    maps:update_with({U, S}, fun(Ts) -> [Token | Ts] end, [Token], Acc);
answered({iq_reply, #iq{type = error} = IQ, {handoff, _, _, _, Desc}}, Acc) ->
    ?WARNING_MSG("mod_redeliver: the component refused ~ts (~ts); the "
                 "server keeps it", [Desc, error_text(IQ)]),
    Acc;
answered({iq_reply, timeout, {handoff, _, _, _, Desc}}, Acc) ->
    ?WARNING_MSG("mod_redeliver: no answer to the hand-off of ~ts; the "
                 "server keeps it", [Desc]),
    Acc;
answered({iq_reply, _, {handoff, _, _, _, Desc}}, Acc) ->
    ?WARNING_MSG("mod_redeliver: unexpected answer to the hand-off of ~ts; "
                 "the server keeps it", [Desc]),
    Acc.

error_text(IQ) ->
    try xmpp:format_stanza_error(xmpp:get_error(IQ))
    catch _:_ -> <<"error">>
    end.

%%%===================================================================
%%% 1. Hand-off
%%%===================================================================
offline_replay({_Action, #message{} = Pkt} = Acc) ->
    case xmpp:get_meta(Pkt, ?REPLAY_META, false) of
        false -> Acc;
        Sender -> guard(Acc, fun() -> drop_replay(Pkt, Sender) end)
    end;
offline_replay(Acc) ->
    Acc.

%% The component keeps the message and replays it when the recipient is
%% back: nothing here may store, hand off or bounce it to the sender.
drop_replay(#message{to = To, id = Id} = Pkt, Sender) ->
    Host = To#jid.lserver,
    Component = opt(Host, component),
    Err = #message{type = error, id = Id, from = To,
                   to = jid:make(Component),
                   sub_els = [#xmlel{name = <<"replay">>,
                                     attrs = [{<<"xmlns">>, ?NS},
                                              {<<"from">>, jid:encode(Sender)}]},
                              #stanza_error{type = wait,
                                            reason = 'recipient-unavailable'}]},
    ejabberd_router:route(Err),
    ?INFO_MSG("mod_redeliver: replay ~ts from ~ts to ~ts found no session; "
              "dropped and returned to ~ts",
              [Id, jid:encode(Sender), jid:encode(To), Component]),
    {stop, {dropped, Pkt}}.

offline_handoff({Action, #message{from = From, to = To} = Pkt} = Acc)
  when Action == bounce; Action == archived ->
    Host = To#jid.lserver,
    guard(Acc, fun() ->
                       case is_local_user(From) andalso wants_storage(Host, Pkt)
                           andalso not mod_offline_use_mam(Host) of
                           true -> handoff(Acc, Host);
                           false -> Acc
                       end
               end);
offline_handoff(Acc) ->
    Acc.

%% Only what mod_offline would store itself (its need_to_store/2, which it
%% does not export); anything in doubt is left to mod_offline.
wants_storage(Host, #message{type = Type} = Pkt)
  when Type == chat; Type == normal ->
    HasXEvent = lists:any(fun(El) -> xmpp:get_ns(El) == ?NS_EVENT end,
                          xmpp:get_els(Pkt)),
    case {HasXEvent, xmpp:has_subtag(Pkt, #offline{}),
          xmpp:has_subtag(Pkt, #hint{type = 'store'}),
          xmpp:has_subtag(Pkt, #hint{type = 'no-store'}) orelse
          xmpp:has_subtag(Pkt, #hint{type = 'no-storage'})} of
        {false, false, true, _} -> true;
        {false, false, false, false} ->
            case mod_offline_opt:store_empty_body(Host) of
                true -> true;
                false -> Pkt#message.body /= [];
                unless_chat_state -> not misc:is_standalone_chat_state(Pkt)
            end;
        _ -> false
    end;
wants_storage(_Host, _Pkt) ->
    false.

%% A sender the component can send as: a user of a host of this server.
is_local_user(#jid{luser = U, lserver = S}) when U /= <<>> ->
    ejabberd_router:is_my_host(S);
is_local_user(_) ->
    false.

handoff({_Action, Pkt0} = Acc, Host) ->
    #message{from = From, to = To} = Pkt =
        case Pkt0#message.id of
            <<>> -> Pkt0#message{id = <<"redeliver-", (p1_rand:get_string())/binary>>};
            _ -> Pkt0
        end,
    #jid{luser = LUser, lserver = LServer} = To,
    TS = unique_timestamp(Host),
    Token = p1_rand:get_string(),
    Mark = #xmlel{name = <<"copy">>,
                  attrs = [{<<"xmlns">>, ?NS}, {<<"token">>, Token}]},
    Copy = #offline_msg{us = {LUser, LServer}, timestamp = TS,
                        expire = mod_offline:find_x_expire(TS, Pkt),
                        from = From, to = To,
                        packet = xmpp:append_subtags(Pkt, [Mark])},
    case mod_offline:store_offline_msg(Copy) of
        ok ->
            %% Stored: whatever happens now, mod_offline must not store it
            %% a second time.
            guard(ok, fun() -> send_handoff(Host, Pkt, TS, Token) end),
            push_notify(Host, Pkt),
            {stop, {offlined, Pkt}};
        {error, Reason} ->
            %% mod_offline tries again and tells the sender why it cannot.
            ?WARNING_MSG("mod_redeliver: could not store ~ts (~p); left to "
                         "mod_offline", [describe(Pkt), Reason]),
            Acc
    end.

%% Our stop hides the message from mod_push (55), which only notifies
%% for messages mod_offline (50) has seen.
push_notify(Host, Pkt) ->
    case gen_mod:is_loaded(Host, mod_push) of
        true -> catch mod_push:offline_message({offlined, Pkt}), ok;
        false -> ok
    end.

%% When the component is not connected ejabberd would send the hand-off
%% out over s2s to whoever answers for the component's name; the copy
%% waits for the recipient's login instead.
send_handoff(Host, #message{to = To} = Pkt, TS, Token) ->
    Component = opt(Host, component),
    Desc = describe(Pkt),
    case ejabberd_router:is_my_route(Component) of
        true ->
            IQ = handoff_iq(Host, Component, Pkt, TS),
            Ctx = {handoff, To#jid.luser, To#jid.lserver, Token, Desc},
            ejabberd_router:route_iq(IQ, Ctx,
                                     gen_mod:get_module_proc(Host, ?MODULE),
                                     opt(Host, handoff_timeout)),
            ?DEBUG("mod_redeliver: stored ~ts and handed it off to ~ts",
                   [Desc, Component]);
        false ->
            ?DEBUG("mod_redeliver: stored ~ts; ~ts is not connected, "
                   "hand-off at the recipient's login", [Desc, Component])
    end.

handoff_iq(Host, Component, Pkt, TS) ->
    Fwd = #xmlel{name = <<"forwarded">>,
                 attrs = [{<<"xmlns">>, ?NS_FORWARD}],
                 children = [xmpp:encode(#delay{stamp = TS}),
                             xmpp:encode(Pkt)]},
    #iq{type = set, from = jid:make(Host), to = jid:make(Component),
        sub_els = [#xmlel{name = <<"handoff">>, attrs = [{<<"xmlns">>, ?NS}],
                          children = [Fwd]}]}.

unique_timestamp(Host) ->
    Ref = ets:lookup_element(gen_mod:get_module_proc(Host, ?MODULE), '$ts', 2),
    Now = erlang:system_time(microsecond),
    Last = atomics:get(Ref, 1),
    New = max(Now, Last + 1),
    case atomics:compare_exchange(Ref, 1, Last, New) of
        ok -> {New div 1000000000000, New div 1000000 rem 1000000,
               New rem 1000000};
        _ -> unique_timestamp(Host)
    end.

%% Removes the marked copies named by Tokens through mod_offline's own
%% XEP-0013 removal (which also clears its count cache). A node (the
%% mnesia backend's timestamp, SQL's seq) is removed only when every copy
%% under it is one of these: another message is never removed with it.
remove_copies(U, S, Tokens) ->
    try
        Mod = gen_mod:db_mod(S, mod_offline),
        Hdrs = case Mod:read_message_headers(U, S) of
                   L when is_list(L) -> L;
                   _ -> []
               end,
        BySeq = lists:foldl(
                  fun({Seq, _, _, _, El}, Acc) ->
                          maps:update_with(Seq, fun(T) -> [token(El) | T] end,
                                           [token(El)], Acc)
                  end, #{}, Hdrs),
        Nodes = [integer_to_binary(Seq)
                 || {Seq, Ts} <- maps:to_list(BySeq),
                    lists:all(fun(T) -> lists:member(T, Tokens) end, Ts)],
        Shared = [Seq || {Seq, Ts} <- maps:to_list(BySeq),
                         lists:any(fun(T) -> lists:member(T, Tokens) end, Ts),
                         not lists:all(fun(T) -> lists:member(T, Tokens) end, Ts)],
        Shared == [] orelse
            ?WARNING_MSG("mod_redeliver: a copy for ~ts@~ts shares its "
                         "offline node with another message; kept", [U, S]),
        case Nodes of
            [] ->
                ?INFO_MSG("mod_redeliver: the component took ~B messages for "
                          "~ts@~ts whose copies were already gone (delivered "
                          "at a login)", [length(Tokens), U, S]);
            _ ->
                JID = jid:make(U, S),
                Items = [#offline_item{node = N, action = remove} || N <- Nodes],
                IQ = #iq{type = set, id = p1_rand:get_string(),
                         from = JID, to = JID,
                         sub_els = [#offline{items = Items}]},
                case mod_offline:handle_offline_query(IQ) of
                    #iq{type = result} ->
                        ?INFO_MSG("mod_redeliver: the component took ~B "
                                  "messages for ~ts@~ts; their copies are "
                                  "removed", [length(Nodes), U, S]);
                    Res ->
                        ?WARNING_MSG("mod_redeliver: mod_offline did not "
                                     "remove ~B copies for ~ts@~ts: ~ts",
                                     [length(Nodes), U, S, error_text(Res)])
                end
        end
    catch Class:Reason ->
            ?WARNING_MSG("mod_redeliver: removing copies for ~ts@~ts failed: "
                         "~p:~p", [U, S, Class, Reason])
    end.

%% The token of our <copy/> mark in a stored element, or none.
token(#xmlel{children = Els}) -> token_in(Els);
token(Pkt) ->
    try token_in(xmpp:get_els(Pkt)) catch _:_ -> none end.

token_in([#xmlel{name = <<"copy">>, attrs = Attrs} | Els]) ->
    case lists:keyfind(<<"xmlns">>, 1, Attrs) of
        {_, ?NS} ->
            case lists:keyfind(<<"token">>, 1, Attrs) of
                {_, T} -> T;
                false -> token_in(Els)
            end;
        _ -> token_in(Els)
    end;
token_in([_ | Els]) -> token_in(Els);
token_in([]) -> none.

describe(#message{from = From, to = To, id = Id}) ->
    io_lib:format("~ts from ~ts to ~ts", [Id, jid:encode(From), jid:encode(To)]).

%%%===================================================================
%%% 2. Replays: believed only when mod_privilege forwards them for our
%%% component; every other element in our namespace is removed.
%%%===================================================================

%% mod_privilege routes the forwarded message synchronously inside its
%% own handler (forward_message/1 -> ejabberd_router:route/1 ->
%% ejabberd_sm:route/1), so a process flag set around that call is seen
%% by sm_receive_packet/1 for exactly that message. mod_privilege keeps
%% every permission check; our hook only brackets it.
privileged_message(#message{from = #jid{luser = <<>>, lresource = <<>>,
                                        lserver = From},
                            to = #jid{luser = <<>>, lresource = <<>>,
                                      lserver = Host}} = Msg) ->
    case gen_mod:is_loaded(Host, mod_privilege)
        andalso From == opt(Host, component) of
        true ->
            put(?TRUST_KEY, From),
            %% A crash here would crash mod_privilege's own hook the same
            %% way (or forward twice): stop either way.
            try mod_privilege:process_message(Msg)
            catch Class:Reason ->
                    ?WARNING_MSG("mod_redeliver: mod_privilege failed on a "
                                 "message from ~ts: ~p:~p",
                                 [From, Class, Reason]),
                    stop
            after erase(?TRUST_KEY)
            end;
        false ->
            ok
    end;
privileged_message(_) ->
    ok.

sm_receive_packet(#message{from = From} = Pkt) ->
    case {get(?TRUST_KEY), xmpp:get_meta(Pkt, ?REPLAY_META, false)} of
        {undefined, false} ->
            strip(Pkt);
        {undefined, _} ->
            %% A believed replay routed again (stream management resending
            %% it when the session timed out): it keeps its meta.
            Pkt;
        {_Component, _} ->
            case has_replay(Pkt) of
                true ->
                    xmpp:put_meta(strip(Pkt), ?REPLAY_META,
                                  jid:remove_resource(From));
                false ->
                    strip(Pkt)
            end
    end;
sm_receive_packet(Pkt) ->
    strip(Pkt).

s2s_receive_packet({Pkt, State}) when ?is_stanza(Pkt) ->
    {strip(Pkt), State};
s2s_receive_packet(Acc) ->
    Acc.

%% It was archived when it first came.
store_mam_message(#message{} = Pkt, _U, _S, _Peer, _Nick, _Type, _Dir) ->
    case xmpp:get_meta(Pkt, ?REPLAY_META, false) of
        false -> Pkt;
        _ -> {stop, replay}
    end;
store_mam_message(Acc, _U, _S, _Peer, _Nick, _Type, _Dir) ->
    Acc.

strip(Pkt) ->
    try
        Els = xmpp:get_els(Pkt),
        case lists:partition(fun is_ours/1, Els) of
            {[], _} -> Pkt;
            {_, Keep} -> xmpp:set_els(Pkt, Keep)
        end
    catch _:_ -> Pkt
    end.

is_ours(#xmlel{attrs = Attrs}) ->
    lists:keyfind(<<"xmlns">>, 1, Attrs) == {<<"xmlns">>, ?NS};
is_ours(_) ->
    false.

has_replay(Pkt) ->
    lists:any(fun(#xmlel{name = <<"replay">>} = El) -> is_ours(El);
                 (_) -> false
              end, xmpp:get_els(Pkt)).

%%%===================================================================
%%% 3. Confirmation copies
%%%===================================================================
user_receive_packet({#message{} = Pkt, #{jid := JID} = C2S}) ->
    case xmpp:get_meta(Pkt, ?REPLAY_META, false) of
        false -> ok;
        Sender -> remember(JID, Sender)
    end,
    %% mod_offline's XEP-0013 view sends stored copies straight to the
    %% session, past sm_receive_packet.
    {strip(Pkt), C2S};
user_receive_packet(Acc) ->
    Acc.

remember(#jid{lserver = Host} = Recipient, Sender) ->
    try
        Tab = gen_mod:get_module_proc(Host, ?MODULE),
        Key = {jid:tolower(jid:remove_resource(Recipient)), jid:tolower(Sender)},
        Until = erlang:monotonic_time(millisecond) + opt(Host, confirmation_window),
        case ets:info(Tab, size) < opt(Host, confirmation_pairs) + 2
            orelse ets:member(Tab, Key) of
            true -> ets:insert(Tab, {Key, Until});
            false -> ets:update_counter(Tab, '$skipped', 1, {'$skipped', 0})
        end
    catch _:_ -> ok
    end.

user_send_packet({Pkt, #{jid := JID} = C2S}) when ?is_stanza(Pkt) ->
    Pkt1 = strip(Pkt),
    case Pkt1 of
        #message{} -> catch maybe_confirm(Pkt1, JID);
        _ -> ok
    end,
    {Pkt1, C2S};
user_send_packet(Acc) ->
    Acc.

maybe_confirm(#message{to = #jid{} = To} = Pkt, #jid{lserver = Host} = JID) ->
    case confirmations(Pkt) of
        [] -> ok;
        Els ->
            Tab = gen_mod:get_module_proc(Host, ?MODULE),
            Key = {jid:tolower(jid:remove_resource(JID)),
                   jid:tolower(jid:remove_resource(To))},
            Now = erlang:monotonic_time(millisecond),
            case ets:lookup(Tab, Key) of
                [{_, Until}] when Until >= Now -> confirm(Host, Pkt, JID, Els);
                _ -> ok
            end
    end;
maybe_confirm(_, _) ->
    ok.

%% XEP-0184 <received/> and XEP-0333 received/displayed/acknowledged.
confirmations(Pkt) ->
    [xmpp:encode(El) || El <- xmpp:get_els(Pkt), is_confirmation(El)].

is_confirmation(El) ->
    case {xmpp:get_name(El), xmpp:get_ns(El)} of
        {<<"received">>, ?NS_RECEIPTS} -> true;
        {N, ?NS_CHAT_MARKERS_0} ->
            lists:member(N, [<<"received">>, <<"displayed">>, <<"acknowledged">>]);
        _ -> false
    end.

confirm(Host, #message{to = To, id = Id, type = Type}, JID, Els) ->
    Component = opt(Host, component),
    %% Not connected: nothing to confirm to (and with s2s allowed the copy
    %% would go to whoever answers for the component's name).
    ejabberd_router:is_my_route(Component) andalso
        send_confirmation(Host, Component, To, Id, Type, JID, Els).

send_confirmation(Host, Component, To, Id, Type, JID, Els) ->
    Inner = #message{from = JID, to = To, id = Id, type = Type, sub_els = Els},
    Fwd = #xmlel{name = <<"forwarded">>, attrs = [{<<"xmlns">>, ?NS_FORWARD}],
                 children = [xmpp:encode(Inner)]},
    ejabberd_router:route(
      #message{from = jid:make(Host), to = jid:make(Component),
               sub_els = [#xmlel{name = <<"confirmation">>,
                                 attrs = [{<<"xmlns">>, ?NS}],
                                 children = [Fwd]}]}),
    ?DEBUG("mod_redeliver: copied ~ts's confirmation ~ts to ~ts to ~ts",
           [jid:encode(JID), Id, jid:encode(To), Component]).

%%%===================================================================
%%% 4. Login
%%%===================================================================
c2s_self_presence({#presence{type = available} = Pres,
                   #{jid := JID} = State} = Acc) ->
    Last = case maps:get(pres_last, State, undefined) of
               undefined -> -1;
               P -> priority(P)
           end,
    %% The same test as mod_offline's: this presence makes it deliver.
    case Last < 0 andalso priority(Pres) >= 0 of
        true -> guard(ok, fun() -> login_handoffs(JID) end);
        false -> ok
    end,
    Acc;
c2s_self_presence(Acc) ->
    Acc.

priority(#presence{priority = P}) when is_integer(P) -> P;
priority(_) -> 0.

%% Runs in the user's own c2s while it logs in: a bounded wait is allowed
%% here, and nobody else's stream waits on it.
login_handoffs(#jid{luser = U, lserver = Host}) ->
    Mod = gen_mod:db_mod(Host, mod_offline),
    Copies = case Mod:read_message_headers(U, Host) of
                 L when is_list(L) ->
                     [{T, From, To, TS, El} || {_, From, To, TS, El} <- L,
                                              (T = token(El)) /= none];
                 _ -> []
             end,
    Component = opt(Host, component),
    case Copies /= [] andalso ejabberd_router:is_my_route(Component) of
        false when Copies == [] -> ok;
        false ->
            ?INFO_MSG("mod_redeliver: ~B copies for ~ts@~ts; ~ts is not "
                      "connected, mod_offline delivers them",
                      [length(Copies), U, Host, Component]);
        true ->
            Timeout = opt(Host, login_timeout),
            Ref = make_ref(),
            Sent = lists:flatmap(
                     fun(C) -> send_login_handoff(Host, Component, C, Ref, Timeout) end,
                     Copies),
            Deadline = erlang:monotonic_time(millisecond) + Timeout + 500,
            Taken = await(Ref, length(Sent), Deadline, []),
            ?INFO_MSG("mod_redeliver: ~ts@~ts logged in with ~B copies; the "
                      "component took ~B, mod_offline delivers the rest",
                      [U, Host, length(Copies), length(Taken)]),
            Taken == [] orelse remove_copies(U, Host, Taken)
    end.

send_login_handoff(Host, Component, {Token, From, To, TS0, El}, Ref, Timeout) ->
    %% mod_offline's SQL backend keeps no timestamp in its headers: the
    %% component then takes the oldest delay the stored copy carries.
    TS = case TS0 of
             {_, _, _} -> TS0;
             _ -> erlang:timestamp()
         end,
    %% Decoding and encoding inside the try: a copy that does not
    %% survive them is left for mod_offline, and the other copies go on.
    try
        #message{} = Msg0 = xmpp:decode(El, ?NS_CLIENT,
                                        ejabberd_config:codec_options()),
        handoff_iq(Host, Component, strip(xmpp:set_from_to(Msg0, From, To)), TS)
    of
        IQ ->
            ejabberd_router:route_iq(IQ, {?MODULE, login, Ref, Token}, self(),
                                     Timeout),
            [Token]
    catch _:_ -> []
    end.

await(_Ref, 0, _Deadline, Taken) ->
    Taken;
await(Ref, N, Deadline, Taken) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {iq_reply, #iq{type = result}, {?MODULE, login, Ref, Token}} ->
            await(Ref, N - 1, Deadline, [Token | Taken]);
        {iq_reply, Res, {?MODULE, login, Ref, _}} ->
            ?WARNING_MSG("mod_redeliver: hand-off at login not taken (~ts); "
                         "mod_offline delivers it",
                         [case Res of timeout -> <<"timeout">>;
                              _ -> error_text(Res) end]),
            await(Ref, N - 1, Deadline, Taken)
    after Left ->
            Taken
    end.

%% An answer that came after the login stopped waiting: the copy was
%% delivered by mod_offline already.
c2s_handle_info(State, {iq_reply, Res, {?MODULE, login, _, _}}) ->
    ?WARNING_MSG("mod_redeliver: a hand-off answer came after the login's "
                 "wait (~p); mod_offline had delivered its copy",
                 [case Res of #iq{type = T} -> T; _ -> Res end]),
    {stop, State};
c2s_handle_info(State, _) ->
    State.

%%%===================================================================
%%% Helpers
%%%===================================================================

%% A hook that fails must leave the stanza to ejabberd as it was.
guard(Acc, F) ->
    try F()
    catch Class:Reason:St ->
            ?WARNING_MSG("mod_redeliver: ~p:~p at ~p; ejabberd handles the "
                         "stanza as usual", [Class, Reason, hd(St ++ [none])]),
            Acc
    end.
