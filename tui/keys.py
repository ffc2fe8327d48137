"""The console's key map: each action's keys, the first shown in the footer and the help,
the others bound quietly (and before any widget, so ctrl+c quits from anywhere). Apart from
the action table (tui/actions.py): remapping a key is an edit here, or another map given to
ConsoleApp, and never touches what an action does.
"""

from __future__ import annotations

from collections.abc import Mapping

from tui.actions import ACTIONS, SORT_COLUMNS, Action

KeyMap = Mapping[str, tuple[str, ...]]

KEYS: KeyMap = {
    "show('overview')": ("1",), "show('snapshots')": ("2",), "show('tuning')": ("3",),
    "show('xdp')": ("4",), "show('logs')": ("5",),
    "pause": ("p",), "faster": ("plus",), "slower": ("minus",), "filter": ("slash",),
    # Shift and the column's number on a US keyboard: ! @ # $ % ^.
    **{f"sort({n})": (key,) for n, key in enumerate(
        ("exclamation_mark", "at", "number_sign", "dollar_sign", "percent_sign",
         "circumflex_accent")[:SORT_COLUMNS])},
    "help": ("question_mark",),
    "sync_now": ("s",), "rollback": ("r",), "apply_tuning": ("a",), "drain": ("d",),
    "undrain": ("u",), "block": ("b",), "unblock": ("k",),
    "quit": ("q", "ctrl+c"),
}

LABELS = {"plus": "+", "minus": "-", "slash": "/", "question_mark": "?",
          "exclamation_mark": "!", "at": "@", "number_sign": "#", "dollar_sign": "$",
          "percent_sign": "%", "circumflex_accent": "^"}


class KeyMapError(ValueError):
    """A key map that leaves an action without a key or gives one key two actions."""


def check(keys: KeyMap) -> None:
    """Every action has a key, every key one action, and no key names an unknown action."""
    names = {a.name for a in ACTIONS}
    problems = [f"{name!r} is not an action" for name in keys if name not in names]
    problems += [f"{a.name!r} has no key" for a in ACTIONS if not keys.get(a.name)]
    seen: dict[str, str] = {}
    for name, bound in keys.items():
        for key in bound:
            if key in seen:
                problems.append(f"{key!r} is bound to both {seen[key]!r} and {name!r}")
            seen[key] = name
    if problems:
        raise KeyMapError("; ".join(problems))


def label(action: Action, keys: KeyMap = KEYS) -> str:
    """The action's keys as the help shows them: "? ", "q / ctrl+c"."""
    return " / ".join(LABELS.get(key, key) for key in keys[action.name])
