"""Names that label FROG's parts in compiled programs and profiles.

`jax.named_scope` puts them into the `op_name` of every operation traced
inside, so a profile (TensorBoard, xprof) or the compiled HLO shows which
kernels the capture, each layer's curvature, the CG solve and the rest of a
layer's update run.
"""

# Sampling rows, the zero perturbation's derivative, assembling the stats.
CAPTURE = 'frog_capture'
# A member's whole per-layer rule (the scopes below nest inside it).
LAYER = 'frog_layer'
# FROG's per-sample weights of the row Fishers: the trace normalisation.
CURVATURE = 'frog_curvature'
# The batched conjugate-gradient solve.
CG = 'frog_cg'
