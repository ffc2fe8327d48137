"""Secrets at rest: each in a file of its own that only its owner reads (0600), never inside a
configuration file (those are readable by operators and get copied around).

- `ensure` makes a secret the first time it is needed: 32 random bytes, hex, written 0600
  and fsynced under a temporary name, then renamed into place (a crash leaves none or a
  whole one; a racing start keeps the first one made).
- `read` refuses a secret file that others can read, naming the chmod that fixes it.
- Under systemd a unit gets its secrets as credentials ($CREDENTIALS_DIRECTORY/<name>),
  copied there by systemd from the 0600 file; `credential` reads those first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.errors import AdpopError


class SecretError(AdpopError):
    """A secret file is missing, unreadable, empty or readable by others."""


def _staged(path: Path, text: str) -> Path:
    """`text` written 0600 and fsynced under a temporary name beside `path`."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def ensure(path: Path) -> str:
    """The secret in `path`, made first when there is none."""
    if not path.exists():
        tmp = _staged(path, os.urandom(32).hex() + "\n")
        try:
            os.link(tmp, path)  # fails when another start made one meanwhile: keep that
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return read(path)


def write(path: Path, text: str) -> None:
    """Writes a secret (or a file naming one) 0600, whole: a crash leaves the old one or the
    new one. Unchanged content is left as it is."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    os.replace(_staged(path, text), path)


def read(path: Path, setting: str = "") -> str:
    """The secret in `path` (surrounding whitespace dropped)."""
    where = f" ({setting})" if setting else ""
    try:
        info = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}{where}: {exc.strerror}",
                          hint="create it with the secret on one line, mode 0600") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"secret file {path}{where} is readable by others "
                          f"(mode {stat.S_IMODE(info.st_mode):04o})",
                          hint=f"chmod 600 {path}")
    if not text:
        raise SecretError(f"secret file {path}{where} is empty",
                          hint="write the secret on one line")
    return text


def credential(name: str, fallback: Path) -> str:
    """Credential `name` from systemd when the unit has one, else the file `fallback`."""
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if folder and (Path(folder) / name).is_file():
        # systemd made the copy readable by this unit's user only; its mode is its own.
        return (Path(folder) / name).read_text().strip()
    return read(fallback)
