"""The OpenAI-compatible HTTP server (`jaxmm serve`).

- `app.py`: `build_app(client, ...)` wires the routes and middlewares; `serve` runs uvicorn.
- `protocol.py`: request schemas; `errors.py`: OpenAI-style errors; `security.py`: API key
  and body cap; `metrics.py`: Prometheus.
- What the endpoints share, by meaning: `state.py` (server state, model-name check, the
  thread pool), `submit.py` (sampling params from a request, prompt preparation, submitting
  to the engine, reading outputs), `streaming.py` (deltas, server-sent events, cancelling on
  disconnect), `logprobs.py` (logprob JSON shapes).
- One module per endpoint family: `model_cards` (/v1/models), `chat`, `completions`,
  `embeddings`, `transcriptions`, `tokenize`.

The engine side is `jaxmm.engine.async_engine.AsyncEngine` (an `EngineClient`).
"""
