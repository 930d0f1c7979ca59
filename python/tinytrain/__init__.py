"""tinytrain: train int8 neural networks on microcontrollers within 256 KB of SRAM."""
from . import _core
from .graph import Graph, Node, Tensor
from .errors import ModelFormatError, QuantizationError, TinytrainError, UnsupportedOperatorError
from . import models
from . import datasets, reference
from .model import QuantizedModel
from .onnx_import import load_onnx
from .tflite_import import load_tflite
from .quantize import quantize
from .errors import MemoryBudgetError, PlanError
from . import schemes
from .schemes import Scheme
from .plan import MemoryReport, Plan
from .engine import compile
from .trainer import Trainer
from .lr import LrCandidate, LrChoice, choose_lr
from .sparse_search import SearchResult, search
from .errors import UpdateError
from .errors import DataError, DataWarning, NonFiniteDataError
from .update import Update, read_update

__version__ = _core.__version__

__all__ = ["Graph", "Node", "Tensor", "__version__"]
__all__ += ["TinytrainError", "ModelFormatError", "UnsupportedOperatorError", "QuantizationError", "models"]
__all__ += ["QuantizedModel", "load_onnx", "quantize", "datasets", "reference"]
__all__ += ["Scheme", "schemes", "compile", "Plan", "MemoryReport", "Trainer", "MemoryBudgetError", "PlanError"]
__all__ += ["search", "SearchResult", "choose_lr", "LrChoice", "LrCandidate"]
__all__ += ["load_tflite"]
__all__ += ["Update", "read_update", "UpdateError"]
__all__ += ["DataError", "NonFiniteDataError", "DataWarning"]
