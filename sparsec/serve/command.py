"""`sparsec serve`: an OpenAI-compatible HTTP server over a compiled model.so.

Light at import (argparse only): the runtime, Starlette and uvicorn are imported inside
the command, which needs the ``serve`` extra (``pip install 'sparsec[serve]'``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import sys

from sparsec.arguments import int_range

API_KEY_ENV = "SPARSEC_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a compiled model.so over HTTP (OpenAI API, continuous batching)",
        description=(
            "Serve MODEL with the OpenAI API: POST /v1/chat/completions and "
            "/v1/completions (streamed or not), GET /v1/models and /health. Up to "
            "--parallel requests are decoded together, one native step for all of them "
            "(each weight read serves every stream); more wait in a queue of --max-queue, "
            "past which requests get HTTP 429. Stop it with Ctrl-C."
        ),
    )
    p.add_argument("model", help="a model.so made by `sparsec compile`")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, local only)"
    )
    p.add_argument(
        "--port",
        type=int_range(0, 65535),
        default=8000,
        help="TCP port (default: 8000; 0 picks a free one and prints it)",
    )
    p.add_argument(
        "--parallel",
        type=int_range(1),
        default=4,
        metavar="N",
        help="sequences decoded together per step, each with its own KV cache (memory: N x "
        "the KV cache that `sparsec inspect` shows; at most the model's tokens per call) "
        "(default: 4)",
    )
    p.add_argument(
        "--max-queue",
        type=int_range(0),
        default=64,
        metavar="N",
        help="requests that may wait for a free slot; more get HTTP 429 (default: 64)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on every /v1 request (default: "
        f"${API_KEY_ENV} if set, else no key)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="the model id clients send and /v1/models lists (default: MODEL's file name "
        "without .so)",
    )
    p.add_argument(
        "--threads",
        type=int_range(1, 1024),
        default=None,
        metavar="N",
        help="native worker threads (default: the model's, at most the CPUs available)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the weights hash check at load")
    p.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="map the weights from the file instead of copying them to 2 MiB huge pages",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level; info logs every request (default: warning)",
    )
    p.set_defaults(func=serve_command)


def _require_serve_extra() -> None:
    from sparsec.errors import MissingDependencyError

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"sparsec serve needs {', '.join(missing)}; install them with: "
            "pip install 'sparsec[serve]'"
        )


def _listen(host: str, port: int) -> socket.socket:
    from sparsec.errors import SparsecError

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise SparsecError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
            "(0 picks a free one) or --host"
        ) from exc
    return sock


def serve_command(args: argparse.Namespace) -> int:
    _require_serve_extra()
    from pathlib import Path

    import uvicorn

    from sparsec import runtime
    from sparsec.serve.app import build_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    name = args.model_name or Path(args.model).name.removesuffix(".so")
    sock = _listen(args.host, args.port)  # before the slow load: a taken port fails at once
    model = runtime.load(
        args.model,
        threads=args.threads,
        verify=not args.no_verify,
        huge_pages=False if args.no_huge_pages else None,
    )
    with model, model.engine(parallel=args.parallel, max_queue=args.max_queue) as engine:
        host, port = sock.getsockname()[:2]
        print(
            f"sparsec serve: {args.model} as {name!r} on http://{host}:{port}/v1 "
            f"({engine.parallel} parallel, KV caches {engine.cache_bytes / 2**20:.0f} MiB, "
            f"{model.threads} thread(s), queue {engine.max_queue}"
            f"{', API key required' if api_key else ''}); Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            build_app(engine, name, api_key),
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run(sockets=[sock])
    return 0
