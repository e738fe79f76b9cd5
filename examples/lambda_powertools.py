"""The stream Lambda, with swr_cache's counters published through aws-lambda-powertools.

Same handler as ``lambda_stream_handler.py``, wrapped in powertools'
``Metrics.log_metrics``: after each invocation the counters that moved (records
applied, malformed, failed, invalidations, Redis errors, ...) are added as
powertools metrics, which it prints as one CloudWatch Embedded Metric Format
line. Namespace and service come from ``POWERTOOLS_METRICS_NAMESPACE`` and
``POWERTOOLS_SERVICE_NAME`` (the template in ``lambda_stream_stack.yaml`` sets
both). ``swr_cache.metrics.EmfReporter`` does the same without powertools.

Deploy with the handler ``lambda_powertools.handler``. Run it locally with
``SWR_CACHE_REDIS_URL=redis://... python examples/lambda_powertools.py``: it
invokes the handler twice with AWS's sample stream event.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

from swr_cache import Cache, StreamInvalidator
from swr_cache.metrics import COUNTERS

cache = Cache.from_env()  # no I/O until the first invocation
invalidator = StreamInvalidator(
    cache, mode="refresh" if os.environ.get("SWR_CACHE_STREAM_MODE") == "refresh" else "invalidate"
)
metrics = Metrics(
    namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "swr_cache"),
    service=os.environ.get("POWERTOOLS_SERVICE_NAME", "stream-invalidator"),
)
_published: Counter[str] = Counter()  # running totals already published, per counter


def add_cache_metrics() -> None:
    """Add what each swr_cache counter gained since the last invocation (summed over functions)."""
    totals: Counter[str] = Counter()
    for values in cache.stats().values():
        for name in COUNTERS:
            totals[name] += int(values.get(name, 0))
    for name, total in totals.items():
        delta = total - _published[name]
        if delta > 0:
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=delta)
        _published[name] = total


@metrics.log_metrics
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Apply the batch, report per-record failures, publish the counters."""
    reply = invalidator.lambda_handler(event, context)
    add_cache_metrics()
    return reply


if __name__ == "__main__":
    from lambda_stream_handler import SAMPLE_EVENT

    try:
        for _ in range(2):  # two warm invocations of one container
            print(handler(SAMPLE_EVENT, None))
    finally:
        invalidator.close()
