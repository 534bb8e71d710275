"""Batched scoring (mhc_jax.scoring) against unbatched float64 references, and the built-in multiple-choice
scorer's formats and metrics (mhc_jax.multiple_choice)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.config import load_config
from mhc_jax.data.tokenizer import ByteTokenizer
from mhc_jax.engram.ids import EngramIds
from mhc_jax.model import Transformer
from mhc_jax.multiple_choice import Question, main, read_questions, score_questions
from mhc_jax.scoring import Scorer
from mhc_jax.sharding import make_mesh

from conftest import stdlib_prose


@pytest.fixture(scope="module")
def scorer():
    cfg = load_config("tiny", ["residual.kind=mhc", "residual.n_streams=2", "engram.enabled=true",
                               "engram.layers=[1]", "engram.table_size=509", "engram.heads_per_ngram=2",
                               "model.init_std=0.1"])
    with jax.set_mesh(make_mesh(cfg.mesh)):
        model = Transformer(cfg, rngs=nnx.Rngs(5))
    return Scorer(model, ByteTokenizer(), batch_size=8)


@nnx.jit
def _forward(model, tokens_BT, engram_ids_BTEG):
    return model(tokens_BT, **({} if engram_ids_BTEG is None else {"engram_ids_BTEG": engram_ids_BTEG}))


def reference(scorer: Scorer, ids: list[int], pad: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(log p(ids[t] | ids[:t]), argmax of the logits at t - 1) for t >= 1 from one single-row forward pass
    (one document, none of the scorer's batching, bucketing or segment ids), float64 log-softmax. The row is
    right-padded to max_seq_len so that one compiled program serves every length: the model is causal, so
    the padding cannot change the logits before it (checked against an unpadded pass below)."""
    n = len(ids) - 1
    tokens = np.asarray([ids[:-1]], np.int32)
    if pad:
        tokens = np.pad(tokens, ((0, 0), (0, scorer.max_len - n)), constant_values=scorer.tokenizer.pad_id)
    engram = None
    if scorer.engram_ids is not None:
        engram = jnp.asarray(EngramIds(scorer.cfg.engram, scorer.tokenizer)(tokens))
    logits = np.asarray(_forward(scorer.model, jnp.asarray(tokens), engram), np.float64)[0, :n]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return logp[np.arange(n), ids[1:]], logits.argmax(-1)


def test_padded_reference_equals_the_unpadded_pass(scorer):
    tok = scorer.tokenizer
    ids = [tok.bos_id] + tok.encode(stdlib_prose(200)[:37])
    (logp_pad, argmax_pad), (logp, argmax) = reference(scorer, ids), reference(scorer, ids, pad=False)
    np.testing.assert_allclose(logp_pad, logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(argmax_pad, argmax)


def reference_logprobs(scorer: Scorer, ids: list[int]) -> np.ndarray:
    return reference(scorer, ids)[0]


def test_batched_loglikelihood_matches_single_requests(scorer):
    tok = scorer.tokenizer
    text = stdlib_prose(2000)
    requests = [(text[i:i + 11 * (i % 5 + 1)], text[i + 60:i + 60 + (i % 7) + 1]) for i in range(0, 400, 37)]
    got = scorer.loglikelihood(requests)
    assert len(got) == len(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        cont_ids = tok.encode(cont)
        logp, argmax = reference(scorer, [tok.bos_id] + tok.encode(ctx) + cont_ids)
        np.testing.assert_allclose(ll, logp[-len(cont_ids):].sum(), rtol=2e-5, atol=2e-4)
        assert greedy == bool(np.all(argmax[-len(cont_ids):] == cont_ids))


def test_greedy_flag_is_true_for_the_models_own_argmax_continuation(scorer):
    """Continuations built from the reference argmax (2 ASCII tokens, so text and tokens agree) are greedy."""
    tok = scorer.tokenizer
    found = 0
    for i in range(0, 600, 30):
        ctx = stdlib_prose(1000)[i:i + 20]
        ids = [tok.bos_id] + tok.encode(ctx)
        for _ in range(2):
            ids.append(int(reference(scorer, ids + [0])[1][-1]))
        cont = ids[-2:]
        if all(32 <= t < 127 for t in cont):
            (_, greedy), = scorer.loglikelihood([(ctx, bytes(cont).decode())])
            assert greedy
            found += 1
            if found == 3:
                break
    assert found >= 1


def test_rolling_loglikelihood_covers_every_token_once(scorer):
    tok = scorer.tokenizer
    short, long = stdlib_prose(40), stdlib_prose(3 * scorer.max_len + 17)
    got = scorer.loglikelihood_rolling([short, long])
    ids = [tok.bos_id] + tok.encode(short)
    np.testing.assert_allclose(got[0], reference_logprobs(scorer, ids).sum(), rtol=2e-5, atol=2e-4)
    # Long text: disjoint windows of max_len predicted tokens ending at the end, each seeing only itself and
    # the one token before it.
    ids = [tok.bos_id] + tok.encode(long)
    total, end = 0.0, len(ids)
    while end > 1:
        begin, start = max(1, end - scorer.max_len), max(0, end - scorer.max_len - 1)
        total += reference_logprobs(scorer, ids[start:end])[-(end - begin):].sum()
        end = begin
    np.testing.assert_allclose(got[1], total, rtol=2e-5, atol=1e-3)


def test_generate_until_stops_at_the_first_stop_string(scorer):
    full = scorer.generate_until([("def f(x):", {"until": [], "max_gen_toks": 12})])[0]
    assert full
    stop = full[3:5] if len(full) >= 5 else full[-1]
    cut = scorer.generate_until([("def f(x):", {"until": [stop], "max_gen_toks": 12})])[0]
    assert cut == full[:full.find(stop)]


def test_continuation_longer_than_the_model_context_is_rejected(scorer):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        scorer.loglikelihood([("a", "b" * 100)])


# ---------------------------------------------------------------------------------------------------
# The multiple-choice scorer
# ---------------------------------------------------------------------------------------------------

ROWS = {
    "hellaswag": {"ctx": "A man is", "endings": ["running.", "a dog", "x", "yy"], "label": 2, "activity_label": "z"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0},
    "arc": {"question": "Which is a gas?", "choices": {"text": ["rock", "air", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "B"},
    "arc_original": {"question": {"stem": "2+2?", "choices": [{"text": "3", "label": "1"}, {"text": "4", "label": "2"}]},
                     "answerKey": "2"},
    "generic": {"context": "x =", "choices": [" 1", " 2"], "gold": 1},
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_supported_shape_parses_with_lm_eval_prompts(tmp_path):
    got = {name: read_questions(write_jsonl(tmp_path / f"{name}.jsonl", [row]))[0] for name, row in ROWS.items()}
    assert got["hellaswag"] == Question("A man is", ("running.", "a dog", "x", "yy"), 2)
    assert got["piqa"] == Question("Question: Open a jar\nAnswer:", ("twist the lid", "eat it"), 0)
    assert got["arc"] == Question("Question: Which is a gas?\nAnswer:", ("rock", "air", "ice"), 1)
    assert got["arc_original"] == Question("Question: 2+2?\nAnswer:", ("3", "4"), 1)
    assert got["generic"] == Question("x =", (" 1", " 2"), 1)


class FixedScorer:
    """Log-likelihoods given per choice text: acc and acc_norm then follow by hand."""

    def __init__(self, table):
        self.table = table

    def loglikelihood(self, requests):
        return [(self.table[cont.strip()], False) for _, cont in requests]


def test_acc_and_length_normalised_acc_follow_their_definitions():
    qs = [Question("c", ("a", "bbbbbbb"), 1), Question("c", ("a", "bbbbbbb"), 0), Question("c", ("cc", "d"), 0)]
    # per character: "a" -2 / 1, "bbbbbbb" -4 / 7 = -0.57; "cc" -3 / 2 = -1.5, "d" -2.5 / 1
    out = score_questions(FixedScorer({"a": -2.0, "bbbbbbb": -4.0, "cc": -3.0, "d": -2.5}), qs)
    # acc picks a, a, d -> correct on q2 only; acc_norm picks bbbbbbb, bbbbbbb, cc -> q1 and q3.
    assert out["n"] == 3
    assert out["acc"] == pytest.approx(1 / 3) and out["acc_norm"] == pytest.approx(2 / 3)
    assert out["acc_stderr"] == pytest.approx(np.sqrt((1 / 3) * (2 / 3) / 2))


def test_scorer_command_on_an_exported_model(tmp_path, scorer, capsys):
    from mhc_jax.export import export_model

    out_dir = export_model(scorer.cfg, scorer.model, str(tmp_path / "export"))
    data = write_jsonl(tmp_path / "q.jsonl", [ROWS["hellaswag"], ROWS["hellaswag"] | {"label": 0}])
    assert main(["--export", out_dir, "--data", data, "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    lls = [ll for ll, _ in scorer.loglikelihood([("A man is", " " + e) for e in ROWS["hellaswag"]["endings"]])]
    best = int(np.argmax(lls))
    assert result["n"] == 2 and result["acc"] == pytest.approx(((best == 2) + (best == 0)) / 2)
    assert "acc_norm" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["b"], "label": 0}', r"q\.jsonl:1: needs >= 2 choices"),
    ('{"foo": 1}', r"cannot tell the format of a row with keys \['foo'\]"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 5}', r"gold 5"),
    ("not json", r"q\.jsonl:1: not a"),
])
def test_bad_rows_are_errors_naming_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_questions(str(path))
