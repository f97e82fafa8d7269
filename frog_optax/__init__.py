"""frog_optax: FROG (Fisher ROw-wise preconditioninG) for JAX/Optax/Flax."""

from frog_optax import linen
from frog_optax._src.cg import batched_cg
from frog_optax._src.describe import describe
from frog_optax._src.fisher import row_fisher_operator
from frog_optax._src.stats import ConvGeometry
from frog_optax._src.stats import DenseGeometry
from frog_optax._src.stats import LayerStats
from frog_optax._src.transform import RankDeficientFisherWarning
from frog_optax._src.transform import ScaleByFrogState
from frog_optax._src.transform import frog
from frog_optax._src.transform import frog_param_labels
from frog_optax._src.transform import precondition_layer
from frog_optax._src.transform import preconditioned_modules
from frog_optax._src.transform import reference_fallback
from frog_optax._src.transform import scale_by_frog

__version__ = '0.1.0'

__all__ = (
  'ConvGeometry',
  'DenseGeometry',
  'LayerStats',
  'RankDeficientFisherWarning',
  'ScaleByFrogState',
  'batched_cg',
  'describe',
  'frog',
  'frog_param_labels',
  'linen',
  'precondition_layer',
  'preconditioned_modules',
  'reference_fallback',
  'row_fisher_operator',
  'scale_by_frog',
)
