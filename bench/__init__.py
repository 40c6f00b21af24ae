"""fastrnn's benchmarks.

* ``python -m bench``: the benchmark matrix (GPU rows on CUDA, CPU rows plus a Triton-interpreter
  correctness pass on a CPU), each row checked against float64 before it is timed; writes
  ``bench/results/<device>-<date>.{json,md}`` and plots. See :mod:`bench.__main__` for the flags.
* ``python -m bench.report RESULTS.json``: redraw the report of a results file.
* ``python -m pytest bench/ --benchmark-only``: the pytest-benchmark suite of the CPU shapes
  (:mod:`bench.test_cpu`); ``python -m bench.ratio BENCH.json`` turns its ``--benchmark-json``
  into fastrnn/torch.nn speed ratios.
* ``python -m bench.dispatch_table RESULTS.json [--write]``: the dispatch-table entries of a GPU
  run (what ``--update-dispatch`` writes into ``fastrnn/dispatch_table.json``).
* ``bench/gpu_check.sh``: tests, versions and a quick matrix on a GPU machine.
"""
