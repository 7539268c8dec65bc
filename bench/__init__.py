"""Benchmarks: speed and memory of the analysis core and the trainer (issue 6).

Not unit tests: ``make bench`` runs :mod:`bench.run_cpu` (the CPU part, at most 10 minutes on two cores) and
``bench/gpu_bench.sh`` runs :mod:`bench.gpu_bench` on a CUDA machine. Results go to ``bench/RESULTS.md``.

Modules:

- :mod:`bench.common`: machine description, timing, peak-memory measurement in fresh subprocesses, the
  results table and the rewriting of ``RESULTS.md``.
- :mod:`bench.interference_bench`: factorised head-gradient inner products against per-sample autograd.
- :mod:`bench.logprob_bench`: chunked log-probs and entropy against full float32 logits.
- :mod:`bench.train_bench`: ``resrl`` against ``grpo`` step time with our trainer.
- :mod:`bench.trl_compare`: our ``grpo`` step against TRL's ``GRPOTrainer`` (own virtual environment).
- :mod:`bench.rollout_token_cost`: what the rollout dump's per-token entropies add to the no-grad forward.
"""
