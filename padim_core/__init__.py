"""PaDiM anomaly detection: fit on good parts, find where new parts differ.

Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization", https://arxiv.org/abs/2011.08785
"""

from padim_core.backbones import BACKBONES, WeightsUnavailableError
from padim_core.model import Padim, PadimConfig, PadimModel, Prediction, Thresholds
from padim_core.model_file import ModelFileError, load_model, save_model

__all__ = [
    "BACKBONES",
    "ModelFileError",
    "Padim",
    "PadimConfig",
    "PadimModel",
    "Prediction",
    "Thresholds",
    "WeightsUnavailableError",
    "load_model",
    "save_model",
]
