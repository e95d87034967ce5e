"""Transfer learning from a timm backbone (VGG16 by default) to 15 Scene, as tracked Optuna studies."""

__version__ = "0.1.0"
