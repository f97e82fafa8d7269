"""pytest: doctests run over the package; CLI entry points are not imported."""

collect_ignore_glob = [
  'examples/*/main.py',
  'examples/*/sweep.py',
  'benchmarks/run.py',
  'benchmarks/step_cost.py',
  'benchmarks/report.py',
  'examples/sharded_transformer/memory.py',
  '.venv/*',
]
