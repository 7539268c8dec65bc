"""Foreign runs, second round (issue 23): never score a logged response silently wrong.

Fixtures from the real peers where they run here: a TRL ``GRPOTrainer`` run on CPU with a random tiny Llama and a
byte-level BPE tokenizer trained with ``tokenizers``, sampling among a few tokens so that completions are cut by
``max_completion_length``, hold bytes that are not valid UTF-8 (decoded to U+FFFD: the ids are lost) and
non-canonical splits ("a" "b" where the tokenizer writes "ab"). ``TokenIdsCallback`` records what TRL generated, the
ground truth every text-derived id is checked against. prime-rl token exports and verl v1 dumps follow the field
names of the peers' own source (prime-rl ``trainer/rl/token_export.py``; verl's ``rollout_data_dir`` dump).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resrl_analysis.errors import ProbeError
from resrl_analysis.probe_sets import (
    from_prime_rl_tokens,
    load_probe_set,
    read_training_args,
    response_ids_from_text,
    trl_max_completion_length,
)
from resrl_analysis.probes.runner import main as probe_main
from resrl_analysis.results import load_results
from resrl_analysis.runs import discover_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "trainer" / "assets" / "tiny_warmstart"
MAX_LEN = 5
QUIET = ["--no-progress", "--groups", "0"]


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here: "ab" is one token, "é" is two bytes (0xC3 0xA9)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["ab ab abab café"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   padding_side="left")


def ab_reward(completions, **kwargs):
    return [float(c.count("ab")) for c in completions]


def bpe_grpo_run(out: Path, callbacks=()) -> Path:
    """Two real GRPO steps. Sampling is restricted to "a", "b", "ab", "x", "y", the lone byte 0xC3 and EOS, so completions end
    by EOS or by length, some hold invalid UTF-8 and some split "ab" the way the tokenizer never does."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = bpe_tokenizer()
    allowed = set(tok.convert_tokens_to_ids(["a", "b", "ab", "x", "y", "Ã", "<eos>"]))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=16, num_generations=4,
                      max_completion_length=MAX_LEN, max_steps=2, save_steps=1, logging_steps=1, log_completions=True,
                      report_to="none", use_cpu=True, learning_rate=1e-3, seed=0, save_only_model=True,
                      disable_tqdm=True, generation_kwargs={"suppress_tokens": sorted(set(range(len(tok))) - allowed)})
    ds = Dataset.from_dict({"prompt": ["ab", "ba", "abab", "bab"]})
    GRPOTrainer(model=model, reward_funcs=ab_reward, args=args, train_dataset=ds, processing_class=tok,
                callbacks=list(callbacks)).train()
    return out


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, one_thread):
    from resrl_analysis.integrations.trl import TokenIdsCallback

    return bpe_grpo_run(tmp_path_factory.mktemp("bpe") / "run", callbacks=[TokenIdsCallback()])


@pytest.fixture(scope="module")
def text_run(bpe_run, tmp_path_factory):
    """The same run as a plain TRL user has it: completion logs without the recorded id columns."""
    out = tmp_path_factory.mktemp("text") / "run"
    shutil.copytree(bpe_run, out, ignore=shutil.ignore_patterns("probes"))
    for f in (out / "completions").glob("*.parquet"):
        pd.read_parquet(f).drop(columns=["prompt_ids", "completion_ids"]).to_parquet(f)
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=600)


# ============================================================== 1. exact tokens, or a stated error bound


def test_recorded_ids_are_what_trl_generated_and_training_is_unchanged(bpe_run, tmp_path):
    tok = AutoTokenizer.from_pretrained(bpe_run / "checkpoint-1")
    eos = tok.eos_token_id
    f = bpe_run / "completions" / "completions_00001.parquet"
    log = pd.read_parquet(f)
    ends = {"eos": 0, "length": 0}
    for r in log.itertuples():
        ids = [int(t) for t in r.completion_ids]
        # TRL decodes the completion it generated with skip_special_tokens: the text of exactly these ids.
        assert tok.decode(ids, skip_special_tokens=True) == r.completion
        assert [int(t) for t in r.prompt_ids] == tok(r.prompt)["input_ids"]
        assert (ids[-1] == eos) or len(ids) == MAX_LEN  # finished with EOS, or cut at max_completion_length
        ends["eos" if ids[-1] == eos else "length"] += 1
    assert ends["eos"] and ends["length"], ends  # the fixture holds both endings
    ps = load_probe_set(f, tok)
    assert ps.token_counts() == {"exact": len(log), "round_trip": 0, "unverified": 0}
    got = {(g.prompt, tuple(r)) for g in ps.groups for r in g.response_ids}
    assert got == {(p, tuple(int(t) for t in c)) for p, c in zip(log.prompt, log.completion_ids)}
    # The callback wraps generation only: a run without it trains bit-identical weights.
    plain = bpe_grpo_run(tmp_path / "plain")
    a = AutoModelForCausalLM.from_pretrained(bpe_run / "checkpoint-2").state_dict()
    b = AutoModelForCausalLM.from_pretrained(plain / "checkpoint-2").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "prompt_ids" not in pd.read_parquet(plain / "completions" / "completions_00001.parquet")


def test_text_logs_get_no_eos_after_a_cut_and_count_what_cannot_be_verified(bpe_run, text_run):
    tok = AutoTokenizer.from_pretrained(text_run / "checkpoint-1")
    eos = tok.eos_token_id
    assert read_training_args(text_run / "checkpoint-1" / "training_args.bin")["max_completion_length"] == MAX_LEN
    assert trl_max_completion_length(text_run)[0] == MAX_LEN
    seen = {"exact": 0, "round_trip": 0, "unverified": 0}
    canonical = cut = 0
    for step in (1, 2):
        name = f"completions/completions_{step:05d}.parquet"
        truth = pd.read_parquet(bpe_run / name)
        ps = load_probe_set(text_run / name, tok)
        assert any("training_args.bin" in n for n in ps.notes)
        rows = {(g.prompt, t): (ids, o) for g in ps.groups
                for t, ids, o in zip(g.responses, g.response_ids, g.origins)}
        for r in truth.itertuples():
            sampled = tuple(int(t) for t in r.completion_ids)
            ids, origin = rows[(r.prompt, r.completion)]
            seen[origin] += 1
            if "\ufffd" in r.completion:
                assert origin == "unverified"  # the sampled bytes are gone: the ids cannot be known
                continue
            assert origin == "round_trip" and tok.decode(list(ids), skip_special_tokens=True) == r.completion
            body = sampled[:-1] if sampled[-1] == eos else sampled
            if tuple(tok(r.completion, add_special_tokens=False)["input_ids"]) == body:
                canonical += 1
                assert ids == sampled  # a canonical sample is recovered exactly, EOS decision included
                cut += sampled[-1] != eos  # ... and one cut by length gets no EOS (today's main appends one)
            # else: a non-canonical split, which text cannot show (the documented limit of a round trip)
    assert seen["unverified"] and seen["round_trip"] and canonical and cut, (seen, canonical, cut)
    # The unit: the finish comes from the source when it says, else from the length limit.
    assert response_ids_from_text(tok, "ab", finished=False).ids == tuple(tok("ab")["input_ids"])
    assert response_ids_from_text(tok, "ab", max_tokens=1).ids[-1] != eos  # one token = the limit: cut
    assert response_ids_from_text(tok, "ab", max_tokens=2).ids[-1] == eos
    assert response_ids_from_text(tok, "ab").reason == "finish unknown"


@pytest.mark.e2e
def test_probe_states_token_provenance_and_strict_tokens_refuses(bpe_run, text_run, tmp_path):
    f = text_run / "completions" / "completions_00001.parquet"
    proc = _cli("probe", str(text_run), "--probe-set", str(f), "--probes", "entropy", "--out", str(tmp_path / "a"),
                *QUIET)
    assert proc.returncode == 0, proc.stderr
    counts = json.loads((tmp_path / "a" / "summary.json").read_text())["probe_set"]["tokens"]
    assert counts["unverified"] > 0 and counts["exact"] == 0
    assert (f"0 scored from exact token ids, {counts['round_trip']} from verified round-trips of their text, "
            f"{counts['unverified']} from unverifiable text") in proc.stdout
    assert f"warning: {counts['unverified']} responses are scored from text" in proc.stdout
    proc = _cli("probe", str(text_run), "--probe-set", str(f), "--probes", "entropy", "--strict-tokens",
                "--out", str(tmp_path / "b"), *QUIET)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--strict-tokens refuses" in proc.stderr
    assert not (tmp_path / "b" / "summary.json").exists()
    # The run that recorded its ids: every response exact, --strict-tokens has nothing to refuse.
    g = bpe_run / "completions" / "completions_00001.parquet"
    proc = _cli("probe", str(bpe_run), "--probe-set", str(g), "--probes", "entropy", "--strict-tokens",
                "--out", str(tmp_path / "c"), *QUIET)
    assert proc.returncode == 0, proc.stderr
    tokens = json.loads((tmp_path / "c" / "summary.json").read_text())["probe_set"]["tokens"]
    assert tokens["exact"] == len(pd.read_parquet(g)) and tokens["unverified"] == tokens["round_trip"] == 0
