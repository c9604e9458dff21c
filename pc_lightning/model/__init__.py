"""Model definitions (kept apart from training, parallelism and launch)."""

from pc_lightning.model.llama import Llama, count_parameters, flops_per_token, model_flops_per_token

__all__ = ["Llama", "count_parameters", "flops_per_token", "model_flops_per_token"]
