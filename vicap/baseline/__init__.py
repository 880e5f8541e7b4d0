"""The CNN+LSTM baseline: trained on the same manifest and scored by the same code as vicap runs.

`vicap baseline train RECIPE` / `vicap baseline evaluate RUN_DIR`; shipped recipes are `baseline_*`
(see `vicap.baseline.recipe`), the model is in `vicap.baseline.model`, the loop in `vicap.baseline.train`.
"""

from vicap.baseline.recipe import BaselineRecipe, is_baseline_recipe, load_baseline_recipe
from vicap.baseline.train import evaluate_baseline, train_baseline

__all__ = [
    "BaselineRecipe",
    "evaluate_baseline",
    "is_baseline_recipe",
    "load_baseline_recipe",
    "train_baseline",
]
