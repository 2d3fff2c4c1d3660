"""`lmscope serve SUITE`: browse a suite in a web browser (registered by ``lmscope.cli``)."""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS: tuple[str, ...] = ("serve",)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lmscope.errors import ConfigError
    from lmscope.serve.app import create_app

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0-65535, got {args.port}")
    app = create_app(args.suite, device=args.device)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lmscope serve: listening on {args.host}: anyone who can reach it can run the model")
    print(f"lmscope serve: http://{args.host}:{args.port}/ (API docs: /api, /openapi.json)")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(sub: Any) -> None:
    """Add `serve` to the `lmscope` parser."""
    p = sub.add_parser(
        "serve",
        help="browse a suite in a web browser (pages and a JSON API)",
        description="Serve a suite: overview, SAE and feature pages, the inspector, the steering "
        "playground and a JSON API under /api/. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("suite", help="suite folder (made by `lmscope train`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default=None, help="device for the model (default: best available)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip
    p.set_defaults(func=_cmd_serve)
