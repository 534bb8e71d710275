"""Writes the notebooks in this folder from the cell sources below (outputs stripped).

    python notebooks/_build.py

Cells are separated by lines `# %% [markdown]` / `# %%` in each notebook's source string.
"""

from __future__ import annotations

import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_URL = "https://github.com/mhc-jax/mhc-jax"  # change to your fork to open your own copy in Colab

SETUP = f'''# %%
# Colab: clone and install the library (nothing happens when run elsewhere, e.g. in CI).
import os
import sys

if "google.colab" in sys.modules and not os.path.isdir("mhc-jax"):
    import subprocess
    subprocess.run(["git", "clone", "-q", "{REPO_URL}.git", "mhc-jax"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "mhc-jax"], check=True)
if "google.colab" in sys.modules:
    sys.path.insert(0, os.path.abspath("mhc-jax"))  # the editable install's .pth needs a restart otherwise

# MHC_JAX_SMOKE=1 (set by the tests) shrinks every run so the notebook executes in about a minute on a CPU.
SMOKE = os.environ.get("MHC_JAX_SMOKE") == "1"
print("smoke settings" if SMOKE else "full settings")
'''


def cells(source: str) -> list:
    out = []
    for chunk in source.split("\n# %%")[1:]:
        kind, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if kind.strip() == "[markdown]":
            text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())
            out.append(nbformat.v4.new_markdown_cell(text))
        else:
            out.append(nbformat.v4.new_code_cell(body))
    return out


def write(name: str, source: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"},
                   "accelerator": "GPU", "colab": {"provenance": []}}
    nb.cells = cells(source)
    for i, c in enumerate(nb.cells):
        c.id = f"{name[:2]}-{i:02d}"  # stable ids: rebuilding gives the same file
    nbformat.validate(nb)
    with open(os.path.join(HERE, name), "w", encoding="utf-8") as f:
        nbformat.write(nb, f)


QUICKSTART = '''
# %% [markdown]
# # mhc-jax quickstart
#
# Train a small decoder-only language model on the embedded default corpus (the Python standard library's
# source, byte tokenizer), plot its loss, generate text, and reload it from its checkpoint.
''' + SETUP + '''
# %%
import tempfile

import matplotlib.pyplot as plt

from mhc_jax.config import load_config
from mhc_jax.data.tokenizer import load_tokenizer
from mhc_jax.generate import generate_text
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.state import load_model_from_workdir

# configs/tiny.yaml is a seconds-long model; the full settings train a larger one for longer.
overrides = (["training.steps=30", "training.eval_every=15", "checkpoint.every=30"] if SMOKE else
             ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
              "model.d_ff=512", "model.max_seq_len=256", "data.seq_len=128", "data.batch_size=16",
              "training.steps=600", "training.eval_every=200", "training.log_every=10",
              "optimizer.lr=3e-3", "optimizer.warmup_steps=50", "checkpoint.every=200"])
cfg = load_config("tiny", overrides + ["residual.kind=mhc", "training.sample_tokens=32"])
workdir = tempfile.mkdtemp(prefix="mhc_quickstart_")
print(f"model d={cfg.model.d_model} layers={cfg.model.n_layers} residual={cfg.residual.kind} "
      f"(n={cfg.n_streams} streams); {cfg.training.steps} steps into {workdir}")

# %%
result = run(cfg, workdir, progress=not SMOKE)
print(result.status, "at step", result.step, "| final train loss", round(result.train_loss, 4))
print("eval:", {k: round(v, 4) for k, v in result.eval.items()})
print("sample:", repr(result.sample))

# %% [markdown]
# ## Loss curve
# Every run appends its metrics to `workdir/metrics.jsonl` (and TensorBoard).

# %%
train = read_metrics(workdir, "train")
evals = read_metrics(workdir, "eval")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
axes[0].set(xlabel="step", ylabel="cross-entropy (nats / byte)", title="loss")
axes[0].legend()
axes[1].plot([r["step"] for r in train], [r["grad_norm"] for r in train])
axes[1].set(xlabel="step", ylabel="global gradient norm", title="gradient norm")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Generate, reload, generate again
# `run` ends by sampling `training.sample_tokens` tokens (temperature 0.8, top-k 40, seed
# `training.seed`) from the trained model in memory. Reloading the newest checkpoint and sampling with the
# same settings must give the same text; greedy decoding of the reloaded model is shown too.

# %%
reloaded_cfg, model, step = load_model_from_workdir(workdir)
tokenizer = load_tokenizer(reloaded_cfg.data.tokenizer)
prompt = cfg.training.sample_prompt
budget = cfg.model.max_seq_len - 2 - len(tokenizer.encode(prompt))
n_new = max(0, min(cfg.training.sample_tokens, budget))
again = prompt + generate_text(model, tokenizer, prompt, n_new, temperature=0.8, top_k=40, seed=cfg.training.seed)
print(f"checkpoint step {step}")
print("before reload:", repr(result.sample))
print("after reload: ", repr(again))
assert step == result.step, (step, result.step)
assert again == result.sample, "the reloaded model does not reproduce the trained model's sample"

# %%
greedy = generate_text(model, tokenizer, "def main(", 48, temperature=0.0)
greedy_again = generate_text(model, tokenizer, "def main(", 48, temperature=0.0)
assert greedy == greedy_again  # greedy decoding is deterministic
print("def main(" + greedy)
'''


STABILITY = '''
# %% [markdown]
# # mHC stability: Sinkhorn projection, and residual vs. HC vs. mHC
#
# mHC (DeepSeek, "Manifold-Constrained Hyper-Connections") projects each layer's stream-mixing matrix
# H_res onto the doubly stochastic matrices with Sinkhorn-Knopp (paper Eq. 9, 20 iterations). Products of
# doubly stochastic matrices stay doubly stochastic, so the composite map across all layers cannot amplify
# signals (forward gain, max row sum) or gradients (backward gain, max column sum), while unconstrained
# Hyper-Connections (HC) can (paper Fig. 3: composite gains up to ~3000).
''' + SETUP + '''
# %%
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image, display

from mhc_jax.config import load_config
from mhc_jax.diagnostics import amax_gains, collect_h_res, composite_matrices, plot_gains, plot_h_res_heatmaps
from mhc_jax.sinkhorn import sinkhorn_knopp
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.state import load_model_from_workdir

# %% [markdown]
# ## Sinkhorn-Knopp convergence
# Each iteration normalises the columns, then the rows, so the rows sum to 1 after every iteration (up to
# float32 rounding) and the remaining error sits on the columns. Larger logits (a peakier exp) converge
# more slowly.

# %%
n, max_iters = 4, 30
logits = jax.random.normal(jax.random.key(0), (256, n, n))
iters = np.arange(1, max_iters + 1)
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for scale, color in ((1.0, "C0"), (4.0, "C1")):
    row_err, col_err = [], []
    for t in iters:
        m = np.asarray(sinkhorn_knopp(scale * logits, num_iters=int(t)), np.float64)
        row_err.append(np.abs(m.sum(-1) - 1).max())
        col_err.append(np.abs(m.sum(-2) - 1).max())
    ax.semilogy(iters, np.maximum(col_err, 1e-9), color=color, label=f"column error, logits x{scale:g}")
    ax.semilogy(iters, np.maximum(row_err, 1e-9), color=color, ls="--", label=f"row error, logits x{scale:g}")
    print(f"logits x{scale:g}: after 20 iterations max |col sum - 1| = {col_err[19]:.2e}, "
          f"max |row sum - 1| = {row_err[19]:.2e}")
ax.axvline(20, color="grey", lw=0.8)
ax.set(xlabel="Sinkhorn iterations t", ylabel="max error over 256 random matrices",
       title=f"Sinkhorn-Knopp on {n}x{n} matrices (mHC paper: t_max = 20)")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Plain residual vs. HC vs. mHC, trained side by side
# The same model, data and steps; only `residual.kind` changes. A deliberately high learning rate makes the
# difference in stability easier to see.

# %%
overrides = (["training.steps=30", "training.eval_every=30", "training.diagnostics_every=10",
              "checkpoint.every=30", "training.log_every=5"] if SMOKE else
             ["model.d_model=64", "model.n_layers=6", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=256",
              "model.max_seq_len=128", "data.seq_len=128", "data.batch_size=16", "training.steps=600",
              "training.eval_every=300", "training.diagnostics_every=50", "checkpoint.every=600",
              "training.log_every=10"])
common = overrides + ["residual.n_streams=4", "optimizer.lr=2e-2", "optimizer.schedule=constant",
                      "training.sample_tokens=0"]
kinds = ["plain", "hc", "mhc"]
workdirs = {}
for kind in kinds:
    cfg = load_config("tiny", common + [f"residual.kind={kind}"])
    workdirs[kind] = tempfile.mkdtemp(prefix=f"mhc_stability_{kind}_")
    res = run(cfg, workdirs[kind], progress=False)
    print(f"{kind:5s}: final train loss {res.train_loss:.4f}, eval loss {res.eval['loss']:.4f}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
for kind in kinds:
    train = read_metrics(workdirs[kind], "train")
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label=kind)
    axes[1].plot(steps, [r["grad_norm"] for r in train], label=kind)
    diag = read_metrics(workdirs[kind], "diagnostics")
    if diag:  # the plain residual has no mixing matrices (all gains are 1)
        axes[2].plot([r["step"] for r in diag], [r["composite_fwd_max"] for r in diag], "o-", label=f"{kind} forward")
        axes[2].plot([r["step"] for r in diag], [r["composite_bwd_max"] for r in diag], "s--", label=f"{kind} backward")
axes[0].set(xlabel="step", ylabel="training loss", title="loss")
axes[1].set(xlabel="step", ylabel="gradient norm", title="gradient norm", yscale="log")
axes[2].set(xlabel="step", ylabel="max over l", title="composite Amax gain during training", yscale="log")
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Amax gains of the trained models (paper Fig. 3)
# Per sublayer l (attention and MLP counted separately): the gain of H_l alone, and of the composite
# H_{L-1} ... H_l from sublayer l to the output, measured on a real forward pass.

# %%
models, h_res = {}, {}
sample_tokens = None
for kind in kinds:
    cfg_k, models[kind], _ = load_model_from_workdir(workdirs[kind])
    if sample_tokens is None:
        from mhc_jax.data import make_train_iterator
        sample_tokens = jnp.asarray(np.asarray(next(make_train_iterator(cfg_k))["inputs"])[:2])
    if kind != "plain":
        h_res[kind] = np.asarray(collect_h_res(models[kind], sample_tokens))
gains = {kind: amax_gains(h) for kind, h in h_res.items()}
for kind, g in gains.items():
    print(f"{kind:4s}: max single-layer forward gain {g['per_layer_fwd'].max():.3f}, "
          f"composite forward {g['composite_fwd'].max():.3f}, composite backward {g['composite_bwd'].max():.3f}")
assert gains["mhc"]["per_layer_bwd"].max() < 1.5  # Sinkhorn: column sums ~1 (paper Fig. 3: <= ~1.6)
display(Image(plot_gains(gains, os.path.join(tempfile.mkdtemp(), "gains.png"), title="trained models")))

# %% [markdown]
# ## The H_res matrices themselves (paper Figs. 7-8)
# One token's mixing matrix at the first, a middle and the last sublayer, and the composite over the whole
# network. HC's entries are unconstrained; mHC's rows and columns sum to 1.

# %%
for kind, h in h_res.items():
    L = h.shape[0]
    picks = [0, L // 2, L - 1]
    mats = [h[l, 0, 0] for l in picks] + [composite_matrices(h[:, 0, :1])[0, 0]]
    titles = [f"{kind} H_res l={l}" for l in picks] + [f"{kind} composite (all {L})"]
    display(Image(plot_h_res_heatmaps(np.stack(mats), os.path.join(tempfile.mkdtemp(), f"{kind}.png"), titles)))
'''


ENGRAM = '''
# %% [markdown]
# # Engram: hashed n-gram conditional memory
#
# Engram (DeepSeek, "Conditional Memory via Scalable Lookup") adds to chosen blocks a table lookup keyed by
# hashes of the last 2..N tokens (after a tokenizer compression that merges tokens equal up to case and
# whitespace normalisation), gated per residual stream by the current hidden state.
''' + SETUP + '''
# %%
import html
import inspect
import json
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import HTML, display

import mhc_jax
from mhc_jax.config import load_config
from mhc_jax.data.tokenizer import ByteTokenizer, load_tokenizer, train_sentencepiece
from mhc_jax.engram import EngramIds, compress_tokenizer
from mhc_jax.residual import expand
from mhc_jax.train.loop import run
from mhc_jax.train.metrics import read_metrics
from mhc_jax.train.state import load_model_from_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mhc_jax.__file__)))
# A small real text that exists everywhere: the source of a few standard-library modules.
import argparse, json.decoder, textwrap as _tw
corpus = "\\n".join(inspect.getsource(m) for m in (argparse, json.decoder, _tw))
print(f"corpus: {len(corpus):,} characters")

# %% [markdown]
# ## Tokenizer compression
# The paper reports a 23% smaller vocabulary for its 128k tokenizer. The byte tokenizer merges upper and
# lower case ASCII letters; a SentencePiece model additionally merges pieces like "The" / " the".

# %%
rows = []
byte_vocab = compress_tokenizer(ByteTokenizer())
rows.append(("byte", byte_vocab.raw_size, byte_vocab.size, byte_vocab.reduction))
sp_path = os.path.join(tempfile.mkdtemp(), "sp.model")
sp = train_sentencepiece(corpus.split("\\n\\n"), 600 if SMOKE else 2000, sp_path)
sp_vocab = compress_tokenizer(sp)
rows.append((f"SentencePiece BPE ({sp.vocab_size})", sp_vocab.raw_size, sp_vocab.size, sp_vocab.reduction))
print(f"{'tokenizer':28s} {'V':>6s} {'V_compressed':>12s} {'reduction':>9s}")
for name, v, vc, red in rows:
    print(f"{name:28s} {v:6d} {vc:12d} {100 * red:8.1f}%")
assert byte_vocab.size < byte_vocab.raw_size

# %% [markdown]
# ## Hash collisions
# Each n-gram order has K hash heads, each into its own prime-sized table, so two n-grams are confused only
# when they collide in every head at once. (`collision_rates` is the benchmark's code,
# benchmarks/engram_overhead.py.)

# %%
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from engram_overhead import collision_rates

layers = 2 if SMOKE else 4
ecfg = load_config("tiny", [f"model.n_layers={layers}", "engram.enabled=true", "engram.layers=[1]",
                            "engram.heads_per_ngram=4", "engram.head_dim=16", "engram.table_size=1297"])
tokens = np.asarray(ByteTokenizer().encode(corpus), np.int32)
print(f"{'layer':>5} {'order':>5} {'n-grams':>8} {'slots/head':>10} {'grams/slot':>10} "
      f"{'share 1 head':>12} {'share all':>9} {'confused':>8}")
for c in collision_rates(ecfg, tokens):
    print(f"{c['layer']:>5} {c['order']:>5} {c['distinct_ngrams']:>8} {c['slots_per_head']:>10} "
          f"{c['ngrams_per_slot']:>10.3f} {c['frac_sharing_a_slot_in_one_head']:>12.3f} "
          f"{c['frac_sharing_in_every_head']:>9.4f} {c['frac_indistinguishable']:>8.4f}")

# %% [markdown]
# ## The same model with and without Engram

# %%
size = (["training.steps=30", "training.eval_every=30", "checkpoint.every=30"] if SMOKE else
        ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", "model.d_ff=512",
         "model.max_seq_len=256", "data.seq_len=128", "data.batch_size=16", "training.steps=800",
         "training.eval_every=200", "checkpoint.every=800"])
engram_keys = ["engram.layers=[1]", "engram.heads_per_ngram=4", "engram.head_dim=16", "engram.table_size=1297"]
workdirs, results = {}, {}
for name, extra in (("baseline", ["engram.enabled=false"]), ("engram", ["engram.enabled=true"] + engram_keys)):
    cfg = load_config("tiny", size + extra + ["training.sample_tokens=0", "training.log_every=5"])
    workdirs[name] = tempfile.mkdtemp(prefix=f"engram_{name}_")
    results[name] = run(cfg, workdirs[name], progress=False)
print(f"{'model':10s} {'train loss':>10s} {'eval loss':>9s} {'bits/byte':>9s}")
for name, r in results.items():
    print(f"{name:10s} {r.train_loss:10.4f} {r.eval['loss']:9.4f} {r.eval['bits_per_byte']:9.4f}")
fig, ax = plt.subplots(figsize=(6.5, 3.5))
for name in workdirs:
    train = read_metrics(workdirs[name], "train")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
ax.set(xlabel="step", ylabel="training loss")
ax.legend()
plt.show()

# %% [markdown]
# ## Which tokens open the gate?
# The gate g_t = sigmoid(signed-sqrt(<RMSNorm(h_t), RMSNorm(W_K e_t)> / sqrt(d))) decides how much of the
# retrieved memory is added at position t. Below, each character of a text is shaded by the trained
# model's gate (mean over streams) at its Engram layer; the paper shows it opening on multi-token names and
# fixed phrases.

# %%
cfg_e, model_e, _ = load_model_from_workdir(workdirs["engram"])
tok = load_tokenizer(cfg_e.data.tokenizer)
text = textwrap.dedent(\'\'\'
    def parse_args(argv=None):
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--verbose", action="store_true")
        return parser.parse_args(argv)
\'\'\').strip()[: cfg_e.model.max_seq_len - 1]
ids_T = np.asarray([tok.bos_id] + tok.encode(text), np.int32)[: cfg_e.model.max_seq_len]
engram_ids = EngramIds(cfg_e, tok)(ids_T[None])  # (1, T, layers, k)
layer = cfg_e.engram.layers[0]


@nnx.jit
def gate_at_layer(model, tokens_BT, ids_BTG):
    """The gate of the Engram module in block `layer`, on the streams that enter that block."""
    B, T = tokens_BT.shape
    positions, segments = jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.ones((B, T), jnp.int32)
    x = expand(jnp.take(model.embed_VC[...], tokens_BT, axis=0).astype(model.dtype), model.n_streams)
    for block in list(model.blocks)[:layer]:
        x, _ = block(x, positions, segments, None, None)
    engram = model.blocks[layer].engram
    return engram.gate(x, engram.lookup(ids_BTG).astype(x.dtype))


gate = np.asarray(gate_at_layer(model_e, jnp.asarray(ids_T[None]), jnp.asarray(engram_ids[:, :, 0])))
g = gate[0].mean(-1)[1:]  # drop BOS; one value per byte
lo, hi = float(g.min()), float(g.max())
spans = []
for byte_id, value in zip(ids_T[1:], g):
    ch = tok.token_bytes(int(byte_id)).decode("utf-8", errors="replace")
    alpha = (value - lo) / max(hi - lo, 1e-6)
    shown = "<br>" if ch == "\\n" else html.escape(ch).replace(" ", "&nbsp;")
    spans.append(f\'<span style="background: rgba(255, 80, 0, {alpha:.2f})" title="{value:.3f}">{shown}</span>\')
display(HTML(f\'<div style="font-family: monospace; line-height: 1.6">{"".join(spans)}</div>\'
             f"<p>gate from {lo:.3f} (white) to {hi:.3f} (orange)</p>"))
assert gate.shape == (1, len(ids_T), cfg_e.n_streams) and np.all((gate > 0) & (gate < 1))

# %% [markdown]
# ## Table placement: device memory vs. host memory
# With `engram.placement=host` the table lives in pinned host memory and only the looked-up rows travel to
# the accelerator. Loading the same checkpoint both ways gives the same logits.

# %%
forward = nnx.jit(lambda model, t, i: model(t, engram_ids_BTEG=i))
_, model_dev, _ = load_model_from_workdir(workdirs["engram"])
_, model_host, _ = load_model_from_workdir(workdirs["engram"], ["engram.placement=host"])
table = model_host.blocks[layer].engram.table[...]
print("host table memory kind:", table.sharding.memory_kind)
logits_dev = forward(model_dev, jnp.asarray(ids_T[None]), jnp.asarray(engram_ids))
logits_host = forward(model_host, jnp.asarray(ids_T[None]), jnp.asarray(engram_ids))
print("max |logits_host - logits_device| =", float(jnp.abs(logits_host - logits_dev).max()))
np.testing.assert_allclose(np.asarray(logits_host), np.asarray(logits_dev), rtol=1e-5, atol=1e-5)
'''


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_mhc_stability.ipynb", STABILITY)
    write("03_engram.ipynb", ENGRAM)
    print("wrote", ", ".join(sorted(f for f in os.listdir(HERE) if f.endswith(".ipynb"))))
