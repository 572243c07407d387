"""Native code the project compiles on install (:mod:`pyconv_jax.native.build`, run by ``make``).

- ``onednn_conv.cc``, ``narrow_conv.cc``, ``paired_conv.cc``: XLA FFI handlers for a
  convolution's forward pass (plain, or with an inference epilogue: bias, residual, ReLU) and both
  of its gradients, computed by oneDNN (the pip packages ``onednn-cpu-gomp`` and
  ``onednn-devel-cpu-gomp``) or by the project's AVX-512 kernels for levels with few (narrow) or
  eight or four (paired) outputs per group. Built into :data:`pyconv_jax.native.build.LIBRARY`;
  :mod:`pyconv_jax.layers.onednn_conv` loads it.
- ``norm_grad.cc``: in the same library, a handler for a BatchNorm's input gradient written into
  the channel pieces its input was concatenated from (a PyConv's levels;
  :mod:`pyconv_jax.layers.norm`).
- ``block_cache.c``: an allocator shim that keeps large freed blocks mapped, preloaded by the
  scripts (:mod:`pyconv_jax.host`). Built into :data:`pyconv_jax.native.build.BLOCK_CACHE`.
"""
