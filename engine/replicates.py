"""The sweep's sentence bootstrap (--bootstrap=B): every planned pair re-scored from the stored
activations on B resamples of the sentences, bases recomputed per replicate, and the findings'
intervals over sentences (engine.findings.sentence_bootstrap) for summary.json.

It reads the finished table and the store; it writes nothing, so a resumed sweep can run it
with another B or seed. It runs in one process, which must hold every representation.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from engine import findings, pairs, uncertainty
from engine.settings import Settings, SweepError


@dataclasses.dataclass
class SentenceBootstrap:
  records: list[dict]  # engine.findings.sentence_bootstrap's, for report(..., sentence=)
  replicates: int
  seconds: float  # the replicates' wall time, re-scoring and findings

  @property
  def seconds_per_replicate(self) -> float:
    return self.seconds / self.replicates

  def describe(self) -> str:
    return (f"sentence bootstrap: {self.replicates} replicates in {self.seconds:.1f} s "
            f"({self.seconds_per_replicate:.2f} s per replicate)")


def run(s: Settings, table: pd.DataFrame, plan: list, where: dict, n: int, *, mesh=None,
        log: Callable[[str], None] = print) -> SentenceBootstrap:
  """The sentence intervals of every finding of `table` (the plan's scores) over s.report's
  replicates; where: {key: store} holding every representation of the plan."""
  sc, r = s.scoring, s.report
  missing = [k for k in pairs.plan_keys(plan) if k not in where]
  if missing:
    raise SweepError(f"--bootstrap needs every representation in this process's stores; "
                     f"{len(missing)} are not (e.g. {missing[0].name})")
  rescore = uncertainty.plan_rescorer(lambda k: where[k].load(k), plan, metric=sc.metric,
                                      threshold=sc.threshold, dims=sc.svd_dims, dtype=sc.dtype,
                                      mesh=mesh)
  log(f"sentence bootstrap: {r.bootstrap} replicates of {n} sentences (seed {r.bootstrap_seed}), "
      f"{len(plan)} pairs re-scored in each")
  bar = tqdm(total=r.bootstrap, unit="replicate", desc="bootstrap", dynamic_ncols=True,
             disable=not s.run.progress)

  def counted(rows):
    scores = rescore(rows)
    bar.update(1)
    return scores

  start = time.perf_counter()
  try:
    records = findings.sentence_bootstrap(table, counted, replicates=r.bootstrap,
                                          seed=r.bootstrap_seed, n=n)
  except ValueError as e:
    raise SweepError(f"--bootstrap={r.bootstrap}: {e}") from None
  finally:
    bar.close()
  return SentenceBootstrap(records, r.bootstrap, time.perf_counter() - start)
