"""The console's one action table: key bindings, the command palette, the `?` help and
read-only mode all come from ACTIONS, so an action exists everywhere or nowhere.

`writes` actions change the PoP and are hidden in read-only mode; `dangerous` ones show what
they will do and need confirmation, and those with a `typed` target need it typed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    key: str
    name: str  # the App's action_<name>
    title: str  # the palette entry
    help: str
    writes: bool = False
    dangerous: bool = False
    typed: str = ""  # what the operator types to confirm: "version" or "pop"
    also: str = ""  # a second key for the same action, not shown in the footer


ACTIONS: tuple[Action, ...] = (
    Action("1", "show('overview')", "Overview", "health tiles, live graphs, drops, backlog"),
    Action("2", "show('snapshots')", "Snapshots", "retained versions and what changed"),
    Action("3", "show('tuning')", "Tuning", "each knob's current and desired value"),
    Action("4", "show('xdp')", "XDP", "counters by reason, top sources, blocklist"),
    Action("5", "show('logs')", "Logs", "the supervisor's recent lines"),
    Action("p", "pause", "Pause / resume", "stop rendering; collection goes on"),
    Action("plus", "faster", "Refresh faster", "halve the refresh interval"),
    Action("minus", "slower", "Refresh slower", "double the refresh interval"),
    Action("slash", "filter", "Filter", "filter the table or the log lines"),
    *(Action(key, f"sort({n})", f"Sort by column {n + 1}",
             f"sort the table by its column {n + 1}; again to reverse")
      for n, key in enumerate(("exclamation_mark", "at", "number_sign", "dollar_sign",
                               "percent_sign", "circumflex_accent"))),
    Action("question_mark", "help", "Help", "every action and its key"),
    Action("s", "sync_now", "Sync now", "ask the supervisor to sync with the origin now",
           writes=True),
    Action("r", "rollback", "Roll back", "activate the selected retained snapshot",
           writes=True, dangerous=True, typed="version"),
    Action("a", "apply_tuning", "Apply tuning", "re-apply the tuning plan (adpop-tune)",
           writes=True, dangerous=True),
    Action("d", "drain", "Drain", "stop taking new connections; requests in flight finish",
           writes=True, dangerous=True, typed="pop"),
    Action("u", "undrain", "Undrain", "take new connections again", writes=True),
    Action("b", "block", "Block CIDR", "drop a source range in the XDP filter", writes=True,
           dangerous=True),
    Action("k", "unblock", "Unblock CIDR", "remove a range from the XDP blocklist",
           writes=True),
    Action("q", "quit", "Quit", "leave the console", also="ctrl+c"),
)

KEY_LABELS = {"plus": "+", "minus": "-", "slash": "/", "question_mark": "?",
              "exclamation_mark": "!", "at": "@", "number_sign": "#", "dollar_sign": "$",
              "percent_sign": "%", "circumflex_accent": "^"}


def by_name(name: str) -> Action:
    return next(a for a in ACTIONS if a.name.split("(")[0] == name)


def label(action: Action) -> str:
    shown = KEY_LABELS.get(action.key, action.key)
    return f"{shown} / {action.also}" if action.also else shown
