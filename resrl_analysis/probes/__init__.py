"""Probes: functions from (model, probe set, options) to result objects (:mod:`resrl_analysis.results`).

One module per measurement of docs/MATH.md; none plots, prints or writes files (the command line,
:mod:`.runner`, does the writing):

- :mod:`.capture`: teacher-forced forward passes (log-probs, entropy, head inputs, hidden states).
- :mod:`.lld`: log-likelihood scores and entropy of the probe set, lazy likelihood displacement.
- :mod:`.first_order`: first-order prediction of one SGD step, checked against real steps.
- :mod:`.interference`: head-gradient cosines, group alignment, NTHR scores, whole-model cosine.
- :mod:`.subspace`: residual energy per representation, explained variance, the bound, Spearman.
- :mod:`.diversity`: sampling, pass@k, Avg@n, distinct-n, self-BLEU, distinct answers.
- :mod:`.synthetic`: a tiny fake run directory for tests and examples.

    >>> from resrl_analysis.probes import ALL_REPRESENTATIONS, PROBES
    >>> len(ALL_REPRESENTATIONS), PROBES[0]
    (8, 'lld')
"""

from .capture import GroupForward, capture_head_input, forward_group, forward_probe_set
from .diversity import distinct_n, diversity_probe, exact_match_reward, sample_responses, self_bleu, sentence_bleu
from .first_order import ALGORITHMS, AdvantageOptions, first_order_prediction, token_advantages
from .interference import full_model_gradient_cosine, interference_probe
from .lld import lld_along_run, lld_between, lld_between_models, score_responses, scores_from_forwards
from .runner import PROBES, add_probe_arguments, run_probe
from .subspace import ALL_REPRESENTATIONS, PAPER_REPRESENTATION, Representation, spearman, subspace_probe

__all__ = [
    "ALGORITHMS",
    "ALL_REPRESENTATIONS",
    "AdvantageOptions",
    "GroupForward",
    "PAPER_REPRESENTATION",
    "PROBES",
    "Representation",
    "add_probe_arguments",
    "capture_head_input",
    "distinct_n",
    "diversity_probe",
    "exact_match_reward",
    "first_order_prediction",
    "forward_group",
    "forward_probe_set",
    "full_model_gradient_cosine",
    "interference_probe",
    "lld_along_run",
    "lld_between",
    "lld_between_models",
    "run_probe",
    "sample_responses",
    "score_responses",
    "scores_from_forwards",
    "self_bleu",
    "sentence_bleu",
    "spearman",
    "subspace_probe",
    "token_advantages",
]
