"""Benchmarks of the runtime and its peers; ``ldm bench`` is ``bench.runtime.main``.

- ``runtime``: ``ldm bench BUNDLE`` (per component, end to end, overhead, start-up, peak RSS);
- ``report``: its markdown tables and plot;
- ``proc``: fresh child processes (start-up timing, peak RSS) and the machine description.

The other modules are scripts (``python bench/NAME.py``); they import these helpers.
The clock inside the engines is ``ldm_runtime.timing``: the runtime's own code.
"""
