"""The bridge between the server's event loop and the engine's thread.

Handlers never wait on device work: `submit` only queues requests (Engine.submit validates and
encodes, host work), and each output comes back from the engine's thread through
`loop.call_soon_threadsafe` onto an asyncio queue per HTTP request. A handler that goes away
(client disconnect, shutdown) cancels its engine requests, which frees their cache rows at the
engine's next step.

Faults: the engine fails only the requests a failing device call served (finish_reason
"error": the handler answers 500) and goes on. Should its thread die anyway, a watchdog fails
every request in flight and /health turns 503, so that nothing waits forever and an
orchestrator restarts the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

from phi3_jax.engine import (
    Engine,
    GenerationSettings,
    QueueFull,
    Request,
    RequestOutput,
    SettingsError,
)
from phi3_jax.server.errors import APIError, invalid
from phi3_jax.server.metrics import Metrics
from phi3_jax.server.protocol import setting_param

WATCHDOG_PERIOD = 0.5  # seconds between checks of the engine's thread


class Group:
    """The engine requests of one HTTP request (n choices x prompts); their outputs arrive
    as (choice index, RequestOutput) on one queue, in the order the engine made them."""

    def __init__(self, service: EngineService, endpoint: str):
        self.service = service
        self.endpoint = endpoint
        self.requests: list[Request] = []
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.started = time.perf_counter()
        self.last: dict[int, float] = {}  # choice -> when its latest tokens arrived
        self.open = 0  # requests not finished yet

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output until each request has finished."""
        while self.open:
            index, output = await self.queue.get()
            if output.finish_reason is not None:
                self.open -= 1
            yield index, output

    def cancel(self) -> None:
        """Ends the requests still running (their rows are freed at the next engine step)."""
        for request in self.requests:
            if not request.finished:
                self.service.engine.cancel(request)

    def _arrive(self, index: int, output: RequestOutput) -> None:
        """On the event loop: metrics, then the handler's queue."""
        now = time.perf_counter()
        k = len(output.token_ids)
        metrics = self.service.metrics
        if k:
            metrics.generation_tokens.inc(k)
            previous = self.last.get(index)
            if previous is None:
                metrics.ttft.observe(now - self.started)
            else:
                for _ in range(k):  # several tokens of one decode call share the wait
                    metrics.itl.observe((now - previous) / k)
            self.last[index] = now
        if output.finish_reason is not None:
            metrics.finished.labels(output.finish_reason).inc()
            self.service._live.pop(self.requests[index].request_id, None)
        self.queue.put_nowait((index, output))


class EngineService:
    """Runs `engine` in its thread for one event loop; see the module docstring."""

    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self.ready = False  # warm: every program built
        self.draining = False
        self.failure: str | None = None  # why the engine stopped, if it did
        self._live: dict[str, Group] = {}  # request id -> its group, until it finishes
        self.on_ready: Callable[[int, float], None] | None = None  # (programs, seconds)
        self.warmed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task | None = None

    # ---- life cycle ---------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        """Starts the engine's thread and the watchdog; builds the programs in a thread of its
        own (the server answers /health with 503 meanwhile), then marks the service ready."""
        self._loop = asyncio.get_running_loop()
        self.engine.start()
        self._watchdog = asyncio.create_task(self._watch())
        if not warmup:
            self._mark_ready(0, 0.0)
            self.warmed.set()
            return

        def build() -> None:
            start = time.perf_counter()
            try:
                count = self.engine.warmup()
            except Exception as e:  # reported through /health; the process keeps answering
                self._loop.call_soon_threadsafe(self._fail, f"warm-up failed: {e}")
            else:
                self._loop.call_soon_threadsafe(self._mark_ready, count,
                                                time.perf_counter() - start)
            self._loop.call_soon_threadsafe(self.warmed.set)

        # A daemon thread: a shutdown during warm-up does not wait for the compiler.
        threading.Thread(target=build, name="phi3-jax-warmup", daemon=True).start()

    def _mark_ready(self, programs: int, seconds: float) -> None:
        self.ready = True
        self.metrics.warm()
        self.programs, self.warmup_seconds = programs, seconds
        if self.on_ready is not None:
            self.on_ready(programs, seconds)

    async def drain(self, grace: float) -> None:
        """Stops taking requests; those in flight get `grace` seconds to finish, then the rest
        are cancelled (their handlers answer with an error)."""
        self.draining = True
        deadline = time.monotonic() + grace
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.cancel_all()

    def cancel_all(self) -> None:
        for group in {id(g): g for g in self._live.values()}.values():
            group.cancel()

    async def stop(self) -> None:
        """After drain: stops the engine's thread (nothing is left in it)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.to_thread(self.engine.shutdown, 0)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            if not self.engine.running and self.failure is None:
                self._fail("the engine's thread stopped")

    def _fail(self, why: str) -> None:
        """The engine cannot serve: every request in flight ends with an error."""
        self.failure = why
        for rid, group in list(self._live.items()):
            index = next(i for i, r in enumerate(group.requests) if r.request_id == rid)
            group._arrive(index, RequestOutput(rid, [], None, finish_reason="error", error=why))

    @property
    def status(self) -> str:
        if self.failure is not None:
            return f"failed: {self.failure}"
        if self.draining:
            return "draining"
        return "ok" if self.ready else "warming up"

    # ---- requests -----------------------------------------------------------------------------

    def submit(self, endpoint: str, work: list[tuple[list[int], GenerationSettings]],
               param: str) -> Group:
        """Queues one engine request per (prompt ids, settings), all or none. Raises APIError:
        503 before warm-up ends or while draining, 429 when the queue is full, 400 for a
        request the engine refuses (`param` names the field that carried the prompt)."""
        if self.failure is not None:
            raise APIError(503, f"the engine is not serving: {self.failure}")
        if self.draining:
            raise APIError(503, "the server is shutting down")
        if not self.ready:
            raise APIError(503, "the server is warming up (building its programs); retry when "
                                "GET /health answers 200")
        group = Group(self, endpoint)
        loop = self._loop
        try:
            for index, (ids, settings) in enumerate(work):
                def deliver(output: RequestOutput, index: int = index) -> None:
                    loop.call_soon_threadsafe(group._arrive, index, output)

                request = self.engine.submit(ids, settings, on_output=deliver,
                                             request_id=uuid.uuid4().hex)
                group.requests.append(request)
                group.open += 1
                self._live[request.request_id] = group
        except QueueFull as e:
            self._forget(group)
            raise APIError(429, f"{e}; retry later", None, "queue_full") from None
        except SettingsError as e:  # the message starts with the setting's name
            self._forget(group)
            raise invalid(str(e), setting_param(str(e))) from None
        except ValueError as e:  # the prompt
            self._forget(group)
            raise invalid(str(e), param) from None
        except RuntimeError as e:  # the engine began shutting down meanwhile
            self._forget(group)
            raise APIError(503, str(e)) from None
        self.metrics.prompt_tokens.inc(sum(len(r.prompt_ids) for r in group.requests))
        return group

    def _forget(self, group: Group) -> None:
        group.cancel()
        for request in group.requests:
            self._live.pop(request.request_id, None)


def with_seed(settings: GenerationSettings, choice: int) -> GenerationSettings:
    """Choice `choice` of n: a seeded request's choices draw from seeds seed, seed+1, ... so
    they differ from each other and each is reproducible."""
    if settings.seed is None or choice == 0:
        return settings
    return dataclasses.replace(settings, seed=(settings.seed + choice) % 2**64)
