"""Engine-agnostic ConvGPT: config and geometry, the compressor, checkpoints, reference model.

Importing this package registers the ``convgpt`` config and the reference model with
transformers' Auto classes, so that, with no remote code::

    import convgpt_core  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("path/to/checkpoint")
"""

from .config import ARCHITECTURE, MODEL_TYPE, ConvGPTConfig, Geometry, register_config
from .modeling import register as _register_with_transformers

_register_with_transformers()

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "ConvGPTConfig", "Geometry", "register_config"]
