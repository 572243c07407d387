"""pyconv-jax: Pyramidal Convolution networks (Duta et al., arXiv 2006.11538) in JAX/Flax."""

from pyconv_jax.models import create_model, get_spec, list_models
from pyconv_jax.pretrained import load_pretrained

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_spec", "list_models", "load_pretrained"]
