"""`<preset>-random`: a preset's shape with seeded random weights (benchmarks without downloads)."""

from __future__ import annotations

from typing import Optional

import torch

from export.config import PRESETS, GPTConfig
from export.load.state import RANDOM_SUFFIX
from export.model import GPT

RANDOM_SEED = 0  # `<preset>-random` is deterministic: the same weights on every machine


def random_preset(name: str) -> Optional[str]:
    """The preset of a `<preset>-random` name, None for any other name."""
    if name.endswith(RANDOM_SUFFIX) and name[: -len(RANDOM_SUFFIX)] in PRESETS:
        return name[: -len(RANDOM_SUFFIX)]
    return None


def random_model(preset: str) -> GPT:
    config = GPTConfig.from_preset(preset)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(RANDOM_SEED)
        return GPT(config)
