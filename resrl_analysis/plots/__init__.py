"""Paper-style figures drawn from result objects or their tables; never from models.

Every function takes data (a result's ``to_frame()`` table, or plain columns), an optional ``ax``,
and returns the matplotlib Axes or Figure it drew on. Nothing here imports transformers or touches a
model: the probes compute, the plots draw (seaborn's split of statistics from drawing).
"""

from .curves import plot_pass_at_k, plot_training_dynamics
from .diagnostics import (
    plot_bound_validation,
    plot_cosine_distribution,
    plot_explained_variance,
    plot_first_order,
    plot_group_cosine_over_steps,
    plot_lld_bars,
    plot_lld_over_steps,
    plot_proxy_vs_interference,
    plot_residual_weight_hist,
    plot_token_heatmap,
)
from .style import ALGORITHM_COLORS, color_for, paper_style, save_figure

__all__ = [
    "ALGORITHM_COLORS",
    "color_for",
    "paper_style",
    "save_figure",
    "plot_pass_at_k",
    "plot_training_dynamics",
    "plot_bound_validation",
    "plot_cosine_distribution",
    "plot_explained_variance",
    "plot_first_order",
    "plot_group_cosine_over_steps",
    "plot_lld_bars",
    "plot_lld_over_steps",
    "plot_proxy_vs_interference",
    "plot_residual_weight_hist",
    "plot_token_heatmap",
]
