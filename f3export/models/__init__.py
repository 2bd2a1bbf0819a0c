"""Model families. Each registers one adapter; the core looks families up here and nowhere else."""

from .base import ModelAdapter
from .tuneavideo import TuneAVideoAdapter

ADAPTERS: dict[str, ModelAdapter] = {adapter.family: adapter for adapter in (TuneAVideoAdapter(),)}
