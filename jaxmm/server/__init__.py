"""The OpenAI-compatible HTTP server (`jaxmm serve`).

- `app.py`: `build_app(client, ...)` wires the routes and middlewares; `serve` runs uvicorn.
- `protocol.py`: request schemas; `errors.py`: OpenAI-style errors; `security.py`: API key
  and body cap; `metrics.py`: Prometheus.
- `serving.py`: what the generation endpoints share (prompt preparation in a thread pool,
  submitting to the engine, streaming deltas, cancelling on disconnect).
- One module per endpoint family: `models`, `chat`, `completions`, `embeddings`,
  `transcriptions`.

The engine side is `jaxmm.engine.async_engine.AsyncEngine` (an `EngineClient`).
"""
