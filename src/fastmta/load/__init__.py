"""``fastmta load``: the load generator, its latency histograms, report schema and plot.

Modules, in the order data flows through a run:

* ``spec``: ``LoadSpec``, what a run is asked to do, and the option values it is built from (sizes, DKIM);
* ``workload``: the messages and recipients sent (fixed bodies, campaign templates, DKIM signing);
* ``driver``: ``run_load``, offering the load in one event loop, closed loop or open loop (rate, ramp);
* ``measure``: per-phase timestamps on each connection, and the recorder that counts outcomes;
* ``report``: ``LoadResult`` (the report, its time series), live ``Progress``, merging reports;
* ``processes``: ``run_load_processes``, the same run spread over worker processes;
* ``histogram``: the latency histograms every figure is read from;
* ``schema``: the JSON Schema of the report (``fastmta load --schema``);
* ``plot``: throughput and latency over time (``fastmta load --plot``).
"""
