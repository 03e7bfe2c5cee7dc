"""The search of ``adreg tune``: candidates fitted on the shots, ranked on the selection set, each logged as a
nested MLflow run under one parent run; one search shared by any number of workers through Optuna's storage.

How a search runs (``run_search``):

* the first worker to create the Optuna study is its **leader**: it creates the MLflow parent run, records it
  on the study, and enqueues the candidates of the space's first stage as waiting trials. Every later worker
  (same ``--storage`` and ``--study``) joins: it loads the study, checks that its data and evidence are the
  leader's, and pops waiting trials too. Optuna's storage hands each waiting trial to exactly one worker (a
  row lock on PostgreSQL), so no candidate runs twice;
* a worker fits the candidate on the shots (``AnomalyDetector`` behind a ``CachingBackbone`` per backbone: the
  augmented views and evidence images of candidates that share preprocessing go through the backbone once),
  scores half of the selection set, reports it to Optuna's pruner (a hopeless candidate stops there), scores
  the rest, and ranks each image-score aggregation by selection image AUROC with a bootstrap interval;
* when a stage is done, the leader enqueues the next (``best: N``: the next stage refines the N best fits);
  when the space, ``trials`` or the time budget is spent, it marks the study done and chooses: the highest
  selection image AUROC, ties broken by selection pixel AUROC, then by the order the space lists them.

Without ``storage`` the study lives in memory: one worker, the same code.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from adreg.errors import AdregError, ConfigError, StoreUnreachable, deferred_interrupts, first_line
from adreg.fitting import FitOptions
from adreg.tuning.evidence import Evidence
from adreg.tuning.space import Candidate, SearchSpace, normalise

log = logging.getLogger(__name__)

TUNE_TAG = "adreg.tune"            # "parent" on the search's run, "candidate" on each nested run
PARENT_ATTR = "mlflow_parent_run_id"
POLL_S = 0.5
#: the longest a leader waits for another worker's running candidate before it gives up on it
STALE_AFTER_S = 900.0
#: the automatic time budget, in multiples of the first candidate's time from the start of the search (set-up
#: included). The first candidate is the default settings (the space's base), whose fit is about one default
#: ``adreg fit`` less its test evaluation: 8x leaves room for the winner's fit within 10x one fit.
AUTO_BUDGET = 8.0


@dataclass
class SearchConfig:
    """How to search: ``trials`` fits at most in all (None: the whole space), ``time_budget`` minutes per worker
    (None: no limit; ``"auto"``: ``AUTO_BUDGET`` times this worker's first candidate, counted from the start,
    so the search and the winner's fit stay within about 10x one default fit of the product), Optuna ``storage`` URL (None: in memory, one worker) and ``study`` name, pruning of
    hopeless candidates after half the selection set, bootstrap resamples of the selection intervals."""

    trials: int | None = None
    time_budget: float | str | None = None
    storage: str | None = None
    study: str | None = None
    pruning: bool = True
    n_resamples: int = 500
    level: float = 0.95
    feature_cache: str | None = None  # a folder: backbone features also cached on disk (benchmarks re-run)


@dataclass
class CandidateOutcome:
    """One candidate fit as the study holds it: ``selection`` metrics at its best aggregation (``top_fraction``
    in ``settings``), each aggregation's image AUROC in ``by_aggregation``; ``state`` complete / pruned / failed."""

    number: int
    key: str
    label: str
    stage: int
    settings: dict
    state: str
    selection: dict = field(default_factory=dict)
    by_aggregation: dict = field(default_factory=dict)
    run_id: str | None = None
    error: str | None = None
    worker: str = ""
    scores: list | None = field(default=None, repr=False)  # selection image scores at its best aggregation,
    #                                                        in the selection set's order (this worker's only)

    @property
    def value(self) -> float:
        return float(self.selection.get("selection_image_auroc", float("nan")))

    def fit_settings(self) -> dict:
        """The FitOptions fields this candidate sets, its best aggregation included."""
        return {k: copy.deepcopy(v) for k, v in self.settings.items()}


@dataclass
class SearchResult:
    """What a worker's search ended with. ``candidates``: every candidate of the study (all workers), in the
    order they were enqueued; ``chosen``: the leader's choice (None for a worker that joined, or when the
    evidence was too little: ``fallback`` says why)."""

    parent_run_id: str
    study_name: str
    leader: bool
    candidates: list[CandidateOutcome]
    chosen: CandidateOutcome | None
    evidence: dict
    fallback: str | None = None
    seconds: float = 0.0
    n_here: int = 0            # candidates this worker ran
    stopped: str = ""          # why the search stopped early (budget), empty when the space was spent
    default_key: str | None = None
    versus_default: dict | None = None

    def ranked(self) -> list[CandidateOutcome]:
        """Complete candidates, best first (the choice rule)."""
        return rank(self.candidates)


def rank(candidates) -> list[CandidateOutcome]:
    """The choice rule: complete candidates by selection image AUROC, then selection pixel AUROC, then the
    order they were enqueued."""
    done = [c for c in candidates if c.state == "complete" and math.isfinite(c.value)]
    return sorted(done, key=lambda c: (-c.value, -c.selection.get("selection_pixel_auroc", 0.0), c.number))


# -- scoring one candidate --------------------------------------------------------------------------------
def options_for(base: FitOptions, settings: dict) -> FitOptions:
    """``base`` with a candidate's settings (FitOptions fields; ``params`` are the method's)."""
    fields = {k: copy.deepcopy(v) for k, v in vars(base).items()}
    for k, v in settings.items():
        fields["method_params" if k == "params" else k] = copy.deepcopy(v)
    return FitOptions(**fields)


class Backbones:
    """One ``CachingBackbone`` (memory only) per backbone spec: candidates that share preprocessing share a pass."""

    def __init__(self, device: torch.device, memory_mib: float | None = None, directory: str | None = None):
        self.device = device
        self.directory = directory
        self.memory_mib = memory_mib or float(os.environ.get("ADREG_TUNE_CACHE_MIB", 3072))
        self._built: dict[str, object] = {}

    def get(self, opts: FitOptions):
        from adreg.backbones import build_backbone
        from adreg.feature_cache import CachingBackbone

        key = json.dumps([opts.backbone, opts.layers, opts.image_size, opts.precision])
        if key not in self._built:
            inner = build_backbone(opts.backbone, layers=opts.layers, image_size=opts.image_size,
                                   precision=opts.precision).to(self.device)
            self._built[key] = CachingBackbone(inner, directory=self.directory, disk=self.directory is not None,
                                               memory_mib=self.memory_mib)
        return self._built[key]


def _aurocs(labels: np.ndarray, maps: np.ndarray, aggregation: list[float]) -> dict[float, tuple[float, np.ndarray]]:
    from adreg.metrics import auroc
    from adreg.postprocess import image_scores

    t = torch.from_numpy(maps)
    out = {}
    for tf in aggregation:
        scores = image_scores(t, tf).numpy().astype(np.float64)
        out[tf] = (auroc(labels, scores), scores)
    return out


def _pixel_auroc(evidence: Evidence, maps: np.ndarray, size: int = 64) -> float | None:
    """Pixel AUROC over the goods and the masked defects, maps and masks at ``size`` (ranks, not AUPRO)."""
    from adreg.metrics import auroc

    idx = [i for i, y in enumerate(evidence.labels) if y == 0 or evidence.masks[i] is not None]
    if not any(evidence.labels[i] == 1 for i in idx):
        return None
    t = torch.from_numpy(maps[idx])[:, None]
    small = torch.nn.functional.interpolate(t, size=(size, size), mode="area")[:, 0].numpy()
    masks = np.stack([evidence.mask_array(i, size) for i in idx])
    if not masks.any():
        return None
    return float(auroc(masks.ravel(), small.ravel()))


class Pruned(Exception):
    """A candidate stopped after half the selection set (Optuna's pruner judged it hopeless); ``detector``
    is the fitted candidate."""

    def __init__(self, message: str, detector=None):
        super().__init__(message)
        self.detector = detector


def score_candidate(opts: FitOptions, evidence: Evidence, images: list, backbones: Backbones,
                    aggregation: list[float], config: SearchConfig, report=None) -> tuple[dict, dict, object]:
    """Fit ``opts`` on the evidence's shots and rank it on the selection set. ``report(value, step)`` returns
    True to prune after the first half. Returns (selection metrics at the best aggregation with its
    ``top_fraction``, image AUROC per aggregation, the fitted detector)."""
    from adreg.detector import AnomalyDetector
    from adreg.methods import build_method
    from adreg.statistics import ScoreSet, bootstrap_intervals

    t0 = time.perf_counter()
    torch.manual_seed(opts.seed)
    method = build_method(opts.method, **opts.method_params)
    det = AnomalyDetector(backbones.get(opts), method, sigma=opts.sigma, top_fraction=method.default_top_fraction,
                          augment=opts.augment, aug_count=opts.aug_count, seed=opts.seed,
                          batch_size=opts.batch_size, aug_views=opts.aug_views)
    det.fit(list(evidence.shots), show_progress=False)
    fit_s = time.perf_counter() - t0
    labels = np.asarray(evidence.labels)
    first, second = evidence.split_half()
    maps = np.zeros((len(images), det.backbone.image_size, det.backbone.image_size), dtype=np.float32)
    maps[first] = det.predict([images[i] for i in first]).maps
    if report is not None:
        half = max(v for v, _ in _aurocs(labels[first], maps[first], aggregation).values())
        if report(half, 0):
            raise Pruned(f"selection image AUROC {half:.4f} on the first half", det)
    maps[second] = det.predict([images[i] for i in second]).maps
    per = _aurocs(labels, maps, aggregation)
    best_tf = max(aggregation, key=lambda tf: (per[tf][0], -aggregation.index(tf)))
    value, scores = per[best_tf]
    interval = bootstrap_intervals(ScoreSet(labels, scores), level=config.level, n_resamples=config.n_resamples,
                                   pixel_resamples=0)["image_auroc"]
    selection = {"selection_image_auroc": float(value), "selection_image_auroc_low": float(interval.low),
                 "selection_image_auroc_high": float(interval.high), "top_fraction": float(best_tf),
                 "fit_seconds": fit_s, "candidate_seconds": time.perf_counter() - t0}
    pixel = _pixel_auroc(evidence, maps)
    if pixel is not None:
        selection["selection_pixel_auroc"] = pixel
    selection["scores"] = [float(s) for s in scores]
    return selection, {str(tf): float(v) for tf, (v, _) in per.items()}, det


# -- MLflow records -----------------------------------------------------------------------------------------
def _flat_params(settings: dict) -> dict[str, str]:
    out = {}
    for k, v in settings.items():
        if k == "params":
            out.update({f"method.{pk}": json.dumps(pv) if isinstance(pv, (list, dict)) else str(pv)
                        for pk, pv in v.items()})
        else:
            out[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def _log_candidate(client, experiment_id: str, parent: str, cand: CandidateOutcome, category: str) -> str:
    """One nested run: the candidate's settings as params, its selection metrics (with the interval) as metrics."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    params = _flat_params({k: v for k, v in cand.settings.items()})
    metrics = [Metric(k, float(v), now, 0) for k, v in cand.selection.items()
               if isinstance(v, (int, float)) and k != "top_fraction"]
    metrics += [Metric(f"selection_image_auroc_top_{tf}", v, now, 0) for tf, v in cand.by_aggregation.items()]
    tags = [RunTag("adreg.tune.error", cand.error[:4000])] if cand.error else []
    status = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}[cand.state]
    with deferred_interrupts():  # created, logged and ended in one piece: an interrupt never leaves it RUNNING
        run = client.create_run(experiment_id, run_name=f"{cand.number:03d} {cand.label}",
                                tags={"mlflow.parentRunId": parent, TUNE_TAG: "candidate", "adreg.category": category,
                                      "adreg.tune.stage": str(cand.stage), "adreg.tune.key": cand.key,
                                      "adreg.tune.state": cand.state, "adreg.tune.worker": cand.worker})
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v[:6000]) for k, v in params.items()],
                         tags=tags)
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


# -- the study ----------------------------------------------------------------------------------------------
def _storage(url: str | None):
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    from adreg import store

    try:
        store.check_reachable(url)
    except StoreUnreachable as exc:
        raise StoreUnreachable(f"the search storage {url} is not reachable: {str(exc).split(': ', 1)[-1]}; "
                               "check --storage") from exc
    kwargs = {"connect_args": {"connect_timeout": store.CONNECT_TIMEOUT_S}} if url.startswith("postgresql") else {}
    for attempt in range(3):  # workers that start together on an empty database race to create its tables
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy's errors: any failure to open the storage
            if attempt == 2:
                raise StoreUnreachable(f"the search storage {url} cannot be opened: {first_line(exc)}; "
                                       "check --storage") from exc
            time.sleep(1.0 + attempt)


def _outcome(trial) -> CandidateOutcome:
    a = trial.user_attrs
    state = a.get("outcome_state") or {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(
        trial.state.name, trial.state.name.lower())
    return CandidateOutcome(trial.number, a.get("key", ""), a.get("label", ""), int(a.get("stage", 0)),
                            dict(a.get("settings", {})), state, dict(a.get("selection", {})),
                            dict(a.get("by_aggregation", {})), a.get("run_id"), a.get("error"), a.get("worker", ""))


def _pop(study, storage):
    """A waiting trial of ``study``, now RUNNING for this worker only (the storage's row lock decides), or None."""
    import optuna
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.trial.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _worker_name() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def fingerprint(base: FitOptions, evidence: Evidence, space: SearchSpace) -> str:
    """What two workers must agree on to share a search: category, shots, seed, evidence and space."""
    import hashlib

    payload = {"category": base.category, "k_shot": base.k_shot, "seed": base.seed,
               "shots": [os.path.basename(str(p)) for p in evidence.shots], "evidence": evidence.counts(),
               "space": space.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Search:
    """One worker of a search (see the module doc); ``run()`` returns its ``SearchResult``."""

    def __init__(self, base: FitOptions, evidence: Evidence, space: SearchSpace, config: SearchConfig,
                 experiment_id: str, run_name: str, show_progress: bool = True, on_candidate=None):
        self.base, self.evidence, self.space, self.config = base, evidence, space, config
        self.experiment_id, self.run_name = experiment_id, run_name
        self.show_progress = show_progress
        self.on_candidate = on_candidate  # called with (CandidateOutcome, fitted detector) after each candidate
        self.worker = _worker_name()
        self.t0 = time.perf_counter()
        self.auto_budget = config.time_budget == "auto"
        self.deadline = (None if config.time_budget is None or self.auto_budget
                         else self.t0 + 60.0 * float(config.time_budget))
        self.base_settings = normalise({k: getattr(base, k) for k in ("method", "backbone", "layers", "image_size",
                                                                      "augment", "aug_count")}
                                       | {"params": dict(base.method_params)})
        self.n_here = 0
        self.stopped = ""

    # -- set-up --------------------------------------------------------------------------------------------
    def _open(self):
        import mlflow
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = _storage(self.config.storage)
        self.fp = fingerprint(self.base, self.evidence, self.space)
        name = self.config.study or f"adreg-tune-{self.base.category}-{self.fp}"
        # keeps the top 75% at the half-way report: a candidate in the bottom quarter so far stops there
        pruner = (optuna.pruners.PercentilePruner(75.0, n_startup_trials=4) if self.config.pruning
                  else optuna.pruners.NopPruner())
        self.client = mlflow.MlflowClient()
        try:
            self.study = optuna.create_study(study_name=name, storage=self.storage, direction="maximize",
                                             pruner=pruner)
            self.leader = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=name, storage=self.storage, pruner=pruner)
            self.leader = False
        if self.leader:
            parent = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                            tags={TUNE_TAG: "parent", "adreg.category": self.base.category,
                                                  "adreg.tune.study": name})
            self.parent = parent.info.run_id
            self.study.set_user_attr("fingerprint", self.fp)
            self.study.set_user_attr("space", self.space.to_dict())
            self.study.set_user_attr("stage", 0)
            self._enqueue(self.space.stage_candidates(0, self.base_settings))
            self.study.set_user_attr(PARENT_ATTR, self.parent)  # last: a joining worker waits for it
        else:
            self._join(name)

    def _join(self, name: str) -> None:
        attrs = self.study.user_attrs
        waited = time.perf_counter()
        while PARENT_ATTR not in attrs:
            if time.perf_counter() - waited > 60:
                raise ConfigError(f"study {name!r} exists but its leader never recorded its MLflow run; "
                                  "pass another --study")
            time.sleep(POLL_S)
            attrs = self.study.user_attrs
        if attrs.get("done"):
            raise ConfigError(f"the search {name!r} is finished (parent run {attrs[PARENT_ATTR]}); "
                              "pass another --study to search again")
        if attrs.get("fingerprint") != self.fp:
            raise ConfigError(f"this worker's category, shots, evidence or space differ from those of the search "
                              f"{name!r} (run {attrs[PARENT_ATTR]}); give every worker the same arguments and data")
        self.parent = attrs[PARENT_ATTR]

    def _enqueue(self, candidates: list[Candidate]) -> int:
        known = {t.user_attrs.get("key") for t in self.study.get_trials(deepcopy=False)}
        budget = self.config.trials
        n_known = len(known)
        added = 0
        for cand in candidates:
            if cand.key in known:
                continue
            if budget is not None and n_known + added >= budget:
                self.stopped = self.stopped or f"--trials {budget} reached"
                break
            self.study.enqueue_trial({}, user_attrs={"key": cand.key, "settings": cand.settings, "stage": cand.stage,
                                                     "label": cand.label()})
            known.add(cand.key)
            added += 1
        return added

    # -- the loop ------------------------------------------------------------------------------------------
    def _out_of_time(self) -> bool:
        """Past this worker's budget (never before its first candidate: a leader always has one to choose)."""
        if self.n_here and self.deadline is not None and time.perf_counter() > self.deadline:
            budget = (f"the automatic time budget ({AUTO_BUDGET:g}x the first candidate: "
                      f"{(self.deadline - self.t0) / 60:.1f} min) spent" if self.auto_budget
                      else f"--time-budget {self.config.time_budget:g} min spent")
            self.stopped = self.stopped or budget
            return True
        return False

    def run(self) -> SearchResult:
        from adreg.detector import decode, resolve_device
        from adreg.progress import Bar

        self._open()
        self.backbones = Backbones(resolve_device(self.base.device), directory=self.config.feature_cache)
        self.images = [decode(i) for i in self.evidence.images]
        total = self.space.max_fits() if self.config.trials is None else min(self.config.trials, self.space.max_fits())
        self.bar = Bar(total, "tuning", self.show_progress, unit="fit")
        try:
            while True:
                trial = None if self._out_of_time() else _pop(self.study, self.storage)
                if trial is not None:
                    self._run_trial(trial)
                    continue
                if not self.leader:
                    if self.study.user_attrs.get("done") or self._out_of_time():
                        break
                    time.sleep(POLL_S)
                    continue
                if self._running():
                    self._wait_or_give_up()
                    continue
                if self._out_of_time() or not self._next_stage():
                    break
            if self.leader:
                self.study.set_user_attr("done", True)
        except (KeyboardInterrupt, SystemExit):
            if self.leader:  # the workers that joined stop too; nothing is chosen
                self.study.set_user_attr("interrupted", True)
                self.study.set_user_attr("done", True)
            raise
        finally:
            self.bar.close()
        candidates = [_outcome(t) for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("key")]
        candidates = [c for c in candidates if c.state not in ("waiting", "running")]
        result = SearchResult(self.parent, self.study.study_name, self.leader, candidates, None,
                              self.evidence.summary(),
                              seconds=time.perf_counter() - self.t0, n_here=self.n_here, stopped=self.stopped)
        if self.leader:
            self._choose(result)
        return result

    def _running(self) -> list:
        from optuna.trial import TrialState

        return self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))

    def _wait_or_give_up(self) -> None:
        """Wait for other workers' running candidates; one running for longer than ``STALE_AFTER_S`` is
        recorded as failed (its worker died), so the search goes on."""
        from datetime import datetime

        from optuna.trial import TrialState

        time.sleep(POLL_S)
        for t in self._running():
            if t.datetime_start and (datetime.now() - t.datetime_start).total_seconds() > STALE_AFTER_S:
                try:
                    self.study.tell(t.number, state=TrialState.FAIL)
                except Exception:  # noqa: BLE001 - finished meanwhile by its own worker
                    pass

    def _next_stage(self) -> bool:
        """Enqueue the next stage that has candidates left; False when the space (or the budget) is spent."""
        stage = int(self.study.user_attrs.get("stage", 0))
        while stage + 1 < len(self.space.stages):
            stage += 1
            self.study.set_user_attr("stage", stage)
            ranked = self._ranked_settings()
            if self._enqueue(self.space.stage_candidates(stage, self.base_settings, ranked)):
                return True
            if self.stopped:
                return False
        return False

    def _ranked_settings(self) -> list[dict]:
        return [dict(c.settings) for c in rank(_outcome(t) for t in self.study.get_trials(deepcopy=False))]

    def _run_trial(self, trial) -> None:
        from optuna.trial import TrialState

        attrs = trial.user_attrs
        cand = CandidateOutcome(trial.number, attrs["key"], attrs["label"], int(attrs["stage"]),
                                dict(attrs["settings"]), "failed", worker=self.worker)
        det = None

        def report(value: float, step: int) -> bool:
            trial.report(value, step)
            return self.config.pruning and trial.should_prune()

        try:
            opts = options_for(self.base, cand.settings)
            selection, per, det = score_candidate(opts, self.evidence, self.images, self.backbones,
                                                  self.space.aggregation, self.config, report)
            cand.settings["top_fraction"] = selection.pop("top_fraction")
            cand.selection = {k: v for k, v in selection.items() if k != "scores"}
            cand.by_aggregation = per
            cand.state = "complete"
            scores = cand.scores = selection["scores"]
        except Pruned as exc:
            cand.state, cand.error, scores, det = "pruned", str(exc), None, exc.detector
        except (KeyboardInterrupt, SystemExit):
            cand.state = "interrupted"
            self._record(trial, cand, None)
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # noqa: BLE001 - one candidate failing (a bad setting, memory) is recorded
            if not isinstance(exc, AdregError):
                log.warning("candidate %s failed: %r", cand.label, exc)
            cand.error, scores = f"{type(exc).__name__}: {first_line(exc) if str(exc).strip() else ''}", None
        self._record(trial, cand, scores)
        self.n_here += 1
        if self.auto_budget and self.deadline is None:
            self.deadline = self.t0 + AUTO_BUDGET * (time.perf_counter() - self.t0)
        self.bar(1, best=cand.value if cand.state == "complete" else float("nan"))
        if self.on_candidate is not None:
            self.on_candidate(cand, det)
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(cand.state, TrialState.FAIL)
        self.study.tell(trial, cand.value if state == TrialState.COMPLETE else None, state=state)

    def _record(self, trial, cand: CandidateOutcome, scores) -> None:
        cand.run_id = _log_candidate(self.client, self.experiment_id, self.parent, cand, self.base.category)
        trial.set_user_attr("settings", cand.settings)
        trial.set_user_attr("selection", cand.selection)
        trial.set_user_attr("by_aggregation", cand.by_aggregation)
        trial.set_user_attr("run_id", cand.run_id)
        trial.set_user_attr("worker", cand.worker)
        trial.set_user_attr("outcome_state", cand.state)
        if cand.error:
            trial.set_user_attr("error", cand.error)
        if scores is not None:
            trial.set_user_attr("scores", scores)

    # -- the choice ----------------------------------------------------------------------------------------
    def _choose(self, result: SearchResult) -> None:
        from adreg.statistics import delong_test

        ranked = result.ranked()
        if not ranked:
            return
        result.chosen = ranked[0]
        default = normalise(dict(self.base_settings))
        default_key = Candidate(default, 0).key
        result.default_key = default_key
        by_number = {t.number: t for t in self.study.get_trials(deepcopy=False)}
        base = next((c for c in ranked if c.key == default_key), None)
        if base is not None and base.number != result.chosen.number:
            a = by_number[result.chosen.number].user_attrs.get("scores")
            b = by_number[base.number].user_attrs.get("scores")
            if a and b and len(a) == len(b):
                t = delong_test(np.asarray(self.evidence.labels), a, b, self.config.level)
                result.versus_default = {"default_number": base.number, "diff": t.diff, "low": t.low,
                                         "high": t.high, "p_value": t.p_value, "method": t.method}


def run_search(base: FitOptions, evidence: Evidence, space: SearchSpace, config: SearchConfig, experiment_id: str,
               run_name: str, show_progress: bool = True, on_candidate=None) -> SearchResult:
    """Run (or join) a search; see the module doc. Raises ``StoreUnreachable`` for a storage that is down,
    ``ConfigError`` for a worker whose data differ from the search it joins."""
    return Search(base, evidence, space, config, experiment_id, run_name, show_progress, on_candidate).run()
