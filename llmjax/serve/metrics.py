"""The server's Prometheus metrics (GET /metrics), named after vLLM's with an `llmjax_` prefix.

    llmjax_request_success_total{finished_reason}  sequences finished: eos|length|stop|cancelled
    llmjax_requests_rejected_total                 requests refused with 503 (queue full)
    llmjax_prompt_tokens_total                     prompt tokens prefilled
    llmjax_generation_tokens_total                 tokens sampled (EOS included)
    llmjax_num_requests_running                    sequences in a KV-cache slot
    llmjax_num_requests_waiting                    sequences queued for a slot
    llmjax_time_to_first_token_seconds             arrival -> first token, per sequence
    llmjax_time_per_output_token_seconds           (last - first token time) / (tokens - 1)
    llmjax_decode_step_seconds                     one decode step on the device
    llmjax_decode_host_seconds                     the host's work after it (tokens, text, hand-over)
    llmjax_decode_batch_size                       sequences per decode step
    llmjax_prefix_cache_queries_total              prompt tokens looked up in the prefix cache
    llmjax_prefix_cache_hits_total                 of those, tokens whose cached KV was reused

The prefix-cache counters count tokens, as vLLM's prefix_cache_queries / prefix_cache_hits
do (hit rate = hits / queries); they stay 0 with --prefix_caching=false.
TPOT excludes the first token, as vLLM's benchmark defines it. Each server has its own
registry, so two servers in one process (tests) count apart.
"""

import prometheus_client as prom

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
  """Counters, gauges and histograms of one server; `render()` is the Prometheus text."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.success = prom.Counter('llmjax_request_success', 'sequences finished, by reason',
                                ['finished_reason'], registry=r)
    self.rejected = prom.Counter('llmjax_requests_rejected', 'requests refused with 503'
                                 ' because the queue was full', registry=r)
    self.prompt_tokens = prom.Counter('llmjax_prompt_tokens', 'prompt tokens prefilled',
                                      registry=r)
    self.generation_tokens = prom.Counter('llmjax_generation_tokens',
                                          'tokens sampled, EOS included', registry=r)
    self.running = prom.Gauge('llmjax_num_requests_running', 'sequences in a KV-cache slot',
                              registry=r)
    self.waiting = prom.Gauge('llmjax_num_requests_waiting', 'sequences queued for a slot',
                              registry=r)
    self.ttft = prom.Histogram('llmjax_time_to_first_token_seconds',
                               'arrival to first token, per sequence', registry=r,
                               buckets=_LATENCY_BUCKETS)
    self.tpot = prom.Histogram('llmjax_time_per_output_token_seconds',
                               'time per output token after the first, per sequence',
                               registry=r, buckets=_LATENCY_BUCKETS)
    self.step_device = prom.Histogram('llmjax_decode_step_seconds', 'one decode step on the'
                                      ' device', registry=r, buckets=_LATENCY_BUCKETS)
    self.step_host = prom.Histogram('llmjax_decode_host_seconds', "the host's work after a"
                                    ' decode step', registry=r, buckets=_LATENCY_BUCKETS)
    self.batch = prom.Histogram('llmjax_decode_batch_size', 'sequences per decode step',
                                registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.prefix_queries = prom.Counter('llmjax_prefix_cache_queries', 'prompt tokens looked up'
                                       ' in the prefix cache', registry=r)
    self.prefix_hits = prom.Counter('llmjax_prefix_cache_hits', 'prompt tokens whose cached'
                                    ' keys and values were reused', registry=r)

  def step(self, device_s: float, host_s: float, batch: int) -> None:
    """One decode step: its device and host seconds and how many sequences it decoded."""
    self.step_device.observe(device_s)
    self.step_host.observe(host_s)
    self.batch.observe(batch)

  def prefix_cache(self, queried: int, hit: int) -> None:
    """One admitted sequence: its prompt tokens and how many of them the prefix cache held."""
    self.prefix_queries.inc(queried)
    self.prefix_hits.inc(hit)

  def finished(self, seq, reason: str) -> None:
    """Counts one finished sequence (`engine_loop.Sequence`), on the engine thread."""
    self.success.labels(finished_reason=reason).inc()
    if seq.sampled:
      self.prompt_tokens.inc(len(seq.prompt))
      self.generation_tokens.inc(seq.sampled)
      self.ttft.observe(seq.first_token - seq.arrival)
      if seq.sampled > 1:
        self.tpot.observe((seq.last_token - seq.first_token) / (seq.sampled - 1))

  def render(self, engine) -> bytes:
    """The Prometheus text exposition, with the gauges read from `engine` now."""
    self.running.set(engine.num_running)
    self.waiting.set(engine.num_waiting)
    return prom.generate_latest(self.registry)


CONTENT_TYPE = prom.CONTENT_TYPE_LATEST
