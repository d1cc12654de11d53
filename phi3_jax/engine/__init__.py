"""The inference engine: continuous batching, per-request settings and seeds, logprobs.

- engine.py: `Engine` (submit, cancel, step, its own thread);
- scheduler.py: what each iteration runs, and the fixed set of program shapes;
- programs.py: the compiled prompt-chunk and decode programs;
- slots.py: the cache rows and the requests in them;
- request.py, settings.py: requests, outputs, completions, `GenerationSettings`;
- streaming.py: text as tokens arrive, stop strings.
"""

from phi3_jax.engine.engine import Engine, QueueFull
from phi3_jax.engine.request import Completion, Request, RequestOutput, TokenLogprob
from phi3_jax.engine.settings import GenerationSettings, SettingsError

__all__ = ["Completion", "Engine", "GenerationSettings", "QueueFull", "Request", "RequestOutput",
           "SettingsError", "TokenLogprob"]
