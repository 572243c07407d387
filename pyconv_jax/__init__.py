"""pyconv-jax: Pyramidal Convolution networks (Duta et al., arXiv 2006.11538) in JAX/Flax.

The public names load their modules (and JAX) on first use, so that a script can import
:mod:`pyconv_jax.host` and restart itself before paying for those imports.
"""

from pyconv_jax._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "create_model": "pyconv_jax.models",
    "get_spec": "pyconv_jax.models",
    "list_models": "pyconv_jax.models",
    "load_pretrained": "pyconv_jax.pretrained",
}

__all__ = ["__version__", *_EXPORTS]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
