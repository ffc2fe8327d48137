"""Where the supervisor's TLS clients find the system's certificate authorities.

OpenSSL's default trust is a bundle file and a hashed directory holding the same CAs
(update-ca-certificates writes both). A context that loads the defaults parses the whole
bundle, 150 certificates, at once; the directory is read one certificate at a time, when a
verification needs it. aiohttp builds two such contexts when it is imported: about 35 ms of a
process's start on a server, and a second of the supervisor's start at an emulated boot. So
when the directory is there and no one chose a bundle, the directory alone is used. What is
trusted does not change.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import MutableMapping
from pathlib import Path

# Named in SSL_CERT_FILE and never created: OpenSSL skips a missing default file quietly.
NO_BUNDLE = "adpop-trust-in-directory-only"


def trust_directory_only(environ: MutableMapping[str, str] = os.environ,
                         directory: str | None = None) -> bool:
    """Points SSL_CERT_FILE past the bundle when the default directory (or `directory`) has
    hashed certificates and neither SSL_CERT_FILE nor SSL_CERT_DIR is set. Returns whether
    it did; call it before aiohttp is imported."""
    if "SSL_CERT_FILE" in environ or "SSL_CERT_DIR" in environ:
        return False
    directory = directory or ssl.get_default_verify_paths().capath
    if not directory or not any(Path(directory).glob("*.[0-9]")):
        return False
    environ["SSL_CERT_FILE"] = str(Path(directory) / NO_BUNDLE)
    return True
