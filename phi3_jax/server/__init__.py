"""`phi3-jax serve`: an OpenAI-compatible HTTP server on the inference engine.

FastAPI on uvicorn: requests are validated into the engine's own types by pydantic, SSE
streaming and client disconnects come with Starlette, and uvicorn's event loop never waits on
the device (the engine runs in its own thread).

- cli.py: the command, its flags, warm-up before ready, shutdown on SIGTERM / Ctrl-C;
- app.py: the routes;
- protocol.py: request bodies -> GenerationSettings, refusals naming the field;
- service.py: the event loop <-> engine thread bridge, cancellation, the watchdog;
- responses.py: OpenAI's response bodies and SSE chunks;
- errors.py: OpenAI's error shape;
- metrics.py: Prometheus metrics.
"""

MAX_BODY = 2 << 20  # bytes in a request body: a 128k-token chat as text fits
