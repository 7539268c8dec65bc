"""resrl-analysis: diagnostics for gradient interference in LLM reinforcement learning.

The public names (the stable contract) are importable from here::

    >>> from resrl_analysis import pass_at_k, resrl_token_weights, head_gradient_inner
    >>> round(float(pass_at_k(4, 2, 2)), 4)
    0.8333
"""

from .advantages import ALGORITHM_NAMES, AdvantageParams, get_algorithm, params_from_config
from .bounds import alignment_bound, alignment_bound_paper, head_gradient_bound
from .interference import (
    group_gradient_alignment,
    head_gradient_cosine,
    head_gradient_inner,
    nthr_scores,
    nthr_threshold,
    nthr_token_weights,
)
from .ops import (
    avg_at_n,
    group_advantages,
    masked_mean,
    pass_at_k,
    pass_at_k_curve,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
)
from .weighting import (
    ResRLWeightConfig,
    positive_subspace,
    residual_energy,
    resrl_token_weights,
    resrl_weight_details,
)

__version__ = "0.1.0"

__all__ = [
    "ALGORITHM_NAMES",
    "AdvantageParams",
    "get_algorithm",
    "params_from_config",
    "alignment_bound",
    "alignment_bound_paper",
    "avg_at_n",
    "group_advantages",
    "group_gradient_alignment",
    "head_gradient_bound",
    "head_gradient_cosine",
    "head_gradient_inner",
    "masked_mean",
    "nthr_scores",
    "nthr_threshold",
    "nthr_token_weights",
    "pass_at_k",
    "pass_at_k_curve",
    "positive_subspace",
    "residual_energy",
    "resrl_token_weights",
    "resrl_weight_details",
    "ResRLWeightConfig",
    "token_entropy",
    "token_logprobs",
    "token_logprobs_and_entropy",
]
