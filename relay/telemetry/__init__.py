"""What the relay counts, for Prometheus (/metrics) and for the shared per-minute stats
that the page and the API read.

`core.Telemetry` (one per process) receives the stages' events; `series` names the stats
cells; `stats` reads them back as windows and percentiles; `exposition` writes /metrics.
Nothing is imported here: `relay serve` imports `multiprocess` before prometheus_client
may be loaded (see there).
"""
