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
    """Two real GRPO steps. Sampling is restricted to "a", "b", "ab", "x", "y", the lone byte 0xC3 and EOS, so
    completions end by EOS or by length, some hold invalid UTF-8 and some split "ab" the way the tokenizer never
    does."""
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# ============================================================== 2. logged log-probs as a fidelity check (prime-rl)

PAIRS = [(12, 34, 408), (23, 47, 1081)]


def reference_logps(model, prompt, response, temperature: float) -> list[float]:
    """log π(y_t | x, y_<t) at ``temperature`` by a plain full forward in float64 (the slow reference)."""
    ids = torch.tensor([list(prompt) + list(response)])  # (1, P + R)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double()[0] / temperature, -1)  # (P + R, V)
    return [float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(response)]


def _samples(model, tok, prompt, temperature: float, n: int = 4) -> list[list[int]]:
    """``n`` responses sampled from ``model`` at ``temperature`` (seeded, the global RNG left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = model.generate(torch.tensor([prompt] * n), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=6, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    rows = [r[len(prompt):].tolist() for r in out]  # (n, ≤ 6)
    return [r[: r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in rows]


def write_prime_rl_export(root: Path, *, sampled_at: float, logged_temperature: float, step: int = 0,
                          sample: bool = False) -> Path:
    """``token_exports/step_N/rank_R.jsonl`` with prime-rl's field names (token_export.py, schema 2): per token
    ``token_ids``, ``loss_mask``, ``inference_logprobs`` (the sampler's, here the reference's at ``sampled_at``),
    ``trainer_logprobs``, ``advantages``, ``rewards``, ``temperatures``; two ranks, a multi-turn sequence.
    ``sample``: the responses are the model's samples at ``sampled_at`` (else the right answer and two wrong ones)."""
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    d = root / "token_exports" / f"step_{step}"
    d.mkdir(parents=True)
    recs = []
    for a, b, c in PAIRS:
        prompt = tok(f"{a}*{b}=")["input_ids"]
        responses = _samples(model, tok, prompt, sampled_at) if sample else \
            [tok(str(ans), add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for ans in (c, c + 1, c + 2)]
        for resp in responses:
            ans = tok.decode(resp, skip_special_tokens=True)
            lp = reference_logps(model, prompt, resp, sampled_at)
            n, r = len(prompt) + len(resp), float(ans == str(c))
            recs.append({"schema_version": 2, "step": step, "export_step": step, "sample_id": f"{a}x{b}-{len(recs)}",
                         "token_ids": prompt + resp, "position_ids": list(range(n)),
                         "loss_mask": [False] * len(prompt) + [True] * len(resp),
                         "temperatures": [logged_temperature] * n, "advantages": [r - 1 / 3] * n,
                         "rewards": [r] * n, "inference_logprobs": [0.0] * len(prompt) + lp,
                         "trainer_logprobs": [0.0] * len(prompt) + lp, "env_names": ["mult"] * n})
    multi = dict(recs[0], loss_mask=[False] * 3 + [True, False, True] + [False] * (len(recs[0]["token_ids"]) - 6))
    for rank, part in enumerate((recs[:3] + [multi], recs[3:])):
        (d / f"rank_{rank}.jsonl").write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in part))
    (d / "STABLE").touch()
    return root / "token_exports"


@pytest.mark.integration
def test_prime_rl_token_exports_are_exact_by_construction(tmp_path):
    exports = write_prime_rl_export(tmp_path, sampled_at=1.0, logged_temperature=1.0)
    ps = load_probe_set(exports, None)  # no tokenizer needed: ids, rewards and log-probs are all logged
    assert ps.kind == "prime_rl_tokens" and ps.n_groups == 2 and ps.n_responses == 6 and ps.n_mixed == 2
    assert ps.token_counts() == {"exact": 6, "round_trip": 0, "unverified": 0} and ps.n_logged_logprobs == 6
    assert "dropped 1 multi-turn sequences (untrained tokens inside the response)" in ps.notes
    tok = AutoTokenizer.from_pretrained(BASE)
    g = ps.groups[0]
    assert g.prompt_ids == tuple(tok("12*34=")["input_ids"]) and g.rewards == (1.0, 0.0, 0.0)
    assert tok.decode(g.response_ids[0], skip_special_tokens=True) == "408"
    assert g.response_ids[0][-1] == tok.eos_token_id
    assert ps.sampler_step == 0 and ps.logprob_temperature == 1.0
    assert from_prime_rl_tokens(exports / "step_0" / "rank_1.jsonl").n_responses == 3
    with pytest.raises(ProbeError, match=r"no token export for step 5 \(have \[0\]\)"):
        from_prime_rl_tokens(exports, step=5)


def _fidelity(exports: Path, out: Path, capsys) -> tuple:
    return _fidelity_run(BASE, out, capsys, "--probe-set", str(exports))


def _fidelity_run(run: Path, out: Path, capsys, *args: str) -> tuple:
    assert probe_main([str(run), *args, "--probes", "fidelity", "--out", str(out), *QUIET]) == 0
    return load_results(out)["fidelity"], capsys.readouterr().out


@pytest.mark.integration
def test_fidelity_agrees_with_the_sampler_and_names_a_temperature_mismatch(tmp_path, capsys, one_thread):
    r, said = _fidelity(write_prime_rl_export(tmp_path / "same", sampled_at=1.0, logged_temperature=1.0),
                        tmp_path / "o1", capsys)
    v = r.meta["verdict"]
    assert v["ok"] and v["n_tokens"] > 0 and v["max_abs_delta"] < 1e-4 and abs(v["kl_k3"]) < 1e-8
    assert v["judged_at"] == "the checkpoint that sampled them" and "mismatch" not in said
    assert len(r.responses) == 6 and set(r.responses.origin) == {"exact"}
    # Sampled at temperature 0.7, logged as such: the probe compares at 0.7 and agrees.
    r, _ = _fidelity(write_prime_rl_export(tmp_path / "cold", sampled_at=0.7, logged_temperature=0.7, sample=True),
                     tmp_path / "o2", capsys)
    assert r.meta["verdict"]["ok"] and r.meta["temperature"] == 0.7 and r.meta["verdict"]["max_abs_delta"] < 1e-4
    assert len(r.responses) >= 6
    # Sampled at 0.3 but logged as 1.0: a mismatch, its size checked against the float64 reference, its cause named.
    exports = write_prime_rl_export(tmp_path / "wrong", sampled_at=0.3, logged_temperature=1.0, sample=True)
    r, said = _fidelity(exports, tmp_path / "o3", capsys)
    model = AutoModelForCausalLM.from_pretrained(BASE).eval()
    ps = load_probe_set(exports, None)
    for row in r.responses.itertuples():
        g = next(g for g in ps.groups if g.group_id == row.group_id)
        ours = torch.tensor(reference_logps(model, g.prompt_ids, g.response_ids[row.response_index], 1.0))
        d = torch.tensor(g.logged_logprobs[row.response_index], dtype=torch.float64) - ours  # (T,)
        assert row.kl_k3 == pytest.approx(float((torch.expm1(-d) + d).mean()), rel=1e-4, abs=1e-5)
        assert row.kl_k1 == pytest.approx(float(d.mean()), abs=1e-5)
        assert row.max_abs_delta == pytest.approx(float(d.abs().max()), abs=1e-5)
    assert not r.meta["verdict"]["ok"]
    assert "warning: fidelity: training–inference mismatch at step 0" in said and "sampler settings" in said
    summary = json.loads((tmp_path / "o3" / "summary.json").read_text())
    assert summary["probe_set"]["n_logged_logprobs"] == ps.n_responses


@pytest.mark.integration
def test_fidelity_on_our_own_rollout_dump_judges_the_checkpoint_that_sampled(tmp_path, capsys, one_thread):
    """Our trainer dumps the rollout policy's token log-probs: checkpoint 0 agrees with the dump of step 0 to float
    precision, the later checkpoints (one and two updates on) do not."""
    from trainer_runner import FAST, train_easy

    from trainer.config import TrainConfig

    run = tmp_path / "run"
    train_easy(TrainConfig(**{**FAST, "output_dir": str(run), "steps": 2, "save_every": 1}))
    r, said = _fidelity_run(run, tmp_path / "out", capsys)
    v, by_step = r.meta["verdict"], r.by_step().set_index("step")
    assert v["step"] == 0 and v["judged_at"] == "the checkpoint that sampled them" and v["ok"]
    assert by_step.loc[0, "max_abs_delta"] < 1e-4 and (by_step.loc[[1, 2], "max_abs_delta"] > 1e-2).all()
    assert "mismatch" not in said


@pytest.mark.integration
def test_verl_rows_with_ids_and_rollout_log_probs_are_exact(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE)
    p, r = tok("12*3=")["input_ids"], tok("36", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    row = {"input": "12*3=", "output": "36", "score": 1.0, "step": 2, "uid": "a", "prompt_ids": p, "response_ids": r,
           "rollout_log_probs": [-0.5] * len(r)}
    (tmp_path / "2.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "rollout_log_probs": [0.1]}) + "\n")
    with pytest.raises(ProbeError, match=r"2\.jsonl:2: field 'rollout_log_probs': expected a list of 3 log-probs"):
        load_probe_set(tmp_path / "2.jsonl", tok)
    (tmp_path / "2.jsonl").write_text(json.dumps(row) + "\n")
    ps = load_probe_set(tmp_path / "2.jsonl", tok)
    assert ps.token_counts()["exact"] == 1 and ps.groups[0].response_ids == (tuple(r),)
    assert ps.groups[0].logged_logprobs == ((-0.5,) * len(r),) and ps.sampler_step == 1


@pytest.mark.integration
def test_fidelity_says_what_it_did_not_measure(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "12*34=", "responses": ["408", "407"], "rewards": [1, 0]}) + "\n")
    assert probe_main([str(BASE), "--probe-set", str(f), "--probes", "fidelity", "--out", str(tmp_path / "o"),
                       *QUIET]) == 0
    assert "fidelity: not computed: the probe set (jsonl) logs no sampler log-probs" in capsys.readouterr().out


# ============================================================== 3. readers

CHAT = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.mark.integration
def test_verl_v1_keys_group_by_their_uid_and_the_logged_score_is_kept(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE)
    # verl's dump fields (input, output, gts, score, step) with a v1 trainer's {uid}_{session}_{index} row keys.
    rows = [("9f1c_0_0", "12*3=", "36", 1.0), ("9f1c_0_1", "12*3=", "35", 0.0), ("9f1c_1_0", "12*3=", "36", 0.0),
            ("77ab_0_0", "11*2=", "22", 1.0), ("77ab_0_1", "11*2=", "21", 0.0)]
    gts = {"12*3=": "36", "11*2=": "22"}
    (tmp_path / "3.jsonl").write_text("".join(json.dumps({"input": p, "output": o, "gts": gts[p], "score": s,
                                                          "step": 3, "uid": u}) + "\n" for u, p, o, s in rows))
    ps = load_probe_set(tmp_path / "3.jsonl", tok)
    assert [g.prompt_uid for g in ps.groups] == ["9f1c", "77ab"] and ps.n_mixed == 2  # main: 5 groups, 0 mixed
    assert ps.groups[0].rewards == (1.0, 0.0, 0.0)  # the logged score, though gts would say 1.0 for the third
    assert any("verl v1 keys" in n for n in ps.notes) and ps.sampler_step == 2


@pytest.mark.integration
def test_merged_verl_layout_and_trl_directories_that_lack_something(tmp_path, capsys):
    merged = tmp_path / "merged"
    for step in (1, 2):  # what verl's merger writes to a target directory: a plain HF folder per step
        shutil.copytree(BASE, merged / f"global_step_{step}")
    info = discover_run(merged)
    assert info.kind == "verl" and info.checkpoints == ((1, merged / "global_step_1"), (2, merged / "global_step_2"))
    logs = tmp_path / "trl" / "completions"
    logs.mkdir(parents=True)
    pd.DataFrame({"step": [3, 3], "prompt": ["12*3="] * 2, "completion": ["36", "35"], "acc": [1.0, 0.0],
                  "advantage": [0.7, -0.7]}).to_parquet(logs / "completions_00003.parquet")
    with pytest.raises(ProbeError, match=r"completion logs but no model .*save_steps.*--base-model"):
        discover_run(tmp_path / "trl")
    assert probe_main([str(tmp_path / "trl"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "save_steps" in err
    for f in BASE.iterdir():  # trainer.save_model() at the end: the final model at the root
        shutil.copy(f, tmp_path / "trl" / f.name)
    info = discover_run(tmp_path / "trl")
    assert info.kind == "trl" and info.checkpoints == ((3, tmp_path / "trl"),)
    assert "only the final model (step 3) is probed" in info.notes[0] and "--base-model" in info.notes[0]


@pytest.mark.integration
def test_user_jsonl_message_list_prompts_use_the_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = CHAT
    msgs = [{"role": "system", "content": "multiply"}, {"role": "user", "content": "12*3="}]
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": msgs, "responses": ["36", "35"], "rewards": [1, 0], "finished": [True, False]})
                 + "\n")
    g = load_probe_set(f, tok).groups[0]
    # As TRL renders a conversational prompt: the template's text with the generation prompt, one BOS.
    want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert g.prompt_ids == tuple(want["input_ids"]) and g.prompt_ids.count(tok.bos_token_id) == 1
    assert g.response_ids[0][-1] == tok.eos_token_id and g.response_ids[1][-1] != tok.eos_token_id  # `finished`
    tok.chat_template = None
    with pytest.raises(ProbeError, match=r"p\.jsonl:1: .*no chat template"):
        load_probe_set(f, tok)


# ============================================================== 5. say what was not computed, and why


@pytest.mark.e2e
def test_a_trl_run_is_told_what_was_not_computed_in_its_own_words(text_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    proc = _cli("figures", str(run), "--out", str(tmp_path / "figs0"), "--only", "pass_at_k", "--formats", "png")
    assert proc.returncode == 0 and "note: no probe results yet" in proc.stdout, proc.stderr
    proc = _cli("probe", str(run), "--probes", "diversity,entropy", "--samples", "2", *QUIET)
    assert proc.returncode == 0, proc.stderr
    # No ground truth in a TRL completion log: said on the terminal, with where one can come from.
    assert "resrl probe: diversity: not computed" in proc.stdout and "a TRL completion log holds none" in proc.stdout
    proc = _cli("figures", str(run), "--out", str(tmp_path / "figs"), "--only",
                "pass_at_k,in_batch_lld,entropy_by_polarity,collateral_vs_pushdown", "--formats", "png")
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout
    assert "no probe results yet" not in said
    assert "the diversity probe ran but pass@k has nothing to count: no ground truth" in said
    assert "no diversity probe results" not in said  # it ran
    assert said.count("TRL runs log none") == 3 and "(train with" not in said  # not our trainer's advice
    for bad in ([str(tmp_path / "nope")], [str(tmp_path / "figs")]):  # missing; a directory holding no run
        proc = _cli("figures", *bad, "--out", str(tmp_path / "f2"))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("resrl figures: error:")
    proc = _cli("compare", str(tmp_path / "nope"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
