"""GET /metrics: Prometheus figures under vLLM's metric names.

A registry per server (not prometheus_client's global one), so importing
this module registers nothing and two servers in one process do not clash.
The engine thread updates the figures after every step (prometheus_client
is thread-safe); /metrics renders them on the event loop.
"""

from __future__ import annotations

from aotllm.runtime.engine_core import SchedulerStats
from aotllm.runtime.output_processor import IterationStats

# vLLM's buckets (seconds).
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        kw = dict(labelnames=["model_name"], registry=self.registry)
        name = model_name

        def gauge(metric: str, doc: str):
            return Gauge(metric, doc, multiprocess_mode="mostrecent", **kw).labels(name)

        self.running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage: 1 means every block is taken.")
        self.gpu_kv_usage = gauge("vllm:gpu_cache_usage_perc",
                                  "KV-cache usage (vLLM's older name).")
        self.free_blocks = gauge("aotllm:kv_cache_free_blocks",
                                 "KV-cache blocks free (evictable cached ones included).")
        self.cached_free_blocks = gauge("aotllm:kv_cache_cached_free_blocks",
                                        "Free KV-cache blocks still holding a cached prefix.")
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.",
                                      **kw).labels(name)
        self.prefix_hits = Counter("vllm:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.", **kw).labels(name)
        # The scheduler's counters are cumulative; the Prometheus counters
        # advance by the difference since the last step.
        self._last_prefix = (0, 0)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefilled prompt tokens.",
                                     **kw).labels(name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.",
                                         **kw).labels(name)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.success = {r: success.labels(name, r) for r in FINISH_REASONS}
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_TTFT_BUCKETS, **kw).labels(name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Time between consecutive output tokens of a request.",
                              buckets=_TPOT_BUCKETS, **kw).labels(name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency.",
                             buckets=_E2E_BUCKETS, **kw).labels(name)

    def on_step(self, sched: SchedulerStats, it: IterationStats | None,
                num_aborted: int) -> None:
        self.running.set(sched.num_running)
        self.waiting.set(sched.num_waiting)
        self.kv_usage.set(sched.kv_cache_usage)
        self.gpu_kv_usage.set(sched.kv_cache_usage)
        self.free_blocks.set(sched.num_free_blocks)
        self.cached_free_blocks.set(sched.num_cached_free_blocks)
        queries, hits = sched.prefix_cache_queries, sched.prefix_cache_hits
        self.prefix_queries.inc(queries - self._last_prefix[0])
        self.prefix_hits.inc(hits - self._last_prefix[1])
        self._last_prefix = (queries, hits)
        if num_aborted:
            self.success["abort"].inc(num_aborted)
        if it is None:
            return
        self.prompt_tokens.inc(it.num_prompt_tokens)
        self.generation_tokens.inc(it.num_generation_tokens)
        for t in it.time_to_first_tokens:
            self.ttft.observe(t)
        for t in it.inter_token_latencies:
            self.tpot.observe(t)
        for f in it.finished:
            self.success[f.finish_reason].inc()
            self.e2e.observe(f.e2e_latency)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
