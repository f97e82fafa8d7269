"""frog_optax: FROG (Fisher ROw-wise preconditioninG) for JAX/Optax/Flax."""

from frog_optax import jax
from frog_optax import linen
from frog_optax import nnx
from frog_optax._src.adafisher import AdaFisherLayerState
from frog_optax._src.adafisher import adafisher
from frog_optax._src.adafisher import adafisherw
from frog_optax._src.adafisher import scale_by_adafisher
from frog_optax._src.aliases import reference_fallback
from frog_optax._src.capture import UnsyncedStatsWarning
from frog_optax._src.describe import describe
from frog_optax._src.family import LayerPreconditioner
from frog_optax._src.family import RowPreconditionerState
from frog_optax._src.family import scale_by_row_preconditioner
from frog_optax._src.fisher import batched_cg
from frog_optax._src.fisher import row_fisher_operator
from frog_optax._src.foof import FoofLayerState
from frog_optax._src.foof import foof
from frog_optax._src.foof import scale_by_foof
from frog_optax._src.frog import RankDeficientFisherWarning
from frog_optax._src.frog import ScaleByFrogState
from frog_optax._src.frog import frog
from frog_optax._src.frog import precondition_layer
from frog_optax._src.frog import scale_by_frog
from frog_optax._src.geometry import ConvGeometry
from frog_optax._src.geometry import DenseGeometry
from frog_optax._src.guard import apply_if_finite
from frog_optax._src.kfrog import kfrog
from frog_optax._src.kfrog import scale_by_kfrog
from frog_optax._src.routing import frog_param_labels
from frog_optax._src.routing import preconditioned_modules
from frog_optax._src.stats import LayerStats
from frog_optax._src.stats import ParamLayout
from frog_optax._src.stats import UncapturedLayer

__version__ = '0.1.0'

__all__ = (
  'AdaFisherLayerState',
  'ConvGeometry',
  'DenseGeometry',
  'FoofLayerState',
  'LayerPreconditioner',
  'LayerStats',
  'ParamLayout',
  'RankDeficientFisherWarning',
  'RowPreconditionerState',
  'ScaleByFrogState',
  'UncapturedLayer',
  'UnsyncedStatsWarning',
  'adafisher',
  'adafisherw',
  'apply_if_finite',
  'batched_cg',
  'describe',
  'foof',
  'frog',
  'frog_param_labels',
  'jax',
  'kfrog',
  'linen',
  'nnx',
  'precondition_layer',
  'preconditioned_modules',
  'reference_fallback',
  'row_fisher_operator',
  'scale_by_adafisher',
  'scale_by_foof',
  'scale_by_frog',
  'scale_by_kfrog',
  'scale_by_row_preconditioner',
)
