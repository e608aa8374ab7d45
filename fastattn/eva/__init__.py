from .api import eva_landmarks, flash_eva
from .cache import EvaCache
from .options import EvaOptions

__all__ = ["flash_eva", "eva_landmarks", "EvaCache", "EvaOptions"]
