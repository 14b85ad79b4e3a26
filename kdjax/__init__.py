"""kdjax: knowledge-distillation papers reimplemented in JAX/Flax.

Import the pure losses from :mod:`kdjax.methods`, the models from :mod:`kdjax.models`,
the input pipeline from :mod:`kdjax.data`, and the training pieces from :mod:`kdjax.train`.
"""

__version__ = "0.1.0"
