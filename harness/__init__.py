"""The training harness the examples and the benchmarks share.

- `data`: real datasets that need no download (digits, MNIST-1D, MNIST-10k);
- `models`, `resnet`: the small conv net and the CIFAR ResNet-18;
- `trainers`: one `Trainer` (init, step) over optax transformations and
  kfac-jax;
- `loop`: the training loop with evaluation and time-to-target;
- `timing`: the one step timer (shuffled, interleaved rounds in one process);
- `record`: the command, machine and versions written beside every result.

It uses the public `frog_optax` API only.
"""
