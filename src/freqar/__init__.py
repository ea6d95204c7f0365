"""freqar: frequency-aware autoregressive image generation.

Small public API; importing it loads no weights, touches no network and no CUDA.
"""

from __future__ import annotations

from .engine.generate import GenerationOutput, generate
from .engine.guidance import Guidance
from .engine.sampling import SamplerConfig
from .errors import FreqarError
from .pipeline import Pipeline
from .registry import create_model, get_spec, list_models

__all__ = [
    "FreqarError",
    "GenerationOutput",
    "Guidance",
    "Pipeline",
    "SamplerConfig",
    "create_model",
    "generate",
    "get_spec",
    "list_models",
]
__version__ = "0.1.0"
