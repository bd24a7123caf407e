"""The benchmark harness: BrushBench / EditBench / folder datasets, a resumable sharded runner over every
registered method, per-image metric rows, reports, and a speed/memory benchmark.

Importing this package imports nothing heavy; use the submodules (``datasets``, ``runner``, ``report``,
``speed``) or the CLI (``brushnet bench run|report|speed``).
"""
