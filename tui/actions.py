"""The console's one action table: the footer, the command palette, the `?` help and
read-only mode all come from ACTIONS, so an action exists everywhere or nowhere. Which key
runs which action is the key map (tui/keys.py), kept apart so keys can be remapped without
touching what the actions are.

`writes` actions change the PoP and are hidden in read-only mode; `dangerous` ones show what
they will do and need confirmation, and those with a `typed` target need it typed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Action:
    name: str  # the App's action_<name>
    title: str  # the palette entry
    help: str
    writes: bool = False
    dangerous: bool = False
    typed: str = ""  # what the operator types to confirm: "version" or "pop"
    footer: bool = True  # listed in the footer (tabs, sorts and refresh speed are not)


SORT_COLUMNS = 6

ACTIONS: tuple[Action, ...] = (
    Action("show('overview')", "Overview", "health tiles, live graphs, drops, backlog",
           footer=False),
    Action("show('snapshots')", "Snapshots", "retained versions and what changed", footer=False),
    Action("show('tuning')", "Tuning", "each knob's current and desired value", footer=False),
    Action("show('xdp')", "XDP", "counters by reason, top sources, blocklist", footer=False),
    Action("show('logs')", "Logs", "the supervisor's recent lines", footer=False),
    Action("pause", "Pause / resume", "stop rendering; collection goes on"),
    Action("faster", "Refresh faster", "halve the refresh interval", footer=False),
    Action("slower", "Refresh slower", "double the refresh interval", footer=False),
    Action("filter", "Filter", "filter the table or the log lines"),
    *(Action(f"sort({n})", f"Sort by column {n + 1}",
             f"sort the table by its column {n + 1}; again to reverse", footer=False)
      for n in range(SORT_COLUMNS)),
    Action("help", "Help", "every action and its key"),
    Action("sync_now", "Sync now", "ask the supervisor to sync with the origin now",
           writes=True),
    Action("rollback", "Roll back", "activate the selected retained snapshot",
           writes=True, dangerous=True, typed="version"),
    Action("apply_tuning", "Apply tuning", "re-apply the tuning plan (adpop-tune)",
           writes=True, dangerous=True),
    Action("drain", "Drain", "stop taking new connections; requests in flight finish",
           writes=True, dangerous=True, typed="pop"),
    Action("undrain", "Undrain", "take new connections again", writes=True),
    Action("block", "Block CIDR", "drop a source range in the XDP filter", writes=True,
           dangerous=True),
    Action("unblock", "Unblock CIDR", "remove a range from the XDP blocklist",
           writes=True),
    Action("quit", "Quit", "leave the console"),
)


def by_name(name: str) -> Action:
    return next(a for a in ACTIONS if a.name.split("(")[0] == name)
