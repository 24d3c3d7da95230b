"""vicuna-bench: a tensor-parallel Llama-2 inference engine and the suites that prove it."""

from .errors import EngineError, GateFailed, UserError, VicunaBenchError

__version__ = "0.1.0"
__all__ = ["EngineError", "GateFailed", "UserError", "VicunaBenchError", "__version__"]
