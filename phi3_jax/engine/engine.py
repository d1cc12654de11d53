"""The inference engine: continuous batching over a fixed number of KV-cache rows.

Requests come in at any time (`submit`), each with its own prompt, settings and stop rules,
and leave as soon as they end, freeing their row for the next. Each iteration (`step`):

1. cancelled requests leave; waiting requests take free rows;
2. prompts go in, a chunk at a time (phi3_jax.engine.scheduler), each prompt alone, and a
   prompt's first token goes out at once;
3. one decode call runs the decoding rows (in a row bucket) for one or more steps on device;
4. each request's new tokens (with their text and logprobs) go out, and rows that end (a stop
   id, a stop string, max_new_tokens, the end of the context) are freed at once.

A row whose sequence grows past LongRoPE's original_max_position_embeddings under the
"per_sequence" policy stops decoding and goes in again alone with the long factors, as
transformers recomputes a lone sequence, while the other rows keep decoding.

Drive it step by step (`step`, `run_until_done`: tests, scripts, embedding in another loop),
or let it run in its own thread (`start`), where `submit`, `cancel` and iterating over a
Request are safe from any thread: that is what the server uses.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import os
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from phi3_jax import sharding
from phi3_jax.cache import KVCache
from phi3_jax.compilation import enable_compilation_cache
from phi3_jax.engine import programs
from phi3_jax.engine.request import (
    Request,
    RequestOutput,
    TokenLogprob,
    check_prompt_fits,
    encode_prompt,
)
from phi3_jax.engine.scheduler import Shapes, decode_steps, prefill_budget
from phi3_jax.engine.settings import MAX_LOGPROBS, GenerationSettings, SettingsError
from phi3_jax.engine.slots import MAX_STOP_IDS, NEVER, Slot, SlotTable
from phi3_jax.engine.streaming import TextStream, final_text
from phi3_jax.hooks import Hook, check_names
from phi3_jax.sampling import RowSampling

if TYPE_CHECKING:
    from phi3_jax.api import Phi3

DEFAULT_MAX_LEN = 4096


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound (a server answers 429)."""


class Engine:
    """Continuous batching over `max_slots` cache rows of `max_len` tokens each.

    max_len defaults to the model's context, at most 4096 (the KV cache holds max_slots x
    max_len tokens). prefill_chunk: the longest prompt chunk one call takes (a power of two).
    decode_steps: the most decode steps one device call runs while nothing waits (fewer host
    round trips; a finishing row idles until the call ends). max_logprobs: the most
    alternatives per token a request may ask for (every program computes that many).
    max_queue: the most requests waiting for a row (None: unbounded); past it submit raises
    QueueFull. bucket_rows: a decode call runs only the rows that decode, in the smallest of
    a few row buckets that holds them (phi3_jax.engine.scheduler), at the price of one more
    program per bucket; off, every call runs all max_slots rows (what `generate` does: its
    one-off engines would compile a program per bucket they pass through). hooks:
    phi3_jax.hooks applied to every request, at every prompt chunk and decode step.
    """

    def __init__(self, model: Phi3, *, max_slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 512, decode_steps: int = 8,
                 max_logprobs: int = MAX_LOGPROBS, max_queue: int | None = None,
                 buckets_per_octave: int = 2, bucket_rows: bool = True,
                 compilation_cache: str | os.PathLike | None = None,
                 hooks: dict[str, Hook] | None = None):
        config = model.config
        if hooks:
            check_names(hooks, config.num_hidden_layers)
        if max_len is None:
            max_len = min(config.max_position_embeddings, DEFAULT_MAX_LEN)
        if isinstance(max_len, int) and max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} is longer than the model's context "
                             f"(max_position_embeddings {config.max_position_embeddings})")
        if not isinstance(max_logprobs, int) or not 0 <= max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {max_logprobs!r}")
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 0):
            raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
        if model.mesh is not None:
            sharding.check_batch(max_slots, model.mesh)
        if compilation_cache is not None:
            enable_compilation_cache(compilation_cache)
        self.model = model
        # Applied at every prompt chunk and decode step of every request; their arrays are
        # traced, so engines that differ only in a hook's values share their programs.
        self.hooks = dict(hooks) if hooks else None
        # On a mesh the rows split over the data axis: every call runs them all.
        self.shapes = Shapes(max_slots, max_len, prefill_chunk, decode_steps, max_logprobs,
                             buckets_per_octave, bucket_rows and model.mesh is None)
        self.max_queue = max_queue
        self.table = SlotTable(max_slots)
        self._lock = threading.Lock()  # guards _waiting and _cancelled
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one step at a time
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[str] = set()
        self._serial = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        # Requests without a seed get fresh ones; in a multi-process job every process must
        # draw the same, so the stream is fixed there.
        self._seeds = np.random.default_rng(0 if jax.process_count() > 1 else None)
        rs = config.rope_scaling
        self._original_max = rs.original_max_position_embeddings if rs is not None else None
        self._eos = _eos_ids(model)
        self._reset_device_state()

    # ---- state on the device ---------------------------------------------------------------

    def _reset_device_state(self) -> None:
        self.cache, self.seen = _empty_state(self.model.config, self.shapes.max_slots,
                                             self.shapes.max_len, self.model.dtype,
                                             self.model.mesh)()

    # ---- requests --------------------------------------------------------------------------

    def submit(self, prompt: Any, settings: GenerationSettings | None = None, *,
               request_id: str | None = None,
               on_output: Callable[[RequestOutput], None] | None = None,
               **kwargs: Any) -> Request:
        """Queues a request and returns its handle. `prompt`: token ids, a string or a chat;
        settings: a GenerationSettings and/or its fields as keywords. A bad request raises
        ValueError (SettingsError for a setting) here and disturbs nothing in flight."""
        settings = GenerationSettings.from_kwargs(settings, **kwargs)
        request = self.make_request(prompt, settings, request_id=request_id, on_output=on_output)
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is shutting down")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests wait for a slot)")
            self._waiting.append(request)
            self._wake.notify_all()
        return request

    def make_request(self, prompt: Any, settings: GenerationSettings, *,
                     request_id: str | None = None,
                     on_output: Callable[[RequestOutput], None] | None = None) -> Request:
        """Validates and encodes a request without queueing it."""
        model = self.model
        config = model.config
        ids = encode_prompt(model.tokenizer, prompt)
        check_prompt_fits(config, ids, max_len=self.shapes.max_len)
        settings = settings.resolve(model.generation_config)
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(settings, name)
            if n is not None and n > self.shapes.top_n:
                raise SettingsError(f"{name}={n} is more than this engine's max_logprobs "
                                    f"({self.shapes.top_n})")
        if settings.stop and model.tokenizer is None:
            raise SettingsError("stop strings need a tokenizer to decode the output; the model "
                                "has none")
        stop_ids = tuple(sorted(set(settings.stop_token_ids)
                                | (set() if settings.ignore_eos else self._eos)))
        bad = [i for i in stop_ids if i >= config.vocab_size]
        if bad:
            raise SettingsError(f"stop_token_ids {bad} are outside the vocabulary "
                                f"[0, {config.vocab_size})")
        if len(stop_ids) > MAX_STOP_IDS:
            raise SettingsError(f"{len(stop_ids)} stop ids (eos ids and stop_token_ids); at "
                                f"most {MAX_STOP_IDS} are supported")
        if settings.seed is None:
            settings = GenerationSettings.from_kwargs(
                settings, seed=int(self._seeds.integers(0, 2**63)))
        return Request(request_id or uuid.uuid4().hex, ids, settings, stop_ids,
                       serial=next(self._serial), with_text=model.tokenizer is not None,
                       on_output=on_output)

    def cancel(self, request: Request | str) -> None:
        """Ends a request (waiting or running) with finish_reason "cancelled" and frees its row
        at the next step; a finished or unknown request is ignored."""
        rid = request.request_id if isinstance(request, Request) else request
        with self._lock:
            self._cancelled.add(rid)
            self._wake.notify_all()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._cancelled) or any(
                s is not None for s in self.table.slots)

    @property
    def active(self) -> int:
        """Rows holding a request."""
        return sum(s is not None for s in self.table.slots)

    @property
    def running(self) -> bool:
        """The engine's own thread (`start`) is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---- one iteration ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: admissions, prompt chunks, a decode call, outputs. Returns the outputs
        it delivered to the requests: what the admissions and prompt chunks produced (a
        prompt's first token) is delivered before the decode call, the rest after it, so a
        request may get two outputs from one step."""
        with self._step_lock:
            out: dict[str, _Pending] = {}
            self._cancel_and_admit(out)
            live = self.table.live()
            decoding = any(s.phase == "decode" for s in live)
            budget = prefill_budget(self.shapes, decoding=decoding)
            for slot in [s for s in live if s.phase != "decode"]:
                while slot.chunks and budget > 0:
                    budget -= slot.chunks[0].count
                    self._guarded(lambda s=slot: self._prefill_chunk(s, out), [slot], out)
                if budget <= 0:
                    break
            # A prompt's first token goes out now, not after the decode call.
            delivered = [p.deliver() for p in out.values()]
            out = {}
            rows = self.table.live("decode")
            if rows:
                with self._lock:
                    waiting = bool(self._waiting) and bool(self.table.free())
                prefilling = any(s.phase != "decode" for s in self.table.live())
                steps = decode_steps(self.shapes, prefilling=prefilling, waiting=waiting)
                self._guarded(lambda: self._decode(rows, steps, out), rows, out)
            return delivered + [p.deliver() for p in out.values()]

    def run_until_done(self) -> None:
        """Steps until nothing waits or runs (the caller's thread drives the engine)."""
        if self._thread is not None:
            raise RuntimeError("the engine runs in its own thread; wait on the requests")
        while self.has_work():
            self.step()

    def _cancel_and_admit(self, out: dict[str, _Pending]) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = collections.deque()
            for request in self._waiting:
                if request.request_id in cancelled:
                    _pending(out, request).finish("cancelled")
                else:
                    kept.append(request)
            self._waiting = kept
            for slot in self.table.live():
                if slot.request.request_id in cancelled:
                    self._finish(slot, "cancelled", out)
            admitted = []
            for index in self.table.free():
                if not self._waiting:
                    break
                admitted.append((index, self._waiting.popleft()))
        for index, request in admitted:
            self.table.put(self._new_slot(index, request))

    def _new_slot(self, index: int, request: Request) -> Slot:
        settings = request.settings
        P = len(request.prompt_ids)
        context = min(self.shapes.max_len, self.model.config.max_position_embeddings)
        use_long, halt_at = False, NEVER
        if self._original_max is not None:
            if settings.rope_policy == "always_long" or self._original_max < P:
                use_long = True
            else:
                halt_at = self._original_max
        seed = settings.seed % 2**64
        tokenizer = self.model.tokenizer
        return Slot(request=request, index=index, sequence=list(request.prompt_ids),
                    prompt_len=P, budget=min(settings.max_new_tokens, context - P),
                    use_long=use_long, halt_at=halt_at,
                    seeds=np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint32),
                    text=TextStream(tokenizer, settings.stop) if tokenizer is not None else None,
                    chunks=self.shapes.chunks(P))

    def _row_sampling(self, slot: Slot) -> dict[str, float]:
        s = slot.request.settings
        return dict(temperature=s.temperature, top_k=min(s.top_k, self.model.config.vocab_size),
                    top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty)

    def _prefill_chunk(self, slot: Slot, out: dict[str, _Pending]) -> None:
        chunk = slot.chunks.pop(0)
        seq = slot.sequence
        tokens = np.zeros((1, chunk.T), np.int32)
        tokens[0, :chunk.count] = seq[chunk.start:chunk.start + chunk.count]
        want_prompt = (slot.phase == "prefill"
                       and slot.request.settings.prompt_logprobs is not None)
        next_ids = np.full((1, chunk.T), -1, np.int32)
        if want_prompt:
            after = seq[chunk.start + 1:min(chunk.start + chunk.count + 1, slot.prompt_len)]
            next_ids[0, :len(after)] = after
        s = {k: np.array([v], _DTYPES[k]) for k, v in self._row_sampling(slot).items()}
        self.cache, self.seen, drawn, prompt = programs.prefill(
            self.model.graph, self.model.params, self.cache, self.seen, np.int32(slot.index),
            tokens, np.int32(chunk.start), np.int32(chunk.count), np.bool_(slot.use_long),
            next_ids, RowSampling(**s), slot.seeds[None], self.hooks, read_len=chunk.read_len,
            top_n=self.shapes.top_n, prompt_top_n=self.shapes.top_n if want_prompt else None,
            mesh=self.model.mesh)
        pending = _pending(out, slot.request)
        if want_prompt:
            self._record_prompt_logprobs(slot, chunk, _host(prompt), pending)
        if slot.chunks:
            return
        slot.phase = "decode"
        d = _host(drawn)
        self._accept(slot, int(d.tokens[0]), float(d.logprobs[0]), d.top_ids[0],
                     d.top_logprobs[0], out)

    def _record_prompt_logprobs(self, slot: Slot, chunk, prompt: programs.Drawn,
                                pending: _Pending) -> None:
        n = slot.request.settings.prompt_logprobs
        if chunk.start == 0:
            slot.prompt_logprobs = [None]
        for j in range(chunk.count):
            token = int(prompt.tokens[j])
            if token < 0:
                break
            slot.prompt_logprobs.append(_logprob(token, prompt.logprobs[j], prompt.top_ids[j],
                                                 prompt.top_logprobs[j], n))
        if not slot.chunks:
            pending.prompt_logprobs = slot.prompt_logprobs

    def _decode(self, rows: list[Slot], steps: int, out: dict[str, _Pending]) -> None:
        needed = min(max(s.position for s in rows) + steps, self.shapes.max_len)
        batch = self.table.decode_batch(self.shapes.decode_rows(len(rows)))
        arrays = self.table.decode_arrays(self._row_sampling, batch)
        names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
        row_sampling = RowSampling(**{k: arrays.pop(k) for k in names})
        inputs = programs.DecodeInputs(**arrays, sampling=row_sampling)
        mesh = self.model.mesh
        if mesh is not None:  # else the call takes the host arrays (a device_put each: 3 ms)
            inputs = jax.tree.map(lambda a: sharding.shard_batch(a, mesh), inputs)
        self.cache, self.seen, drawn = programs.decode(
            self.model.graph, self.model.params, self.cache, self.seen, inputs,
            np.int32(steps), self.hooks, read_len=self.shapes.read_len(needed),
            max_steps=self.shapes.decode_steps, top_n=self.shapes.top_n, mesh=mesh)
        d = _host(drawn)
        batch_row = {r: b for b, r in enumerate(batch)}
        for slot in rows:
            i = batch_row[slot.index]
            for step in range(steps):
                token = int(d.tokens[step, i])
                if token < 0 or slot.phase != "decode":
                    break
                self._accept(slot, token, float(d.logprobs[step, i]), d.top_ids[step, i],
                             d.top_logprobs[step, i], out)
            if slot.phase == "decode" and slot.position == slot.halt_at:
                # LongRoPE crossing: the whole sequence goes in again with the long factors.
                slot.phase, slot.use_long, slot.halt_at = "reprefill", True, NEVER
                slot.chunks = self.shapes.chunks(len(slot.sequence))

    def _accept(self, slot: Slot, token: int, logprob: float, top_ids: np.ndarray,
                top_logprobs: np.ndarray, out: dict[str, _Pending]) -> None:
        """A drawn token joins the request's output; ends the request where it must."""
        request = slot.request
        pending = _pending(out, request)
        slot.sequence.append(token)
        pending.token_ids.append(token)
        n = request.settings.logprobs
        if n is not None:
            pending.logprobs.append(_logprob(token, logprob, top_ids, top_logprobs, n))
        reason = None
        # An eos or stop id never reaches the text; a stop string cuts the text before it.
        if token in request.stop_ids or (slot.text is not None and slot.text.put(token)):
            reason = "stop"
        elif slot.drawn >= slot.budget:
            reason = "length"
        if reason is not None:
            self._finish(slot, reason, out)
        elif slot.text is not None:
            pending.text += slot.text.take()

    def _finish(self, slot: Slot, reason: str, out: dict[str, _Pending],
                error: str | None = None) -> None:
        request = slot.request
        pending = _pending(out, request)
        if slot.text is not None:
            slot.text.finish()
            pending.text += slot.text.take()
            request.final_text = final_text(self.model.tokenizer,
                                            slot.sequence[slot.prompt_len:], request.stop_ids,
                                            request.settings.stop)
        pending.finish(reason, error)
        slot.phase = "done"
        self.table.release(slot)

    def _guarded(self, run: Callable[[], None], slots: list[Slot],
                 out: dict[str, _Pending]) -> None:
        """Runs a device call; if it fails, the requests it served fail (finish_reason "error")
        and the engine goes on. A failure that consumed the donated cache loses every row's
        state, so then every running request fails."""
        try:
            run()
        except Exception as e:  # a device or compile error must not take the engine down
            message = f"{type(e).__name__}: {e}"
            lost = any(x.is_deleted() for x in jax.tree.leaves((self.cache, self.seen)))
            if lost:
                self._reset_device_state()
                slots = self.table.live()
            for slot in slots:
                if slot.phase != "done":
                    self._finish(slot, "error", out, error=message)

    # ---- warm-up ---------------------------------------------------------------------------

    def warmup(self, *, prompt_logprobs: bool = True, threads: int | None = None) -> int:
        """Compiles (or loads from the persistent compilation cache) every program this engine
        can run (scheduler.Shapes.program_shapes, with and without prompt logprobs), in
        `threads` worker threads (XLA compiles without holding Python's lock). Afterwards no
        request compiles anything. Returns the number of programs."""
        model = self.model
        cache, seen = jax.eval_shape(lambda: (self.cache, self.seen))
        jobs = []
        for shape in self.shapes.program_shapes():
            if shape[0] == "prefill":
                _, T, read_len = shape
                for top in ({None, self.shapes.top_n} if prompt_logprobs else {None}):
                    jobs.append(functools.partial(
                        programs.prefill.lower, model.graph, model.params, cache, seen,
                        np.int32(0), np.zeros((1, T), np.int32), np.int32(0), np.int32(1),
                        np.bool_(False), np.zeros((1, T), np.int32), _one_row_sampling(),
                        np.zeros((1, 2), np.uint32), self.hooks, read_len=read_len,
                        top_n=self.shapes.top_n, prompt_top_n=top, mesh=model.mesh))
            else:
                _, rows, read_len = shape
                arrays = self.table.decode_arrays(lambda s: {}, list(range(rows)))
                names = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
                rs = RowSampling(**{k: arrays.pop(k) for k in names})
                inputs = programs.DecodeInputs(**arrays, sampling=rs)
                if model.mesh is not None:  # as _decode passes them
                    inputs = jax.tree.map(lambda a: sharding.shard_batch(a, model.mesh), inputs)
                jobs.append(functools.partial(
                    programs.decode.lower, model.graph, model.params, cache, seen, inputs,
                    np.int32(1), self.hooks, read_len=read_len,
                    max_steps=self.shapes.decode_steps, top_n=self.shapes.top_n, mesh=model.mesh))
        workers = threads or min(len(jobs), os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(lambda j=j: j().compile()) for j in jobs]:
                future.result()
        return len(jobs)

    # ---- its own thread --------------------------------------------------------------------

    def start(self) -> Engine:
        """Runs the engine in a background thread until `shutdown`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="phi3-jax-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._cancelled
                           or any(s is not None for s in self.table.slots)):
                    self._wake.wait()
                if self._closing and not (self._waiting or self._cancelled or any(
                        s is not None for s in self.table.slots)):
                    return
            self.step()

    def shutdown(self, grace: float | None = None) -> None:
        """Stops taking requests, lets those in flight finish for up to `grace` seconds (None:
        as long as they take), cancels the rest, and stops the thread."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread is None:
            return
        self._thread.join(grace)
        if self._thread.is_alive():
            with self._lock:
                self._cancelled |= {r.request_id for r in self._waiting}
                self._cancelled |= {s.request.request_id for s in self.table.slots if s}
                self._wake.notify_all()
            self._thread.join()
        self._thread = None


# ---- helpers ------------------------------------------------------------------------------

_DTYPES = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32,
               repetition_penalty=np.float32)


@functools.lru_cache(maxsize=16)
def _empty_state(config, rows: int, max_len: int, dtype, mesh) -> Callable[[], tuple]:
    """A program that makes an empty KV cache and `seen` table (on a mesh, straight onto their
    shards): one dispatch, where a zeros call per array cost generate() 1.7 ms."""
    def make() -> tuple[KVCache, jax.Array]:
        return (KVCache.init(config, rows, max_len, dtype),
                jnp.zeros((rows, config.vocab_size), bool))

    if mesh is None:
        return jax.jit(make)
    return jax.jit(make, out_shardings=(sharding.cache_shardings(config, mesh, rows),
                                        sharding.batch_sharding(mesh)))


def _one_row_sampling() -> RowSampling:
    return RowSampling(np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32),
                       np.zeros(1, np.float32), np.ones(1, np.float32))


def _host(tree: Any) -> Any:
    return jax.tree.map(sharding.to_host, tree)


def _logprob(token: int, logprob: Any, top_ids: np.ndarray, top_logprobs: np.ndarray,
             n: int) -> TokenLogprob:
    top = tuple((int(i), float(lp)) for i, lp in zip(top_ids[:n], top_logprobs[:n],
                                                     strict=True))
    return TokenLogprob(token, float(logprob), top)


def _eos_ids(model: Phi3) -> set[int]:
    """The checkpoint's end ids: generation_config.json's and config.json's."""
    gen = model.generation_config.get("eos_token_id")
    ids = set() if gen is None else ({gen} if isinstance(gen, int) else set(gen))
    return {int(i) for i in ids | set(model.config.eos_token_id)
            if 0 <= int(i) < model.config.vocab_size}


class _Pending:
    """What one step produced for one request, delivered at the end of the step."""

    def __init__(self, request: Request):
        self.request = request
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs = None
        self.finish_reason: str | None = None
        self.error: str | None = None

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error

    def deliver(self) -> RequestOutput:
        request = self.request
        text = self.text if request.with_text else None
        output = RequestOutput(
            request.request_id, self.token_ids, text,
            self.logprobs if request.settings.logprobs is not None else None,
            self.finish_reason, self.prompt_logprobs, self.error)
        request._deliver(output)
        return output


def _pending(out: dict[str, _Pending], request: Request) -> _Pending:
    if request.request_id not in out:
        out[request.request_id] = _Pending(request)
    return out[request.request_id]
