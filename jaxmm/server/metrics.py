"""Prometheus metrics of one server, in a registry of its own (two apps in a process, as in
tests, never share counters).

Three sources:
- `HTTPMetricsMiddleware`: every HTTP answer, by method, route and status (401s and 413s too).
- `RequestTracker`: one per generation request, fed each output the endpoint receives:
  tokens, time to first token, inter-token latency, end-to-end latency, finish reasons.
- `_EngineCollector`: read at scrape time from the engine's last stats snapshot: running and
  waiting requests, KV page usage, prefix-cache queries/hits/hit rate, preemptions.
  With data-parallel replicas, one sample per replica, labelled `engine`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxmm.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# fmt: off
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# fmt: on
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class _EngineCollector:
    def __init__(self, get_stats):
        self.get_stats = get_stats

    def collect(self):
        s = self.get_stats()
        # data parallelism: one sample per replica, labelled engine="0", "1", ... (as vLLM)
        replicas = s.get("replicas")

        def fill(family, key: str):
            if replicas:
                for i, r in enumerate(replicas):
                    family.add_metric([str(i)], float(r.get(key, 0) or 0))
            else:
                family.add_metric([], float(s.get(key, 0) or 0))
            return family

        labels = ["engine"] if replicas else None

        def gauge(name: str, doc: str, key: str):
            return fill(GaugeMetricFamily(name, doc, labels=labels), key)

        def counter(name: str, doc: str, key: str):
            return fill(CounterMetricFamily(name, doc, labels=labels), key)

        yield gauge(
            "jaxmm_num_requests_running", "Sequences being run by the engine.", "num_running"
        )
        yield gauge(
            "jaxmm_num_requests_waiting", "Sequences waiting to be scheduled.", "num_waiting"
        )
        yield gauge(
            "jaxmm_kv_cache_usage_perc",
            "Fraction of KV cache pages in use (0-1).",
            "kv_cache_usage",
        )
        yield gauge(
            "jaxmm_prefix_cache_hit_rate",
            "Prefix cache hits / queries (0-1).",
            "prefix_cache_hit_rate",
        )
        yield counter(
            "jaxmm_prefix_cache_queries",
            "Pages looked up in the prefix cache.",
            "prefix_cache_queries",
        )
        yield counter(
            "jaxmm_prefix_cache_hits", "Pages found in the prefix cache.", "prefix_cache_hits"
        )
        yield counter(
            "jaxmm_num_preemptions", "Sequences preempted for lack of KV pages.", "num_preemptions"
        )


class ServerMetrics:
    def __init__(self, get_stats):
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "jaxmm_http_requests",
            "HTTP requests by method, route and status.",
            ["method", "path", "status"],
            registry=r,
        )
        self.request_success = Counter(
            "jaxmm_request_success",
            "Finished completions by finish reason.",
            ["finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "jaxmm_prompt_tokens", "Prompt tokens of accepted requests.", registry=r
        )
        self.generation_tokens = Counter("jaxmm_generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(
            "jaxmm_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jaxmm_inter_token_latency_seconds",
            "Time between two tokens of a sequence.",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxmm_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(get_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, arrival: float, num_prompt_tokens: int) -> RequestTracker:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self, arrival)


class RequestTracker:
    """Per-request timing and token accounting from the cumulative outputs seen."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self.m = metrics
        self.arrival = arrival
        self.counts: dict[int, int] = {}
        self.last: float | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        new_total, steps = 0, 0
        for o in out.outputs:
            new = len(o.token_ids) - self.counts.get(o.index, 0)
            if new > 0:
                self.counts[o.index] = len(o.token_ids)
                new_total += new
                steps = max(steps, new)
        if new_total:
            self.m.generation_tokens.inc(new_total)
            if self.last is None:
                self.m.ttft.observe(now - self.arrival)
                steps -= 1  # the first token has no predecessor
            if steps > 0 and self.last is not None:
                gap = (now - self.last) / steps
                for _ in range(steps):
                    self.m.itl.observe(gap)
            self.last = now
        if out.finished and not self.done:
            self.done = True
            self.m.e2e.observe(now - self.arrival)
            for o in out.outputs:
                self.m.request_success.labels(o.finish_reason or "abort").inc()

    def aborted(self, num_choices: int) -> None:
        """The client went away (or the request failed) before the request finished."""
        if not self.done:
            self.done = True
            self.m.request_success.labels("abort").inc(num_choices)


class HTTPMetricsMiddleware:
    """Count every answer by method, route (known routes only) and status."""

    def __init__(self, app, metrics: ServerMetrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.http_requests.labels(scope.get("method", ""), path, str(status[0])).inc()
