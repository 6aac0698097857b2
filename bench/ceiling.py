#!/usr/bin/env python3
"""The ceiling a Python boot path is measured against: a bare ASGI app under uvicorn with httptools, answering
every request with the same bytes (a file's, or what a URL of a running Ktizo answered) and nothing else.

    python bench/ceiling.py --port 18900 --body-from http://127.0.0.1:8000/api/v1/config/download?mac=…
    python bench/ceiling.py --port 18900 --body-file worker.yaml --status 200 --content-type application/yaml

bench/storm.py starts it beside Ktizo, pinned to the same core, so the two are measured in the same run."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import uvicorn


def app_for(status: int, content_type: str, body: bytes) -> Any:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    start = {"type": "http.response.start", "status": status, "headers": headers}
    message = {"type": "http.response.body", "body": body}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(start)
        await send(message)

    return app


def fetch(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - a URL the operator gives
            return r.status, r.headers.get("content-type", "text/plain"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", "text/plain"), e.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18900)
    p.add_argument("--body-from", metavar="URL", help="serve what this URL answers (status, type and bytes)")
    p.add_argument("--body-file", type=Path)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--content-type", default="application/yaml")
    args = p.parse_args()
    if args.body_from:
        status, content_type, body = fetch(args.body_from)
    else:
        status, content_type = args.status, args.content_type
        body = args.body_file.read_bytes() if args.body_file else b"ok\n"
    uvicorn.run(
        app_for(status, content_type, body),
        host=args.host,
        port=args.port,
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
