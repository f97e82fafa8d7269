"""Float64 is on for every test: solver exactness is checked in float64.

Tests that check float32/bfloat16 behaviour create their arrays with explicit
dtypes.
"""

import jax

jax.config.update('jax_enable_x64', True)
