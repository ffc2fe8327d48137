"""What the PoP trusts a manifest for: the origin's TUF targets list its exact bytes.

python-tuf's client (ngclient's Updater) does the work: it starts from the root.json the PoP
was given (by the image, `adpop flash` or `adpop pop trust`) or, once it has run, from the
newest root it verified; it follows root rotations, then reads timestamp, snapshot and
targets, each checked for signatures by the keys the root names and their threshold, for
expiry (a freeze) and for versions that only go up and agree with each other (a rollback or
a mix and match). Only then is a manifest believed, and only if its length and SHA-256 are
the listed ones. Every refusal is a VerifyError with a Reason, like the checks after it.

Metadata travels over the PoP's mutual-TLS connection to the origin (/v1/tuf/); a push
notice only makes the PoP refresh sooner, it is never what is trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.errors import AdpopError
from appliance.snapshot.manifest import Reason, VerifyError, target_path

if TYPE_CHECKING:
    from tuf.ngclient.fetcher import FetcherInterface
    from tuf.ngclient.updater import Updater

# python-tuf and urllib3 are imported when a manifest is first checked, not with the
# supervisor: they cost it about 35 ms of start-up.
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 30.0


@functools.cache
def _fetcher_class() -> Callable[[ssl.SSLContext | None], FetcherInterface]:
    import urllib3
    from tuf.api import exceptions
    from tuf.ngclient.fetcher import FetcherInterface

    class Fetcher(FetcherInterface):
        """ngclient's downloads over this PoP's TLS (its client certificate, the origin's
        CA)."""

        def __init__(self, tls: ssl.SSLContext | None) -> None:
            self.pool = urllib3.PoolManager(ssl_context=tls, retries=False)

        def _fetch(self, url: str) -> Iterator[bytes]:
            try:
                resp = self.pool.request("GET", url, preload_content=False,
                                         timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT,
                                                                 read=READ_TIMEOUT))
            except urllib3.exceptions.HTTPError as exc:
                raise exceptions.DownloadError(f"{url}: {exc}") from exc
            if resp.status != 200:
                resp.release_conn()
                raise exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
            try:
                yield from resp.stream(65536)
            finally:
                resp.release_conn()

    return Fetcher


class TrustError(AdpopError):
    """A file given as the origin's TUF root is not one."""


def check_root(data: bytes, where: str) -> int:
    """The version of the TUF root in `data`, signed by a threshold of its own root keys;
    raises TrustError naming the problem."""
    from tuf.api import exceptions
    from tuf.api._payload import Root
    from tuf.api.metadata import Metadata

    try:
        md = Metadata.from_bytes(data)
        root = md.signed
        if not isinstance(root, Root):
            raise TrustError(f"{where} is TUF {root.type} metadata, not a root",
                             hint="give the origin's root.json")
        root.verify_delegate("root", md.signed_bytes, md.signatures)
    except exceptions.UnsignedMetadataError as exc:
        raise TrustError(f"{where}: the root is not signed by a threshold of its keys ({exc})",
                         hint="give the root.json the origin made") from exc
    except (exceptions.RepositoryError, ValueError, KeyError, TypeError) as exc:
        raise TrustError(f"{where} is not TUF root metadata ({exc})",
                         hint="give the origin's root.json (`adpop origin keys init` prints "
                              "where it is)") from exc
    return int(root.version)


def claimed(manifest: bytes) -> tuple[str, int]:
    """The (group, version) a manifest says it is: only where to look it up in the targets,
    believed once the targets list these very bytes. Raises VerifyError(MALFORMED)."""
    try:
        signed = json.loads(manifest)["signed"]
        group, version = signed["target_group"], signed["version"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerifyError(Reason.MALFORMED, f"manifest names no group and version ({exc})"
                          ) from exc
    if not isinstance(group, str) or not isinstance(version, int) or isinstance(version, bool):
        raise VerifyError(Reason.MALFORMED, "manifest's group or version has the wrong type")
    return group, version


class Trust:
    """The PoP's TUF client state: `folder` keeps the metadata it verified."""

    def __init__(self, folder: Path, root_file: Path, origin: str) -> None:
        self.folder = folder
        self.root_file = root_file
        self.base = f"{origin.rstrip('/')}/v1/tuf/"
        # One connection pool for the agent's life (the TLS context is the session's): each
        # sync reuses it instead of a new handshake.
        self._fetcher: tuple[ssl.SSLContext | None, FetcherInterface] | None = None

    def problem(self) -> str:
        """What keeps this PoP from trusting anything ("" when it has a root)."""
        if (self.folder / "root.json").is_file() or self.root_file.is_file():
            return ""
        return (f"no trusted root.json at {self.root_file}; give the PoP the origin's with "
                "`adpop pop trust FILE` or `adpop flash --config` (snapshot.trust_root)")

    def _updater(self, tls: ssl.SSLContext | None) -> Updater:
        """ngclient's Updater over this PoP's metadata folder and connection pool. Raises
        VerifyError while the PoP trusts no root at all."""
        from tuf.ngclient.updater import Updater

        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        problem = self.problem()
        if problem:
            raise VerifyError(Reason.UNKNOWN_KEY, problem)
        # Once a root is verified here, it (not the flashed one) is where trust starts.
        cached = (self.folder / "root.json").is_file()
        if self._fetcher is None or self._fetcher[0] is not tls:
            self._fetcher = (tls, _fetcher_class()(tls))
        return Updater(str(self.folder), self.base, fetcher=self._fetcher[1],
                       bootstrap=None if cached else self.root_file.read_bytes())

    def refresh(self, tls: ssl.SSLContext | None) -> None:
        """Brings the trusted root (and the rest) up to the origin's: after the origin rotated
        a key, what it signs with the new one is believed. Raises VerifyError. Blocking."""
        from tuf.api import exceptions

        try:
            self._updater(tls).refresh()
        except (exceptions.RepositoryError, exceptions.DownloadError, OSError,
                ValueError) as exc:
            raise VerifyError(Reason.MALFORMED, f"TUF metadata: {exc}") from exc

    def vouch(self, manifest: bytes, tls: ssl.SSLContext | None) -> None:
        """Returns when the origin's current TUF targets list `manifest` exactly; raises
        VerifyError. Blocking (downloads): run it in a thread."""
        from tuf.api import exceptions

        group, version = claimed(manifest)
        try:
            info = self._updater(tls).get_targetinfo(target_path(group, version))
        except exceptions.ExpiredMetadataError as exc:
            raise VerifyError(Reason.EXPIRED, f"TUF metadata expired (a freeze?): {exc}"
                              ) from exc
        except exceptions.UnsignedMetadataError as exc:
            # "targets was signed by 1/2 keys": some good signatures, short of the threshold.
            counted = re.search(r"signed by (\d+)/(\d+) keys", str(exc))
            short = counted is not None and 0 < int(counted[1]) < int(counted[2])
            raise VerifyError(Reason.THRESHOLD_NOT_MET if short else Reason.BAD_SIGNATURE,
                              f"TUF metadata: {exc}") from exc
        except exceptions.BadVersionNumberError as exc:
            raise VerifyError(Reason.ROLLBACK, f"TUF metadata: {exc}") from exc
        except exceptions.LengthOrHashMismatchError as exc:
            raise VerifyError(Reason.HASH_MISMATCH, f"TUF metadata: {exc}") from exc
        except exceptions.DownloadError as exc:
            raise VerifyError(Reason.UNREACHABLE, f"TUF metadata: {exc}") from exc
        except (exceptions.RepositoryError, OSError, ValueError) as exc:
            raise VerifyError(Reason.MALFORMED, f"TUF metadata: {exc}") from exc
        if info is None:
            raise VerifyError(Reason.NOT_LISTED, f"the origin's TUF targets do not list "
                              f"version {version} of group {group!r}")
        digest = hashlib.sha256(manifest).hexdigest()
        if info.length != len(manifest) or info.hashes.get("sha256") != digest:
            raise VerifyError(Reason.NOT_LISTED, f"version {version}'s manifest is not the "
                              "one the TUF targets list")
