"""Registry of model families: model_type -> the class that builds it from its config."""

from .gemma3 import Gemma3
from .gemma4 import Gemma4

ARCHITECTURES = {"gemma3": Gemma3, "gemma4": Gemma4}
