"""`GET /metrics`: the server in Prometheus text format (`prometheus_client`).

    dostream_requests_total{route, status}        HTTP requests answered (counted in this process)
    dostream_request_latency_seconds{route}       a histogram of their latency (until the response starts)
    dostream_exchanges_total                      exchanges recorded in the store (all time)
    dostream_tokens_total{kind=prompt|completion} their tokens, from each exchange's usage
    dostream_updates_total{result=accepted|rejected}, dostream_rollbacks_total   from the store
    dostream_adapter_version                      the version in force (0: the adapter served at start)
    dostream_update_running                       1 while the learner trains or gates a candidate
    dostream_decode_step_seconds                  a histogram of decode steps (one forward for every
                                                  running row, joining prompts prefilled in it): its
                                                  _count is the steps, its _sum their seconds
    dostream_decode_join_steps_total              steps that prefilled joining rows
    dostream_decode_rows_total                    rows the steps carried, summed (/ steps: the mean batch)
    dostream_prefill_ahead_tokens_total           prompt tokens prefilled before their request (sessions listening)
    dostream_rows_running, dostream_rows_waiting  rows decoding now; rows queued for the next step

The store's numbers are read at scrape time (added up incrementally), so they survive restarts;
each server has its own registry (tests run several in one process).

>>> from prometheus_client.parser import text_string_to_metric_families   # doctest: +SKIP
>>> [f.name for f in text_string_to_metric_families(httpx.get(URL + "/metrics").text)]  # doctest: +SKIP
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Latency buckets (s): a CPU server's answers take from milliseconds (errors) to a minute (a full batch).
BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Decode step buckets (s): a few ms (a GPU, a tiny model) to seconds (a large batch's prefill on a CPU).
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _StoreCollector:
    """What the store knows: exchanges and tokens (incrementally), updates, the version in force."""

    def __init__(self, store, learner):
        self.store, self.learner = store, learner
        self._lock = threading.Lock()
        self._seen, self._exchanges, self._prompt, self._completion = -1, 0, 0, 0

    def collect(self):
        store = self.store
        with self._lock:
            n, prompt, completion, last = store.usage_totals(self._seen)
            self._seen, self._exchanges = last, self._exchanges + n
            self._prompt, self._completion = self._prompt + prompt, self._completion + completion
            exchanges, prompt, completion = self._exchanges, self._prompt, self._completion
        yield CounterMetricFamily("dostream_exchanges", "exchanges recorded in the store", value=exchanges)
        tokens = CounterMetricFamily("dostream_tokens", "tokens of the recorded exchanges", labels=["kind"])
        tokens.add_metric(["prompt"], prompt)
        tokens.add_metric(["completion"], completion)
        yield tokens
        rows = store.versions.rows()
        updates = CounterMetricFamily("dostream_updates", "adapter updates, by the gate's result", labels=["result"])
        updates.add_metric(["accepted"], sum(1 for u in rows if u["kind"] == "update" and u["accepted"]))
        updates.add_metric(["rejected"], sum(1 for u in rows if u["kind"] == "update" and not u["accepted"]))
        yield updates
        yield CounterMetricFamily(
            "dostream_rollbacks", "rollbacks of the adapter", value=sum(1 for u in rows if u["kind"] == "rollback")
        )
        yield GaugeMetricFamily(
            "dostream_adapter_version", "the adapter version in force", value=store.versions.in_force()[1]
        )
        running = 1 if self.learner is not None and self.learner.running else 0
        yield GaugeMetricFamily("dostream_update_running", "1 while an update is in progress", value=running)


class _BatcherCollector:
    """The sampling thread's counters, read at scrape time (this process's, since it started)."""

    def __init__(self, batcher):
        self.batcher = batcher

    def collect(self):
        b = self.batcher
        yield CounterMetricFamily(
            "dostream_decode_join_steps", "decode steps that prefilled joining rows", value=b.join_steps
        )
        yield CounterMetricFamily("dostream_decode_rows", "rows the decode steps carried, summed", value=b.step_rows)
        yield CounterMetricFamily(
            "dostream_prefill_ahead_tokens", "prompt tokens prefilled before their request (sessions)", value=b.warmed
        )
        yield GaugeMetricFamily("dostream_rows_running", "rows decoding now", value=b.running)
        yield GaugeMetricFamily("dostream_rows_waiting", "rows queued for the next decode step", value=b.waiting)


class ServeMetrics:
    """One server's registry: request counters and latency (observed by the app's middleware) and
    the store's numbers (read at scrape time)."""

    def __init__(self, store, batcher, learner=None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dostream_requests", "HTTP requests answered", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "dostream_request_latency_seconds", "HTTP request latency", ["route"], buckets=BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.step = Histogram(
            "dostream_decode_step_seconds", "seconds of one decode step", buckets=STEP_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        batcher.on_step = self.step.observe
        self.registry.register(_StoreCollector(store, learner))
        self.registry.register(_BatcherCollector(batcher))

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
