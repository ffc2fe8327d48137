"""stdin/stdout ↔ one TCP connection to HOST:PORT on this machine, for qemu's
`guestfwd=...-cmd:` (qemu runs it once per guest connection; a `tcp:` target would be one
connection shared by all of them)."""

from __future__ import annotations

import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("relay: only loopback targets", file=sys.stderr)
        return 2
    sock = socket.create_connection((host, port), timeout=10)
    sock.setblocking(False)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, "in")
    selector.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in selector.select():
            if key.data == "in":
                data = os.read(stdin, 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    selector.unregister(stdin)
                    continue
                sock.sendall(data)
            else:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    return 0
                os.write(stdout, data)


if __name__ == "__main__":
    sys.exit(main())
