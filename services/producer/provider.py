"""The dataset provider interface: what a new dataset implements.

A provider describes its data (``meta``, ``schema``, its stages) and samples
one batch from a random generator it is handed. The producer loop owns
everything else: sequence numbers, random streams, stage choice, transport,
backpressure, logging and metrics. A new dataset is one new module under
``services/producer/providers/`` that defines ``PROVIDER``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from shared.codec import TensorSpec
from shared.settings import ProducerConfig, SettingsError


class Provider(ABC):
    #: dataset name, recorded in the meta (and so in the fingerprint)
    name: ClassVar[str]

    def __init__(self, settings: ProducerConfig) -> None:
        self.settings = settings

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """JSON-able description of the data (vocabulary, stages, ...). It is
        part of the dataset contract: change it and the fingerprint changes."""

    @abstractmethod
    def schema(self) -> dict[str, TensorSpec]:
        """Name, dtype and exact shape of every tensor of a batch."""

    @abstractmethod
    def stage_count(self, split: str) -> int:
        """How many stages ``split`` has (at least one)."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, split: str, stage: int) -> dict[str, np.ndarray]:
        """One batch of ``split`` made with ``stage``, using only ``rng`` for
        randomness (that is what makes batches reproducible)."""


def load_provider(settings: ProducerConfig) -> Provider:
    """Instantiate ``services.producer.providers.<settings.dataset>.PROVIDER``."""
    module_name = f"services.producer.providers.{settings.dataset}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise SettingsError(
            f"dataset = {settings.dataset!r}: no module {module_name}; "
            "add one that defines PROVIDER"
        ) from None
    provider_cls = getattr(module, "PROVIDER", None)
    if not (isinstance(provider_cls, type) and issubclass(provider_cls, Provider)):
        raise SettingsError(f"{module_name}.PROVIDER must be a Provider subclass")
    return provider_cls(settings)
