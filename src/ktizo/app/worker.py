"""One worker of ``ktizo serve --workers N`` (see ``ktizo.app.workers``): its settings arrive on stdin, its
listening sockets as inherited file descriptors."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

from ktizo.app.server import raise_file_limit, serve
from ktizo.app.wiring import build_services
from ktizo.services.authority import TlsFiles
from ktizo.settings import Settings


def main() -> None:
    spec = json.loads(sys.stdin.read())
    settings = Settings(**spec["settings"])
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[worker {spec['index']}]: %(message)s",
    )
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    raise_file_limit()
    sockets = [socket.socket(fileno=fd) for fd in spec["fds"]]
    services = build_services(settings, max_connections=spec["max_connections"])
    tls = TlsFiles(*(Path(p) for p in spec["tls"])) if spec["tls"] else None
    serve(settings, services, spec["max_connections"], sockets[1] if len(sockets) > 1 else None, sockets[0], tls)


if __name__ == "__main__":
    main()
