"""stpm: Student-Teacher Feature Pyramid Matching for visual anomaly detection."""

from .detector import STPM, Prediction
from .errors import StpmError
from .version import __version__

__all__ = ["STPM", "Prediction", "StpmError", "__version__"]
