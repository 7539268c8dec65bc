"""Probes: registered measurements from (model, probe set, options) to result objects
(:mod:`resrl_analysis.results`).

Every probe is one module plus one registration in :mod:`.registry` (:data:`REGISTRY`, :func:`register_probe`);
the command line (:mod:`.runner`, ``resrl probe``), the memory plan, the TRL callback and ``load_results``
loop over the registry. None of the probe modules plots, prints or writes files:

- :mod:`.capture`: teacher-forced forward passes (log-probs, entropy, head inputs, hidden states).
- :mod:`.lld`: log-likelihood scores and entropy of the probe set (``entropy``), lazy likelihood displacement
  (``lld``).
- :mod:`.first_order`: first-order prediction of one SGD step, checked against real steps (``first_order``).
- :mod:`.interference`: head-gradient cosines, group alignment, NTHR scores, whole-model cosine
  (``interference``).
- :mod:`.subspace`: residual energy per representation, explained variance, the bound, Spearman (``subspace``).
- :mod:`.diversity`: sampling, pass@k, Avg@n, distinct-n, self-BLEU, distinct answers (``diversity``).
- :mod:`.entropy_dynamics`: the first-order entropy change of a head step by the polarity of its cause, beside
  real steps and the covariance proxy (``entropy_dynamics``).
- :mod:`.flips`: token flips between checkpoints and the coupling of identical low-confidence tokens (``flips``).
- :mod:`.fidelity`: logged sampler log-probs against the checkpoint's, the training–inference mismatch
  (``fidelity``).
- :mod:`.config`, :mod:`.engine`, :mod:`.output`: the typed configuration of a pass, the pass itself, and
  writing its results as one set.
- :mod:`.synthetic`: a tiny fake run directory for tests and examples.

    >>> from resrl_analysis.probes import ALL_REPRESENTATIONS, PROBES
    >>> len(ALL_REPRESENTATIONS), PROBES[0]
    (8, 'lld')
"""

# The import order is the registration order (the order of --probes, the help and docs/PROBES.md).
from .lld import (  # isort: skip
    EntropyProbe,
    LLDProbe,
    lld_along_run,
    lld_between,
    lld_between_models,
    score_responses,
    scores_from_forwards,
)
from .first_order import (  # isort: skip
    ALGORITHMS,
    AdvantageOptions,
    FirstOrderProbe,
    first_order_prediction,
    token_advantages,
)
from .interference import InterferenceProbe, full_model_gradient_cosine, interference_probe  # isort: skip
from .subspace import (  # isort: skip
    ALL_REPRESENTATIONS,
    PAPER_REPRESENTATION,
    Representation,
    SubspaceProbe,
    spearman,
    subspace_probe,
)
from .diversity import (  # isort: skip
    DiversityProbe,
    distinct_n,
    diversity_probe,
    self_bleu,
    sentence_bleu,
)
from .entropy_dynamics import EntropyDynamicsProbe, entropy_dynamics  # isort: skip
from .flips import FlipsProbe, flips_along_run  # isort: skip
from .fidelity import FidelityProbe, FidelityResult  # isort: skip
from .capture import GroupForward, capture_head_input, forward_group, forward_probe_set  # isort: skip
from .registry import REGISTRY, Probe, get_probe, register_probe, unregister_probe  # isort: skip

#: The built-in probes, in registration order.
PROBES: tuple[str, ...] = tuple(REGISTRY)

__all__ = [
    "ALGORITHMS",
    "ALL_REPRESENTATIONS",
    "AdvantageOptions",
    "DiversityProbe",
    "EntropyDynamicsProbe",
    "EntropyProbe",
    "FidelityProbe",
    "FidelityResult",
    "FirstOrderProbe",
    "FlipsProbe",
    "GroupForward",
    "InterferenceProbe",
    "LLDProbe",
    "PAPER_REPRESENTATION",
    "PROBES",
    "Probe",
    "REGISTRY",
    "Representation",
    "SubspaceProbe",
    "capture_head_input",
    "distinct_n",
    "diversity_probe",
    "entropy_dynamics",
    "first_order_prediction",
    "flips_along_run",
    "forward_group",
    "forward_probe_set",
    "full_model_gradient_cosine",
    "get_probe",
    "interference_probe",
    "lld_along_run",
    "lld_between",
    "lld_between_models",
    "register_probe",
    "score_responses",
    "scores_from_forwards",
    "self_bleu",
    "sentence_bleu",
    "spearman",
    "subspace_probe",
    "token_advantages",
    "unregister_probe",
]
