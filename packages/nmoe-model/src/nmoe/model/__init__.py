"""nmoe.model: the DeepSeek-shaped MoE transformer (MLA/SDPA/SWA attention, routed + shared experts)."""

from nmoe.model.config import ModelConfig
from nmoe.model.model import PARAM_KINDS, InitRules, ModelOutput, Transformer, init_rules
from nmoe.model.stats import LayerRouterStats, RouterStats
from nmoe.model.summary import ModelSummary, model_summary

__all__ = [
    "InitRules",
    "LayerRouterStats",
    "ModelConfig",
    "ModelOutput",
    "ModelSummary",
    "PARAM_KINDS",
    "RouterStats",
    "Transformer",
    "init_rules",
    "model_summary",
]
