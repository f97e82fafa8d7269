"""What FROG's compiled step does beyond SGD's: kernels, FLOPs and bytes.

The cost model 1 + 2ks/(3B) counts FLOPs. A step also moves bytes and
launches kernels, and on a GPU these can dominate. For one net, batch B,
sample size s and CG iterations k, this compiles three training steps, the
SGD step, the capture alone (FROG with every layer on its SGD fallback: the
statistics are captured and read once so that XLA keeps them, nothing is
solved) and FROG, and reads from each compiled program:

- kernels: the instructions of the entry computation that do work
  (fusions, convolutions, library calls, copies, reductions...; those of a
  called computation, such as a GPU command buffer, counted one by one),
  by opcode;
  on a GPU each is about one kernel launch; among them the layout changes
  (copies and transposes, fused or not); and by FROG part, from the named
  scopes frog_optax puts into every operation's name (capture, curvature,
  CG, the rest of a layer's update);
- flops and bytes: XLA's cost analysis (it counts every operand of a fusion
  in full, so a slice fused into a consumer counts its whole operand);

and times the three side by side (interleaved rounds). Which ratio to SGD
the measured time ratio follows says where FROG's extra time goes.

  python -m benchmarks.step_census --width 0.25 --batch 64 --samples 8 \\
    --out benchmarks/results/cpu/step_census_resnet18_w025.json
"""

import argparse
import collections
import re

import jax
import jax.numpy as jnp
import optax

from benchmarks import report
from benchmarks import step_cost
from harness import record
from harness import timing

# Entry-computation instructions that launch no work.
_FREE = frozenset(
  {
    'parameter',
    'constant',
    'tuple',
    'get-tuple-element',
    'bitcast',
    'after-all',
    'partition-id',
    'replica-id',
    'opt-barrier',
  }
)
_INSTRUCTION = re.compile(r'\s*(?:ROOT\s+)?%(\S+)\s*=\s*.*?\s([a-z][\w-]*)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# FROG's named scopes (frog_optax labels its operations with them), most
# specific first; a kernel belongs to the first one in its op_name.
PARTS = ('frog_capture', 'frog_curvature', 'frog_cg', 'frog_layer')


_COMPUTATION = re.compile(r'^(ENTRY\s+)?%(\S+)\s.*\{\s*$')
_CALLEE = re.compile(r'to_apply=%([\w.\-]+)')


def _computations(hlo_text: str) -> tuple[str, dict[str, list[str]]]:
  """The entry computation's name and every computation's lines."""
  entry, bodies, current = None, {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(2)
      bodies[current] = []
      if match.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return entry, bodies


# `(name, opcode, op_name)` of each instruction that does work.
Instructions = list[tuple[str, str, str]]


def instructions(hlo_text: str) -> Instructions:
  """`(name, opcode, op_name)` of the instructions that do work.

  Those of the entry computation, where a `call` (XLA:GPU groups kernels
  into command buffers that way) counts as the instructions it calls.
  """
  entry, bodies = _computations(hlo_text)

  def working(computation):
    found = []
    for line in bodies[computation]:
      match = _INSTRUCTION.match(line)
      if not match or match.group(2) in _FREE:
        continue
      callee = _CALLEE.search(line)
      if match.group(2) == 'call' and callee and callee.group(1) in bodies:
        found += working(callee.group(1))
        continue
      op_name = _OP_NAME.search(line)
      found.append((*match.groups(), op_name.group(1) if op_name else ''))
    return found

  return working(entry)


def kernel_counts(found: Instructions) -> dict[str, int]:
  """Working instructions (from :func:`instructions`), by opcode."""
  counts = collections.Counter(op for _, op, _ in found)
  return dict(sorted(counts.items()))


def layout_kernels(found: Instructions) -> int:
  """Those that change a layout: copies and transposes, fused or not.

  XLA names a fusion after its root, so a fusion that ends in a transpose
  or a copy has one of those words in its name (it may do arithmetic too).
  """
  return sum(
    op in ('copy', 'transpose') or 'transpose' in name or 'copy' in name
    for name, op, _ in found
  )


def kernels_by_part(found: Instructions) -> dict[str, int]:
  """Working instructions by FROG part (`PARTS`), the rest as `other`.

  A fusion carries the `op_name` of its root; one without any (XLA drops it
  on some layout fusions) counts as `unlabelled`.
  """
  counts = dict.fromkeys((*PARTS, 'other', 'unlabelled'), 0)
  for _, _, op_name in found:
    part = next((p for p in PARTS if p in op_name), None)
    counts[part or ('other' if op_name else 'unlabelled')] += 1
  return counts


def census(compiled) -> dict:
  """Kernels, FLOPs and bytes of one compiled program."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  found = instructions(compiled.as_text())
  kernels = kernel_counts(found)
  return dict(
    kernels=sum(kernels.values()),
    kernels_by_opcode=kernels,
    layout_kernels=layout_kernels(found),
    kernels_by_part=kernels_by_part(found),
    flops=float(cost.get('flops', 0.0)),
    bytes=float(cost.get('bytes accessed', 0.0)),
  )


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--net', choices=sorted(step_cost.NETS), default='resnet18')
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--batch', type=int, default=512)
  p.add_argument('--samples', type=int, default=64)
  p.add_argument('--cg-iters', type=int, default=4)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument(
    '--rounds', type=int, default=5, help='timing rounds (0: no timing)'
  )
  p.add_argument(
    '--out', default='benchmarks/results/cpu/step_census_resnet18.json'
  )
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  dtype = jnp.dtype(args.dtype)
  model, title, shape = step_cost.make_model(args.net, args.width, dtype)
  b, s, k = args.batch, args.samples, args.cg_iters
  x = jax.random.normal(jax.random.key(0), (b, *shape), dtype)
  y = jnp.arange(b) % 10
  variables = model.init(jax.random.key(1), x[:2])
  runs = {
    'sgd': step_cost.optax_run(
      model, variables, optax.sgd(0.01, 0.9), None, x, y
    ),
    'capture_only': step_cost.optax_run(
      model, variables, step_cost.capture_only_tx(variables['params']), s, x, y
    ),
    'frog': step_cost.optax_run(
      model, variables, step_cost.frog_tx(k), s, x, y
    ),
  }
  steps = {}
  for name, run in runs.items():
    compiled = run['trainer'].step.lower(run['state'], x, y).compile()
    steps[name] = census(compiled)
  if args.rounds:
    medians, _, _ = timing.interleaved_steps(runs, x, y, args.rounds)
    for name, seconds in medians.items():
      steps[name]['seconds'] = seconds
  sgd = steps['sgd']
  for step in steps.values():
    step['over_sgd'] = {
      key: step[key] / sgd[key]
      for key in ('kernels', 'flops', 'bytes', 'seconds')
      if key in step and sgd[key]
    }
  result = dict(
    record.environment(),
    kind='step_census',
    setup=dict(
      net=title,
      image=list(shape),
      dtype=args.dtype,
      batch=b,
      sample_size=s,
      cg_iters=k,
      rounds=args.rounds,
    ),
    cost_model=step_cost.cost_model(b, s, k),
    steps=steps,
  )
  record.write(result, args.out, report.census_table(result))
  return result


if __name__ == '__main__':
  main()
