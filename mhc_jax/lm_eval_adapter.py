"""EleutherAI lm-evaluation-harness model type `mhc_jax` (install with `pip install -e ".[eval]"`).

    python -m mhc_jax.lm_eval_adapter --model mhc_jax --model_args workdir=W --tasks hellaswag,arc_easy
    python -m mhc_jax.lm_eval_adapter --model mhc_jax --model_args export=DIR --batch_size 16 --tasks wikitext

(the same arguments as `lm_eval`; this entry point registers the model type first). From Python:

    import lm_eval
    from mhc_jax.lm_eval_adapter import MhcJaxLM
    lm_eval.simple_evaluate(model=MhcJaxLM(workdir="W"), tasks=["hellaswag"])

`loglikelihood`, `loglikelihood_rolling` and `generate_until` run through mhc_jax.scoring.Scorer: batched,
length-bucketed, with each request's Engram ids hashed on the host from its own tokens.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from mhc_jax.scoring import Scorer, load_scorer


@register_model("mhc_jax")
class MhcJaxLM(LM):
    """model_args: `workdir=W` (a train.py workdir, newest checkpoint) or `export=DIR` (an mhc_jax.export
    folder). Rows per forward pass: lm-eval's `--batch_size N` (default 8 from Python; "auto" means 8)."""

    def __init__(self, workdir: str = "", export: str = "", batch_size: int | str = 8, scorer: Scorer | None = None,
                 **_ignored: Any):  # lm-eval also passes device / max_batch_size, which do not apply
        super().__init__()
        if isinstance(batch_size, str):
            batch_size = 8 if batch_size.startswith("auto") else int(batch_size)
        self.scorer = scorer or load_scorer(workdir, export, batch_size)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return self.scorer.generate_until([(r.args[0], dict(r.args[1])) for r in requests])


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
