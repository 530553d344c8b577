"""kdbench: a knowledge-distillation benchmark harness (Hydra sweeps -> run records -> leaderboards vs papers)."""

__version__ = "0.1.0"
