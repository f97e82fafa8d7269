"""Default configuration: FROG, momentum SGD and AdamW on sklearn digits."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.dataset = 'digits'  # 'digits' | 'mnist1d' | 'mnist10k'
  config.data_path = ''  # mnist10k only: path to mnist10k.npz
  config.features = (32, 64, 64)
  config.batch_size = 128
  config.num_epochs = 30
  config.eval_every = 10  # steps; evaluation time is not counted
  config.seed = 0  # the first seed; seed i initialises and orders batches
  config.num_seeds = 3  # the verdict judges gaps against seed noise
  config.target_accuracies = (0.95, 0.97, 0.98)
  config.timing_rounds = 20  # interleaved step-time measurement

  config.optimizers = ('frog', 'sgd', 'adamw')
  # Chosen by `examples.compare.sweep` on a validation split (README).
  config.frog = ml_collections.ConfigDict(
    dict(
      learning_rate=0.1,
      momentum=0.9,
      weight_decay=1e-4,
      damping=1e-3,
      cg_iters=4,
      sample_size=32,
      other_lr_ratio=1.0,
      exclude=('head',),
    )
  )
  config.sgd = ml_collections.ConfigDict(
    dict(learning_rate=0.3, momentum=0.9, weight_decay=1e-4)
  )
  config.adamw = ml_collections.ConfigDict(
    dict(learning_rate=3e-3, weight_decay=1e-4)
  )
  return config
