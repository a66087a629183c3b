"""stpm: Student-Teacher Feature Pyramid Matching for visual anomaly detection."""

from .detector import STPM, Prediction, __version__
from .errors import StpmError

__all__ = ["STPM", "Prediction", "StpmError", "__version__"]
