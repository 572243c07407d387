"""Native code the project compiles on install: oneDNN convolutions for XLA:CPU.

``onednn_conv.cc`` holds XLA FFI handlers for a convolution's forward pass and both of its
gradients, computed by oneDNN (the pip packages ``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp``). :mod:`pyconv_jax.native.build` compiles it into
:data:`pyconv_jax.native.build.LIBRARY`; :mod:`pyconv_jax.layers.onednn_conv` loads it.
"""
