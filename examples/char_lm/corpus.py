"""Text that needs no download: the Python standard library's own sources.

The corpus is the `.py` files directly in the standard library directory,
sorted by name and concatenated, as bytes; characters outside ASCII become
`?`. Tokens are byte values (vocabulary 128). The first 90% of the text is
for training, the rest for validation, so the two never share a file's
passage. The stdlib of another Python version gives another (similar) text:
the file list and size are recorded with every result.
"""

import dataclasses
import os
import sysconfig

import numpy as np

VOCAB_SIZE = 128


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: np.ndarray  # int32 tokens
  valid: np.ndarray
  files: tuple[str, ...]


def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def encode(text: bytes) -> np.ndarray:
  tokens = np.frombuffer(text, np.uint8).astype(np.int32)
  return np.where(tokens < VOCAB_SIZE, tokens, ord('?')).astype(np.int32)


def load(max_chars: int, directory: str | None = None) -> Corpus:
  """The first `max_chars` bytes of the sorted `.py` files of `directory`.

  Args:
    max_chars: size of the text (train + validation).
    directory: where the `.py` files are; the standard library by default.

  Returns:
    The tokenised train and validation splits and the files used.
  """
  if max_chars < 100:
    raise ValueError(f'max_chars must be >= 100; got {max_chars}.')
  directory = stdlib_dir() if directory is None else directory
  names = sorted(n for n in os.listdir(directory) if n.endswith('.py'))
  chunks, files, size = [], [], 0
  for name in names:
    if size >= max_chars:
      break
    with open(os.path.join(directory, name), 'rb') as f:
      chunk = f.read()
    chunks.append(chunk)
    files.append(name)
    size += len(chunk)
  if size < max_chars:
    raise ValueError(
      f'{directory!r} holds only {size} bytes of .py files; max_chars is'
      f' {max_chars}.'
    )
  tokens = encode(b''.join(chunks)[:max_chars])
  split = int(0.9 * len(tokens))
  return Corpus(train=tokens[:split], valid=tokens[split:], files=tuple(files))


def batches(tokens: np.ndarray, batch_size: int, length: int, seed: int):
  """Endless random windows: `(inputs, targets)` of shape (B, length)."""
  rng = np.random.default_rng(seed)
  while True:
    start = rng.integers(0, len(tokens) - length - 1, batch_size)
    window = tokens[start[:, None] + np.arange(length + 1)]
    yield window[:, :-1], window[:, 1:]
