"""Shadow scoring: the candidate alias (e.g. ``staging``) scores live traffic beside production.

The production answer is computed and returned as always; its backbone features (or, for a candidate
with another backbone, its images) go into a bounded queue that a background thread drains: only the
candidate's head runs again on the same features. A full queue drops the sample, so the shadow never
delays or changes a production answer. Comparisons are logged in batches to one MLflow run per
(production version, candidate version) pair, in the category's experiment, tagged with both versions
(and the candidate version is tagged with the run id): rows scored, flag rate of each, disagreements
(with both scores, in ``shadow/disagreements.json``), Pearson correlation of the scores.
``latest_summary`` returns the newest such run for ``adreg promote`` to print.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time

import mlflow

from adreg import store
from adreg.names import category_of, fit_experiment_name

_log = logging.getLogger("adreg.shadow")
KIND_TAG = "adreg.kind"
CANDIDATE_TAG = "adreg.shadow.candidate_version"
PRODUCTION_TAG = "adreg.shadow.production_version"
MAX_DISAGREEMENTS = 200


class _Pair:
    """Running comparison of one production version against one candidate version."""

    def __init__(self, prod, cand):
        self.prod, self.cand = prod, cand
        self.run_id: str | None = None
        self.n = 0
        self.flags_p = self.flags_c = 0
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0.0
        self.disagreements: list[dict] = []
        self.n_disagree = 0
        self.step = 0
        self.dirty = False

    def add(self, sp: float, sc: float) -> None:
        tp, tc = float(self.prod.detector.threshold.value), float(self.cand.detector.threshold.value)
        fp, fc = sp > tp, sc > tc
        self.n += 1
        self.flags_p += fp
        self.flags_c += fc
        self.sx += sp
        self.sy += sc
        self.sxx += sp * sp
        self.syy += sc * sc
        self.sxy += sp * sc
        if fp != fc:
            self.n_disagree += 1
            self.disagreements.append({"production_score": sp, "production_threshold": tp, "candidate_score": sc,
                                       "candidate_threshold": tc, "production_flags": fp, "candidate_flags": fc,
                                       "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            del self.disagreements[:-MAX_DISAGREEMENTS]
        self.dirty = True

    def correlation(self) -> float:
        n = self.n
        if n < 2:
            return float("nan")
        vx, vy = self.sxx - self.sx ** 2 / n, self.syy - self.sy ** 2 / n
        if vx <= 0 or vy <= 0:
            return float("nan")
        return (self.sxy - self.sx * self.sy / n) / math.sqrt(vx * vy)

    def metrics(self) -> dict:
        out = {"shadow_rows": self.n, "flag_rate_production": self.flags_p / max(self.n, 1),
               "flag_rate_candidate": self.flags_c / max(self.n, 1), "disagreements": self.n_disagree}
        corr = self.correlation()
        if math.isfinite(corr):
            out["score_correlation"] = corr
        return out


class Shadow:
    def __init__(self, cfg: dict, run, batch_rows: int = 32, flush_seconds: float = 10.0, queue_size: int = 32,
                 client=None):
        self.client = client  # the follower's client (its tracking URI); None: MLflow's current one
        self.run = run  # the inference thread (a candidate with its own backbone must not race production's)
        self.batch_rows = batch_rows
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.pair: _Pair | None = None
        self._pending = 0
        self._last_flush = time.monotonic()
        self.server_id = str(cfg.get("server_id") or "")
        threading.Thread(target=self._worker, name="adreg-shadow", daemon=True).start()

    def offer(self, prod, cand, feats, images, prod_scores) -> None:
        """Queue one scored batch for the candidate; never blocks, never raises."""
        try:
            self._queue.put_nowait((prod, cand, feats, images, [float(s) for s in prod_scores]))
        except queue.Full:
            self.dropped += 1
        except Exception:
            self.dropped += 1

    def _worker(self) -> None:
        import torch

        while True:
            try:
                item = self._queue.get(timeout=self.flush_seconds)
            except queue.Empty:
                item = None
            try:
                if item is not None:
                    prod, cand, feats, images, prod_scores = item
                    if cand.detector.backbone is prod.detector.backbone:
                        with torch.inference_mode():
                            cand_scores = cand.detector.predict_features(feats).scores
                    else:
                        cand_scores = self.run(cand.detector.predict, images).scores
                    self._add(prod, cand, prod_scores, [float(s) for s in cand_scores])
                if self.pair is not None and self.pair.dirty and (
                        self._pending >= self.batch_rows or time.monotonic() - self._last_flush >= self.flush_seconds):
                    self.flush()
            except Exception as exc:
                _log.warning("adreg: shadow scoring/logging failed: %s", exc)

    def _add(self, prod, cand, prod_scores, cand_scores) -> None:
        pair = self.pair
        if pair is None or pair.prod is not prod or pair.cand is not cand:
            if pair is not None:
                self.flush(end=True)
            pair = self.pair = _Pair(prod, cand)
        for sp, sc in zip(prod_scores, cand_scores):
            pair.add(sp, sc)
            self._pending += 1

    def flush(self, end: bool = False) -> None:
        """Log the current pair's running comparison (one metric step per flush)."""
        pair = self.pair
        if pair is None:
            return
        client = self.client or mlflow.MlflowClient()
        if pair.run_id is None:
            pair.run_id = _start_run(client, pair, self.server_id)
        now = int(time.time() * 1000)
        from mlflow.entities import Metric

        client.log_batch(pair.run_id, metrics=[Metric(k, float(v), now, pair.step) for k, v in pair.metrics().items()])
        client.log_text(pair.run_id, json.dumps(pair.disagreements, indent=1), "shadow/disagreements.json")
        pair.step += 1
        pair.dirty = False
        self._pending = 0
        self._last_flush = time.monotonic()
        if end:
            client.set_terminated(pair.run_id)


def _start_run(client, pair: _Pair, server_id: str) -> str:
    prod, cand = pair.prod, pair.cand
    run = client.create_run(
        store.experiment_id(prod.name, client=client), run_name=f"shadow-{cand.alias}-v{cand.version}-vs-v{prod.version}",
        tags={KIND_TAG: "shadow", "adreg.category": category_of(prod.name), "adreg.registered_model": prod.name,
              PRODUCTION_TAG: str(prod.version), CANDIDATE_TAG: str(cand.version),
              "adreg.shadow.production_alias": prod.alias, "adreg.shadow.candidate_alias": cand.alias,
              "adreg.shadow.server": server_id,
              "mlflow.note.content": f"Shadow comparison on live traffic: {prod.name} version {cand.version} "
                                     f"(@{cand.alias}) against version {prod.version} (@{prod.alias})."})
    client.log_param(run.info.run_id, "production_threshold", float(prod.detector.threshold.value))
    client.log_param(run.info.run_id, "candidate_threshold", float(cand.detector.threshold.value))
    for version, role in ((cand.version, "candidate"), (prod.version, "production")):
        try:
            client.set_model_version_tag(prod.name, str(version), f"adreg.shadow.{role}_run", run.info.run_id)
        except Exception as exc:  # a deleted version must not stop the comparison
            _log.warning("adreg: could not tag %s version %s: %s", prod.name, version, exc)
    return run.info.run_id


def latest_summary(category: str, version, client=None) -> dict | None:
    """The newest shadow comparison with ``version`` of ``adreg-<category>`` as candidate, or None:
    {run_id, production_version, candidate_version, shadow_rows, flag rates, disagreements, score_correlation}."""
    client = client or mlflow.MlflowClient()
    exp = client.get_experiment_by_name(fit_experiment_name(category))
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.`{KIND_TAG}` = 'shadow' and tags.`{CANDIDATE_TAG}` = '{version}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    return {"run_id": run.info.run_id, "production_version": run.data.tags.get(PRODUCTION_TAG),
            "candidate_version": str(version), **run.data.metrics}


def describe_latest(category: str, version) -> str | None:
    """Lines for ``adreg promote``: the newest shadow comparison of ``version`` on live traffic."""
    try:
        s = latest_summary(category, version)
    except Exception:
        return None
    if not s or not s.get("shadow_rows"):
        return None
    corr = s.get("score_correlation")
    return (f"shadow on live traffic (run {s['run_id']}): {int(s['shadow_rows'])} images scored by version "
            f"{version} beside production version {s['production_version']}; flag rate "
            f"{s.get('flag_rate_candidate', 0):.1%} vs {s.get('flag_rate_production', 0):.1%}, "
            f"{int(s.get('disagreements', 0))} disagreement(s), score correlation "
            f"{'n/a' if corr is None else f'{corr:.3f}'}\n")
