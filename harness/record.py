"""What every result file records beside its numbers."""

import json
import os
import platform
import sys
from typing import Any

import flax
import jax
import optax

import frog_optax as fo


def _portable(arg: str) -> str:
  """`arg` with an absolute path made relative to the working directory.

  A path outside it keeps only its name, as `path/to/<name>`: result files
  never hold machine-specific paths. `--flag=/a/path` is handled too.
  """
  flag, sep, value = arg.rpartition('=') if '=' in arg else ('', '', arg)
  if not os.path.isabs(value):
    return arg
  relative = os.path.relpath(value)
  if relative.startswith(os.pardir):
    relative = f'path/to/{os.path.basename(value)}'
  return flag + sep + relative


def environment() -> dict[str, Any]:
  """The command (relative to the working directory), machine and versions."""
  return dict(
    command=' '.join(
      _portable(a) for a in [os.path.abspath(sys.argv[0])] + sys.argv[1:]
    ),
    machine=dict(
      platform=platform.platform(),
      processor=f'{jax.devices()[0].device_kind} ({os.cpu_count()} cores)',
      backend=jax.default_backend(),
    ),
    versions=dict(
      python=platform.python_version(),
      jax=jax.__version__,
      optax=optax.__version__,
      flax=flax.__version__,
      frog_optax=fo.__version__,
    ),
  )


def write(result: dict[str, Any], out: str, text: str) -> None:
  """`result` as JSON at `out`, `text` beside it as `.md`, and prints it."""
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  with open(os.path.splitext(out)[0] + '.md', 'w') as f:
    f.write(text + '\n')
  print(text)
