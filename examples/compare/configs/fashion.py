"""Fashion-MNIST: 60k train / 10k test, batch 128, one epoch.

The data file holds Fashion-MNIST's 70,000 images with its own split (1,000
test images per class), which is not the official test split. Pass its
path with `--config.data_path=path/to/fashion_mnist.npz`.
"""

from examples.compare.configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'fashion_mnist'
  config.data_path = '../shared/data/fashion_mnist.npz'
  config.batch_size = 128
  config.num_epochs = 1
  config.eval_every = 40
  config.target_accuracies = (0.85, 0.88, 0.90, 0.92)
  # Each optimizer's pick of the benchmark's learning-rate sweep on this
  # net and data (a held-out fifth of the training split):
  # benchmarks/results/fashion/fashion_convnet.json.
  config.frog.learning_rate = 0.3
  # FROG's levers on this net and the ResNet-20 (validation, 3 seeds each):
  # half the Fisher sample with the head preconditioned reaches each target
  # sooner than s = 32 with the head on the fallback, at the same accuracy
  # (benchmarks/results/fashion/levers_*.md; the benchmark's frog_s16).
  config.frog.sample_size = 16
  config.frog.exclude = ()
  config.sgd.learning_rate = 0.3
  config.adamw.learning_rate = 1e-2
  return config
