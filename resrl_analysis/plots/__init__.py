"""Paper-style figures drawn from result objects or their tables; never from models.

Every function takes data (a result's ``to_frame()`` table, or plain columns), an optional ``ax``,
and returns the matplotlib Axes or Figure it drew on. Nothing here imports transformers or touches a
model: the probes compute, the plots draw (seaborn's split of statistics from drawing).
"""

from .bands import overlap_note, seed_bands, seeds_phrase
from .curves import METRIC_LABELS, plot_pass_at_k, plot_seed_bands, plot_training_dynamics
from .diagnostics import (
    log_floor,
    plot_bound_validation,
    plot_cosine_distribution,
    plot_explained_variance,
    plot_first_order,
    plot_lld_bars,
    plot_lld_shared_unique,
    plot_proxy_vs_interference,
    plot_residual_weight_hist,
    plot_token_heatmap,
)
from .entropy import plot_entropy_prediction, plot_flip_map
from .selectivity import plot_collateral_vs_pushdown, plot_pass_at_k_strata, plot_seed_means
from .style import ALGORITHM_COLORS, color_for, paper_style, save_figure

__all__ = [
    "ALGORITHM_COLORS",
    "color_for",
    "paper_style",
    "save_figure",
    "METRIC_LABELS",
    "overlap_note",
    "seed_bands",
    "seeds_phrase",
    "plot_seed_bands",
    "plot_pass_at_k",
    "plot_training_dynamics",
    "log_floor",
    "plot_bound_validation",
    "plot_cosine_distribution",
    "plot_entropy_prediction",
    "plot_explained_variance",
    "plot_first_order",
    "plot_flip_map",
    "plot_lld_bars",
    "plot_lld_shared_unique",
    "plot_proxy_vs_interference",
    "plot_residual_weight_hist",
    "plot_token_heatmap",
    "plot_collateral_vs_pushdown",
    "plot_pass_at_k_strata",
    "plot_seed_means",
]
