"""The lm-evaluation-harness adapter, driven by lm-eval itself on local JSON tasks built from the stdlib's
prose (offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): multiple choice, rolling log-likelihood and
generate_until give what the Scorer computes directly, and acc equals the built-in scorer's."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.data.tokenizer import ByteTokenizer
from mhc_jax.export import export_model
from mhc_jax.model import Transformer
from mhc_jax.multiple_choice import Question, score_questions
from mhc_jax.scoring import Scorer
from mhc_jax.sharding import make_mesh

from conftest import stdlib_prose

# Offline, as CI is: the local JSON tasks need no download (set before `datasets` reads its config).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402  (the [eval] extra; the [test] extra installs it too, so CI runs these tests)
from lm_eval.tasks import TaskManager  # noqa: E402

from mhc_jax.lm_eval_adapter import MhcJaxLM  # noqa: E402

TASKS = {
    "mhc_prose_mc": """
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "mhc_prose_rolling": """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""",
    "mhc_prose_gen": """
output_type: generate_until
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def sentences(n: int) -> list[str]:
    """The first n sentences of >= 40 characters of the prose, one line each."""
    text = " ".join(stdlib_prose(60_000).split())
    return [s.strip() + "." for s in text.split(". ") if len(s) >= 40][:n]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = load_config("tiny", ["residual.kind=mhc", "residual.n_streams=2", "engram.enabled=true",
                               "engram.layers=[1]", "engram.table_size=509", "engram.heads_per_ngram=2",
                               "model.init_std=0.1"])
    with jax.set_mesh(make_mesh(cfg.mesh)):
        model = Transformer(cfg, rngs=nnx.Rngs(11))
    export_dir = export_model(cfg, model, str(root / "export"))
    sents = sentences(12)
    rows = {
        "mhc_prose_mc": [{"context": s[:30], "choices": [s[30:45], sents[(i + 1) % 12][30:45], sents[(i + 5) % 12][30:52]],
                          "gold": 0} for i, s in enumerate(sents[:8])],
        "mhc_prose_rolling": [{"text": s} for s in sents[:3]] + [{"text": " ".join(sents[3:6])}],  # > max_seq_len
        "mhc_prose_gen": [{"context": s[:25], "target": s[25:31]} for s in sents[:4]],
    }
    for name, spec in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{spec}")
    return root, export_dir, rows


@pytest.fixture(scope="module")
def lm(setup):
    """One adapter for the tests that drive lm-eval: the export loads and its shapes compile once."""
    return MhcJaxLM(export=setup[1], batch_size=4)


def evaluate(root, lm, task):
    # include_defaults=False: indexing lm-eval's ~14k built-in task YAMLs costs ~20 s a call; ours suffice.
    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(root),
                                                                                    include_defaults=False),
                                   log_samples=True, bootstrap_iters=0)


def test_multiple_choice_task_matches_the_scorer_and_the_builtin_metric(setup, lm):
    root, _, rows = setup
    out = evaluate(root, lm, "mhc_prose_mc")
    samples = out["samples"]["mhc_prose_mc"]
    assert len(samples) == len(rows["mhc_prose_mc"])
    for s in samples:
        doc = s["doc"]
        direct = lm.scorer.loglikelihood([(doc["context"], " " + c) for c in doc["choices"]])
        got = [float(r[0]) for r in s["filtered_resps"]]
        np.testing.assert_allclose(got, [ll for ll, _ in direct], rtol=1e-6, atol=1e-6)
    builtin = score_questions(lm.scorer, [Question(r["context"], tuple(r["choices"]), r["gold"])
                                          for r in rows["mhc_prose_mc"]])
    metrics = out["results"]["mhc_prose_mc"]
    assert metrics["acc,none"] == pytest.approx(builtin["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(builtin["acc_norm"])


def test_rolling_loglikelihood_task_scores_every_token(setup, lm):
    root, _, rows = setup
    out = evaluate(root, lm, "mhc_prose_rolling")
    samples = out["samples"]["mhc_prose_rolling"]
    texts = [r["text"] for r in rows["mhc_prose_rolling"]]
    assert max(len(t) for t in texts) > lm.scorer.max_len  # one text needs several windows
    direct = lm.scorer.loglikelihood_rolling(texts)
    got = {s["doc"]["text"]: float(s["filtered_resps"][0]) for s in samples}
    np.testing.assert_allclose([got[t] for t in texts], direct, rtol=1e-6)
    # bits per byte from lm-eval's own aggregation: -sum(ll) / (ln 2 * sum(bytes))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert out["results"]["mhc_prose_rolling"]["bits_per_byte,none"] == pytest.approx(
        -sum(direct) / (np.log(2) * n_bytes), rel=1e-6)


def test_generate_until_task_returns_the_scorers_greedy_text(setup, lm):
    root, _, rows = setup
    out = evaluate(root, lm, "mhc_prose_gen")
    samples = out["samples"]["mhc_prose_gen"]
    assert len(samples) == 4
    for s in samples:
        expected = lm.scorer.generate_until([(s["doc"]["context"], {"until": ["\n"], "max_gen_toks": 6})])[0]
        assert s["resps"][0][0] == expected and "\n" not in expected
    assert 0.0 <= out["results"]["mhc_prose_gen"]["exact_match,none"] <= 1.0


def test_model_type_is_registered_for_the_lm_eval_command(setup):
    from lm_eval.api.registry import get_model

    _, export_dir, _ = setup
    assert get_model("mhc_jax") is MhcJaxLM
    lm = MhcJaxLM.create_from_arg_string(f"export={export_dir},batch_size=3", {"device": "cpu", "batch_size": None})
    assert isinstance(lm.scorer, Scorer) and lm.scorer.batch_size == 8  # rounded up to the 8-way batch axis
    assert isinstance(lm.scorer.tokenizer, ByteTokenizer)


def test_command_line_runs_a_local_task_on_an_export(setup, tmp_path, capsys):
    from mhc_jax.lm_eval_adapter import main

    root, export_dir, _ = setup
    assert main(["--model", "mhc_jax", "--model_args", f"export={export_dir}", "--batch_size", "8", "--tasks", "mhc_prose_mc",
                 "--include_path", str(root), "--limit", "3", "--output_path", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "mhc_prose_mc" in printed and "acc_norm" in printed
