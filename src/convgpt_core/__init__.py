"""Engine-agnostic ConvGPT: config and geometry, the compressor, checkpoints, reference model."""

from .config import ARCHITECTURE, MODEL_TYPE, ConvGPTConfig, Geometry, register_config

__all__ = ["ARCHITECTURE", "MODEL_TYPE", "ConvGPTConfig", "Geometry", "register", "register_config"]


def register() -> None:
    """Register the config and the reference model with transformers' Auto classes."""
    from .modeling import register as _register

    _register()
