"""The original FROG run: CIFAR-10 ResNet-18, batch 512, s = 64, k = 4.

Every other config starts from this one. The schedule is the original
run's: 160 epochs, learning rate ×0.1 at epochs 80 and 120.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.optimizer = 'frog'  # 'frog' | 'sgd' | 'adamw'
  config.batch_size = 512
  config.num_epochs = 160
  config.lr_drop_epochs = (80, 120)  # learning rate ×0.1 at each
  config.learning_rate = 0.01
  config.momentum = 0.9
  config.weight_decay = 1e-5
  config.seed = 0

  # FROG (the original table: s64, k4, head excluded, fallback lr ratio 1).
  config.sample_size = 64
  config.cg_iters = 4
  config.damping = 1e-6
  config.exclude = ('head',)
  config.other_lr_ratio = 1.0

  # Data: tensorflow_datasets 'cifar10' under `data_dir` (None = tfds's
  # default), or random CIFAR-shaped data for step-time measurements.
  config.dataset = 'cifar10'
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.synthetic = False
  config.synthetic_train_examples = 50_000
  config.synthetic_test_examples = 10_000

  # Model: the CIFAR ResNet-18 of harness/resnet.py.
  config.stage_features = (64, 128, 256, 512)
  config.blocks_per_stage = 2
  config.half_precision = False  # bfloat16 activations (parameters float32)

  config.target_accuracies = (0.88, 0.90, 0.92, 0.94)
  config.checkpoint_every_epochs = 1
  return config
