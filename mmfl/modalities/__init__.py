"""Modalities and their registry (entry-point group ``mmfl.modalities``)."""

from mmfl.modalities.base import Modality
from mmfl.modalities.registry import (
    ModalityError,
    available_modalities,
    get_modality,
    get_modality_class,
    register_modality,
    unregister_modality,
)

__all__ = [
    "Modality",
    "ModalityError",
    "available_modalities",
    "get_modality",
    "get_modality_class",
    "register_modality",
    "unregister_modality",
]
