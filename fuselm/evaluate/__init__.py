"""Stage 6, eval: bits per byte per domain for every model of a run, on the held-out blocks.

Why bits per byte: models with different tokenizers cannot be compared by per-token
perplexity (a finer tokenizer makes more, easier predictions). The negative
log-likelihood of a text divided by its UTF-8 length is tokenizer-independent, so sources,
the untouched target, the CLM-only control and the fused target land on one scale.

Reading top to bottom:

- ``score_blocks`` (one model over blocks) reuses the capture stage's model runner, so a
  model is scored with exactly the batching, BOS policy and padded-vocabulary handling it
  was captured with; ``capture_scores`` reads the same figures from an existing capture
  without running the model again (sources and the untouched target were already run over
  the held-out blocks by the capture stage).
- ``aggregate`` sums NLL and bytes per domain; ``run_eval`` writes ``eval/results.json``,
  ``eval/results.csv`` and the manifest.

What counts as "bytes": the text the model predicted. Position t predicts token t+1, so
the first token of a block is predicted only when a BOS precedes it; without BOS the
bytes of the first token are left out of both numerator and denominator. The difference
between tokenizers is one token per block, and it is the same for every model that shares
a tokenizer.

Two modules: :mod:`~fuselm.evaluate.scoring` (the measurement) and
:mod:`~fuselm.evaluate.stage` (the stage and its results files); the stage's entry points
(``run_eval``, ``eval_components``, ``variant_stage``) are re-exported here.
"""

from fuselm.evaluate.stage import eval_components, run_eval, variant_stage

__all__ = ["eval_components", "run_eval", "variant_stage"]
