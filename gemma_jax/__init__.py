"""gemma_jax: Gemma 2 and Gemma 3 (text) in JAX/Flax NNX, exact to HF transformers."""

from importlib.metadata import PackageNotFoundError, version

from gemma_jax.config import (
    ConfigError,
    GemmaConfig,
    gemma2_2b,
    gemma2_9b,
    gemma2_27b,
    gemma2_tiny,
    gemma3_1b,
    gemma3_4b,
    gemma3_12b,
    gemma3_27b,
    gemma3_270m,
    gemma3_tiny,
    preset,
)
from gemma_jax.kv_cache import KVCache, LayerCache
from gemma_jax.params import ParamMappingError, from_hf_state_dict, to_hf_state_dict
from gemma_jax.transformer import Transformer, abstract_model, from_params, params_of

try:
    __version__ = version("gemma-jax")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+local"

__all__ = [
    "ConfigError",
    "GemmaConfig",
    "KVCache",
    "LayerCache",
    "ParamMappingError",
    "Transformer",
    "__version__",
    "abstract_model",
    "from_hf_state_dict",
    "from_params",
    "gemma2_2b",
    "gemma2_9b",
    "gemma2_27b",
    "gemma2_tiny",
    "gemma3_1b",
    "gemma3_4b",
    "gemma3_12b",
    "gemma3_27b",
    "gemma3_270m",
    "gemma3_tiny",
    "params_of",
    "preset",
    "to_hf_state_dict",
]
