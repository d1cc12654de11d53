"""`phi3-jax serve`: the OpenAI-compatible server, on uvicorn.

It loads the model, builds the engine, listens (localhost unless told otherwise), and builds
every program the engine can run before /health says ready. SIGTERM or Ctrl-C stops taking
requests, gives those in flight --grace seconds to finish, cancels the rest (each gets an error
chunk or status), and exits 0; a second signal cancels at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import threading
from collections.abc import Iterator

from phi3_jax.embedded import MODEL_DIR
from phi3_jax.generate_cli import add_model_arguments, load_model, positive_int
from phi3_jax.server import MAX_BODY

EMBEDDED_NAME = "phi3-jax-embedded"


def run_serve(args: argparse.Namespace) -> int:
    # Imported here: `phi3-jax` without the serve extra still runs its other commands.
    try:
        import uvicorn

        from phi3_jax.server.app import create_app
        from phi3_jax.server.metrics import Metrics
        from phi3_jax.server.service import EngineService
    except ImportError as e:
        raise ValueError(f"{e}: `phi3-jax serve` needs the serve extra "
                         f"(pip install \"phi3-jax[serve]\")") from None
    if getattr(args, "distributed", False):
        raise ValueError("serve runs in one process; use --mesh for the devices of this host")
    if not _is_loopback(args.host) and args.api_key is None:
        print(f"phi3-jax serve: warning: listening on {args.host} without --api-key: anyone "
              f"who can reach this address can use the model", file=sys.stderr)
    model = load_model(args)
    engine = model.engine(max_slots=args.max_slots, max_len=args.max_len,
                          max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                          decode_steps=args.decode_steps,
                          buckets_per_octave=args.buckets_per_octave,
                          bucket_rows=args.bucket_rows,
                          compilation_cache=args.compilation_cache)
    service = EngineService(engine, Metrics(engine))
    name = args.served_model_name or _default_name(args.model)
    url = f"http://{args.host}:{args.port}"

    def ready(programs: int, seconds: float) -> None:
        print(f"phi3-jax serve: {name} ready on {url} ({programs} programs built in "
              f"{seconds:.1f} s; {args.max_slots} slots of {engine.shapes.max_len} tokens)",
              file=sys.stderr, flush=True)

    service.on_ready = ready
    app = create_app(service, name, api_key=args.api_key, max_body=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, lifespan="on",
                            timeout_graceful_shutdown=args.grace + 10)
    _Server(config, service, args.grace).run()
    return 0


class _Server:
    """uvicorn's server with this command's shutdown: the first signal drains (see the module
    docstring), and the process then exits 0 instead of re-raising the signal."""

    def __init__(self, config, service, grace: float):
        import uvicorn

        outer = self

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                with outer.signals():
                    yield

        self.server = Server(config)
        self.service = service
        self.grace = grace
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain: asyncio.Task | None = None

    def run(self) -> None:
        asyncio.run(self.serve())

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame) -> None:
        self.loop.call_soon_threadsafe(self._begin_shutdown, signum)

    def _begin_shutdown(self, signum: int) -> None:
        if self.drain is not None:  # a second signal: cancel what is left now
            self.service.cancel_all()
            return
        print(f"phi3-jax serve: {signal.Signals(signum).name}: finishing the requests in "
              f"flight (up to {self.grace:g} s), then exiting", file=sys.stderr, flush=True)
        self.server.should_exit = True  # uvicorn stops accepting connections
        self.drain = asyncio.ensure_future(self.service.drain(self.grace))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_name(model: str) -> str:
    if os.path.abspath(model) == os.path.abspath(MODEL_DIR):
        return EMBEDDED_NAME
    return os.path.basename(os.path.normpath(model)) or model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI-compatible API)",
                       description="An OpenAI-compatible server: /v1/completions, "
                                   "/v1/chat/completions, /v1/models, /health, /metrics.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("PHI3_JAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: "
                        "$PHI3_JAX_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: the folder's name)")
    g = p.add_argument_group("engine")
    g.add_argument("--max-slots", type=positive_int, default=16, metavar="N",
                   help="requests decoding together (KV-cache rows; default 16)")
    g.add_argument("--max-len", type=positive_int, default=None, metavar="L",
                   help="tokens per request, prompt included (default: the model's context, "
                        "at most 4096)")
    g.add_argument("--max-queue", type=int, default=256, metavar="Q",
                   help="requests waiting for a row; past it the server answers 429 "
                        "(default 256)")
    g.add_argument("--prefill-chunk", type=positive_int, default=512, metavar="T",
                   help="longest prompt chunk per call, a power of two (default 512)")
    g.add_argument("--decode-steps", type=positive_int, default=8, metavar="K",
                   help="decode steps per device call while nothing waits (default 8)")
    g.add_argument("--buckets-per-octave", type=positive_int, default=2, metavar="B",
                   help="length buckets per octave for prompt chunks and cache reads: more "
                        "waste less compute, fewer build fewer programs (default 2)")
    g.add_argument("--bucket-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="decode calls run only the busy rows, in buckets of 2, 4, 8, ... "
                        "(default); --no-bucket-rows: every call runs all rows, and warm-up "
                        "builds fewer programs")
    s = p.add_argument_group("server")
    s.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish "
                        "before they are cancelled (default 30)")
    s.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY, metavar="BYTES",
                   help=f"largest request body (default {MAX_BODY}); larger ones get 413")
    s.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=run_serve)
