"""The memory plan: parsing, the parameter count against a real model, the CLI (--plan-only on a
config-only folder, refusal), and the estimate against the measured peak RSS on CPU (within 25%)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.common import reset_peak_rss
from bench.probe_bench import qwen3_config
from resrl_analysis.plan import ModelShape, ProbeShape, parse_memory, plan_probes

ROOT = Path(__file__).resolve().parents[1]
QWEN3_4B = ROOT / "bench" / "configs" / "qwen3-4b"


@pytest.mark.unit
def test_parse_memory_units_and_errors():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("1.5 TB") == 1.5e12
    for bad in ("80 parsecs", "GB", "-1GB", ""):
        with pytest.raises(ValueError, match="memory budget"):
            parse_memory(bad)


@pytest.mark.unit
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_a_real_qwen3(tied):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(vocab_size=97, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=40, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    assert ModelShape.from_config(cfg.to_dict()).n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.unit
def test_qwen3_4b_config_and_group_batching():
    m = ModelShape.from_pretrained(QWEN3_4B)
    assert (m.vocab, m.hidden, m.layers, m.heads, m.kv_heads, m.intermediate, m.tied, m.dtype_bytes) == (
        151936, 2560, 36, 32, 8, 9728, True, 2)
    assert 4.0e9 < m.n_params < 4.05e9  # Qwen3-4B: 4.02B parameters
    probes = ["lld", "first_order", "interference", "subspace", "diversity"]
    p = plan_probes(m, ProbeShape(8, 4096, 512, 8), probes, budget=80 * 10**9, device="cuda")
    assert p.fits and 1 <= p.group_batch < 8 and p.peak <= 80e9
    # More room, more groups at once; far less, a refusal naming a probe and what to change.
    assert plan_probes(m, ProbeShape(8, 4096, 512, 8), probes, budget=400 * 10**9, device="cuda").group_batch == 8
    small = plan_probes(m, ProbeShape(8, 4096, 512, 8), probes, budget=20 * 10**9, device="cuda")
    assert not small.fits and small.group_batch == 1
    assert "probe " in small.refusal() and "--memory-budget" in small.refusal() and "\n" not in small.refusal()


@pytest.mark.unit
def test_plan_constants_are_the_probes_chunk_sizes():
    """plan.py stays torch-free, so it mirrors the probes' chunk sizes: they must agree."""
    from resrl_analysis import interference, ops, plan

    assert plan.BLOCK_BYTES == interference.BLOCK_BYTES
    assert plan.CHUNK_BYTES == ops.DEFAULT_MEMORY_BUDGET_MB * 2**20


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer.cli", "probe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.e2e
def test_plan_only_on_a_config_only_folder(tmp_path):
    ck = tmp_path / "qwen3-4b"
    ck.mkdir()
    shutil.copy(QWEN3_4B / "config.json", ck / "config.json")  # no weights, no tokenizer
    r = _cli(str(ck), "--plan-only", "--samples", "8", "--max-new-tokens", "4096", "--memory-budget", "80GB",
             "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "fits: yes" in r.stdout and "budget 80.0 GB" in r.stdout and "groups of 8 × 4096 tokens" in r.stdout
    r = _cli(str(ck), "--plan-only", "--samples", "8", "--max-new-tokens", "4096", "--memory-budget", "20GB",
             "--device", "cuda", cwd=tmp_path)
    assert r.returncode == 2 and "fits: no" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert "memory plan: probe" in last and "--memory-budget" in last
    r = _cli(str(ck), "--plan-only", "--memory-budget", "lots", cwd=tmp_path)
    assert r.returncode == 2 and "--memory-budget" in r.stderr and "Traceback" not in r.stderr


#: The published config.json values of the Qwen3 models shipped as config-only plans (bench/configs/).
QWEN3 = {  # hidden, layers, heads, kv heads, head dim, intermediate, billions of parameters
    "qwen3-8b": (4096, 36, 32, 8, 128, 12288, 8.19),
    "qwen3-14b": (5120, 40, 40, 8, 128, 17408, 14.77),
    "qwen3-32b": (5120, 64, 64, 8, 128, 25600, 32.76),
}


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(QWEN3))
def test_qwen3_8b_to_32b_fit_eight_80gb_devices_with_the_defaults(name, capsys):
    """``resrl probe CONFIG --plan-only --nproc 8`` at G = 8, T = 4096 with every probe and the defaults: per-rank
    peaks within 80 GB, the choice (a whole copy does not fit one 80 GB device for any of them: sharded) printed."""
    from resrl_analysis.probes.runner import main

    d = ROOT / "bench" / "configs" / name
    m = ModelShape.from_pretrained(d)
    hidden, layers, heads, kv, hd, inter, billions = QWEN3[name]
    assert (m.vocab, m.hidden, m.layers, m.heads, m.kv_heads, m.head_dim, m.intermediate, m.tied, m.dtype_bytes) == (
        151936, hidden, layers, heads, kv, hd, inter, False, 2)
    assert abs(m.n_params / 1e9 - billions) < 0.01
    args = ["--plan-only", "--nproc", "8", "--memory-budget", "80GB", "--device", "cuda", "--samples", "8",
            "--max-new-tokens", "4096"]
    assert main([str(d), *args]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan per rank: budget 80.0 GB") and "groups of 8 × 4096 tokens" in out
    assert "8 ranks, at most 1 group(s) each: shard" in out and "fits: yes" in out
    assert "replica  largest peak" in out and "does not fit" in out and "<- chosen" in out
    plan = plan_probes(m, ProbeShape(8, 4096, 512, 8), ["lld", "first_order", "interference", "subspace",
                                                          "diversity"], budget=80 * 10**9, device="cuda", nproc=8,
                       samples=8)
    assert plan.parallel == "shard" and plan.fits and plan.peak <= 80e9 < plan.alternatives["replica"]


@pytest.mark.unit
def test_per_rank_plan_shares_groups_and_weights():
    m = ModelShape.from_pretrained(QWEN3_4B)
    probes = ["first_order", "interference"]
    one = plan_probes(m, ProbeShape(8, 1024, 256, 8), probes, budget=10**12, device="cuda")
    rep = plan_probes(m, ProbeShape(8, 1024, 256, 8), probes, budget=10**12, device="cuda", nproc=4,
                      parallel="replica")
    shard = plan_probes(m, ProbeShape(8, 1024, 256, 8), probes, budget=10**12, device="cuda", nproc=4,
                        parallel="shard")
    assert (one.shape.n_groups, rep.shape.n_groups, rep.group_batch) == (8, 2, 2) and rep.parallel == "replica"
    assert rep.parts["interference"]["weights"] == one.parts["interference"]["weights"] == m.n_params * 2
    # Sharded: a quarter of every parameter plus the root (embeddings, head) and two layers gathered.
    assert shard.parts["interference"]["weights"] == (math.ceil(m.n_params / 4) + m.root_params
                                                      + 2 * m.layer_params) * 2
    assert shard.parts["interference"]["whole-model gradients"] == 2 * math.ceil(m.n_params / 4) * 2
    # The whole-model gradients run after the batches: beside the weights only, not the kept groups.
    p = shard.parts["first_order"]
    later = sum(v for k, v in p.items() if k.startswith("whole-model "))
    assert shard.peaks["first_order"] >= p["weights"] + later
    assert "shard" in shard.describe().splitlines()[1] and shard.alternatives == {"shard": shard.peak}
    # One rank's share of a probe set of 5 groups on 2 ranks is 3 groups.
    assert plan_probes(m, ProbeShape(8, 64, 8, 5), probes, budget=10**12, nproc=2).shape.n_groups == 3


_WORKER = textwrap.dedent("""
    import gc, json, sys
    import torch
    torch.set_num_threads(1)
    from bench.common import PeakRSS
    from bench.probe_bench import qwen3_shaped
    from resrl_analysis.probes.capture import forward_probe_set
    from resrl_analysis.probes.first_order import first_order_prediction
    from resrl_analysis.probes.interference import interference_probe
    from resrl_analysis.probes.subspace import subspace_probe
    from resrl_analysis.probes.entropy_dynamics import entropy_dynamics

    G, T, P, V, d, ent = (int(a) for a in sys.argv[1:7])
    model, ps = qwen3_shaped(G, T, P, V, d)
    gc.collect()
    with PeakRSS() as mem:  # VmHWM reset to the current RSS: the peak from here on is the probes' working memory
        fwds = forward_probe_set(model, ps, entropy_gram=bool(ent))
        interference_probe(model, ps, forwards=fwds)
        subspace_probe(model, ps, forwards=fwds)
        first_order_prediction(model, ps, forwards=fwds, algorithms=["grpo", "nsr"])
        if ent:
            entropy_dynamics(model, ps, forwards=fwds, algorithms=["grpo", "nsr"])
    assert mem.exact, "VmHWM could not be reset"
    print(json.dumps({"peak": mem.peak_mb * 2**20}))
""")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not reset_peak_rss(), reason="needs /proc/self/clear_refs (Linux) to measure a peak")
@pytest.mark.parametrize("G,T,entropy", [(8, 256, False), (4, 512, False), (4, 512, True)])
def test_plan_estimate_within_25_percent_of_measured_peak_rss(G, T, entropy, tmp_path):
    P, V, d = 8, 32_000, 256
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    # Small allocations are returned to the system at once, so the resident peak is what was in use.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), *map(str, (G, T, P, V, d, int(entropy)))], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    m = ModelShape.from_config(qwen3_config(T, P, V, d), "float32")  # the worker's model
    probes = ["interference", "subspace", "first_order"] + (["entropy_dynamics"] if entropy else [])
    plan = plan_probes(m, ProbeShape(G, T, P, 1), probes, budget=10**12, full_model=False, device="cpu",
                       weights=False)
    assert abs(plan.peak - measured) <= 0.25 * measured, (plan.peak, measured, plan.parts)
