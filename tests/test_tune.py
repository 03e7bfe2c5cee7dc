"""adreg tune on real bottle images: nested runs, the winner registered on the parent run, a choice the test folder
cannot change, two workers sharing one search on PostgreSQL, an interrupted search, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from adreg.errors import ConfigError, StoreUnreachable

ROOT = Path(__file__).resolve().parents[1]
#: small and cheap: no augmentation, two methods, two aggregations, one refinement of the best
SPACE = {"aggregation": [0.01, 0.0], "stages": [
    {"name": "methods", "grid": {"method": ["subspace", "knn"], "augmentation": [{"augment": "none"}]}},
    {"name": "size", "best": 1, "grid": {"features": [{"image_size": 256}]}}]}
#: six fits, for the searches that must last long enough to be shared or interrupted
WIDE_SPACE = {"aggregation": [0.01], "stages": [
    {"name": "wide", "grid": {"method": ["subspace", "knn", "rad"],
                              "augmentation": [{"augment": "none"}, {"augment": "hflip", "aug_count": 1}]}}]}


def _adreg(*args, uri, timeout=600, **popen):
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADREG_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "adreg.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **popen)


def _widget(bottle_dir: Path, root: Path, n_good: int = 16, poisoned: bool = False) -> Path:
    """good/ (n_good train goods) + test/ (5 good, 5 broken); ``poisoned`` swaps the test labels."""
    goods = sorted((bottle_dir / "train" / "good").iterdir())
    (root / "good").mkdir(parents=True)
    for p in goods[:n_good]:
        shutil.copy(p, root / "good")
    good_name, bad_name = ("broken_large", "good") if poisoned else ("good", "broken_large")
    (root / "test" / good_name).mkdir(parents=True)
    (root / "test" / bad_name).mkdir(parents=True)
    for name in ("000.png", "001.png", "002.png", "003.png", "004.png"):
        shutil.copy(bottle_dir / "test" / "good" / name, root / "test" / good_name / f"g{name}")
        shutil.copy(bottle_dir / "test" / "broken_large" / name, root / "test" / bad_name / f"b{name}")
    return root


@pytest.fixture(scope="module")
def widget(bottle_dir, tmp_path_factory) -> Path:
    return _widget(bottle_dir, tmp_path_factory.mktemp("widget"))


@pytest.fixture(scope="module")
def tuned(widget, tmp_path_factory):
    """One in-process tune of the widget (2 shots), registered, on a module store."""
    from adreg import api

    uri = f"sqlite:///{tmp_path_factory.mktemp('tune-store') / 'mlflow.db'}"
    out = api.tune("widget", train_dir=str(widget / "good"), test_dir=str(widget / "test"), k_shot=2, seed=1,
                   holdout=4, selection_goods=8, space=SPACE, register=True, tracking_uri=uri, show_progress=False,
                   device="cpu", time_budget=None)
    yield {"uri": uri, "out": out}
    mlflow.set_tracking_uri(None)


def test_tune_logs_every_candidate_as_a_nested_run_and_registers_the_winner(tuned):
    out, uri = tuned["out"], tuned["uri"]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    s = out.search
    assert s.leader and s.fallback is None and s.chosen is not None
    assert len(s.candidates) == 3  # 2 methods, then the best at 256 px
    assert s.evidence["kind"] == "synthetic" and s.evidence["n_good"] == 8 and s.evidence["n_defective"] == 8
    parent = client.get_run(out.run_id)
    assert parent.data.tags["adreg.tune"] == "parent"
    assert parent.data.tags["adreg.model_complete"] == "true"
    nested = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{out.run_id}'")
    assert len(nested) == 3
    for run in nested:
        assert run.data.tags["adreg.tune"] == "candidate" and run.info.status == "FINISHED"
        assert run.data.params["method"] in ("subspace", "knn")
        m = run.data.metrics
        assert m["selection_image_auroc_low"] <= m["selection_image_auroc"] <= m["selection_image_auroc_high"]
        assert "selection_pixel_auroc" in m  # synthetic defects carry masks
    # the winner is the parent's model: its params are the chosen settings, its version registered
    assert parent.data.params["method"] == s.chosen.settings["method"]
    assert float(parent.data.params["top_fraction"]) == s.chosen.settings["top_fraction"]
    assert parent.data.params["image_size"] == str(s.chosen.settings["image_size"])
    version = client.get_model_version("adreg-widget", out.version)
    assert version.run_id == out.run_id
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "tune")}
    assert {"tune/leaderboard.csv", "tune/leaderboard.png", "tune/choice.json", "tune/evidence.json"} <= artifacts
    best = max(c.value for c in s.candidates if c.state == "complete")
    assert s.chosen.value == best
    assert out.fit.metrics["image_auroc"] > 0.5  # evaluated on the test folder after the choice


def test_fit_settings_from_reuses_the_tuned_choice(tuned, widget, capsys):
    uri = tuned["uri"]
    r = _adreg("fit", "--category", "widget", "--train-dir", str(widget / "good"), "--test-dir", str(widget / "test"),
               "--k-shot", "2", "--seed", "1", "--holdout", "4", "--settings-from", tuned["out"].run_id, uri=uri)
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = r.stdout.split("run: ")[1].split()[0]
    params = mlflow.MlflowClient(uri).get_run(run_id).data.params
    chosen = tuned["out"].chosen
    assert params["method"] == chosen["method"] and params["augment"] == chosen["augment"]
    assert float(params["top_fraction"]) == chosen["top_fraction"]
    from adreg.cli import main

    code = main(["--tracking-uri", uri, "fit", "--category", "widget", "--train-dir", str(widget / "good"),
                 "--settings-from", run_id])
    err = capsys.readouterr().err
    assert code == 2 and "not the parent run of an `adreg tune` search" in err and err.count("\n") == 1


def test_a_poisoned_test_folder_cannot_change_the_choice(tuned, bottle_dir, tmp_path):
    """The test folder's labels swapped: the evidence, every candidate's selection figures and the choice are
    the same; only the reported evaluation (after the choice) sees the poison."""
    from adreg import api

    poisoned = _widget(bottle_dir, tmp_path / "poisoned", poisoned=True)
    out = api.tune("widget", train_dir=str(poisoned / "good"), test_dir=str(poisoned / "test"), k_shot=2, seed=1,
                   holdout=4, selection_goods=8, space=SPACE, tracking_uri=f"sqlite:///{tmp_path / 'p.db'}",
                   show_progress=False, device="cpu", time_budget=None)
    clean = tuned["out"]
    assert out.chosen == clean.chosen
    assert [(c.key, c.selection["selection_image_auroc"]) for c in out.search.candidates] == \
           [(c.key, c.selection["selection_image_auroc"]) for c in clean.search.candidates]
    assert out.fit.metrics["image_auroc"] == pytest.approx(1 - clean.fit.metrics["image_auroc"], abs=1e-6)


def test_too_little_evidence_fits_the_defaults_and_says_so(bottle_dir, tmp_path, capsys):
    from adreg.cli import main

    product = _widget(bottle_dir, tmp_path / "tiny", n_good=8)
    code = main(["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "tune", "tiny", "--train-dir",
                 str(product / "good"), "--k-shot", "2", "--holdout", "4", "--space", _space_file(tmp_path, SPACE),
                 "--device", "cpu"])
    out = capsys.readouterr().out
    mlflow.set_tracking_uri(None)
    assert code == 0
    assert "too little evidence to choose: only 2 good image(s)" in out and "fitted the defaults" in out
    assert "fitted subspace for 'tiny'" in out


def _space_file(tmp_path: Path, space: dict) -> str:
    path = tmp_path / "space.json"
    path.write_text(json.dumps(space))
    return str(path)


@pytest.mark.parametrize("space, message", [
    ({"stages": [{"grid": {"method": ["nope"]}}]}, "method 'nope' cannot be searched"),
    ({"stages": [{"grid": {"features": [{"backbone": "efficientnet-lite0", "layers": [4, 40]}]}}]},
     "efficientnet-lite0 has blocks 0..15"),
    ({"stages": [{"grid": {"top_fraction": [0.1]}}]}, "top_fraction cannot be searched"),
    ({"stages": []}, "non-empty 'stages'"),
])
def test_a_space_with_no_valid_candidate_is_refused_before_any_work(space, message):
    from adreg.tuning import SearchSpace

    with pytest.raises(ConfigError, match=message):
        SearchSpace.from_dict(space)


def test_bad_input_one_line_exit_2(widget, tmp_path, capsys, monkeypatch):
    from adreg.cli import main

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    def run(*args) -> tuple[int, str]:
        code = main(["tune", "widget", *args])
        return code, capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    code, err = run("--train-dir", str(tmp_path / "empty"))
    assert code == 2 and "holds no images" in err and err.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{grid: {method: [subspace]}}]\nbest_of: 3\n")
    code, err = run("--train-dir", str(widget / "good"), "--space", str(bad))
    assert code == 2 and "unknown key(s) best_of" in err and err.count("\n") == 1
    code, err = run("--train-dir", str(widget / "good"), "--evidence-dir", str(widget / "test"),
                    "--test-dir", str(widget / "test"))
    assert code == 2 and "must not see the test folder" in err
    t0 = time.perf_counter()
    code, err = run("--train-dir", str(widget / "good"), "--k-shot", "2", "--holdout", "4", "--selection-goods", "8",
                    "--storage", "postgresql://postgres@127.0.0.1:9/optuna")
    assert code == 2 and "search storage" in err and err.count("\n") == 1
    assert time.perf_counter() - t0 < 60
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    assert client.search_registered_models() == []
    mlflow.set_tracking_uri(None)


def test_storage_down_raises_store_unreachable():
    from adreg.tuning.search import _storage

    with pytest.raises(StoreUnreachable, match="check --storage"):
        _storage("postgresql://postgres@127.0.0.1:9/optuna")


def _database(base: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


def _worker(widget: Path, uri: str, storage: str, space: str, *extra) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADREG_PROGRESS="0")
    return subprocess.Popen([sys.executable, "-m", "adreg.cli", "tune", "widget", "--train-dir", str(widget / "good"),
                             "--k-shot", "2", "--seed", "1", "--holdout", "4", "--selection-goods", "8",
                             "--space", space, "--storage", storage, "--study", "shared", "--no-pruning",
                             "--time-budget", "0",
                             "--device", "cpu", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def test_two_workers_share_one_search_on_postgresql(widget, postgres_server, tmp_path, monkeypatch):
    import uuid

    tag = uuid.uuid4().hex[:8]
    uri = _database(postgres_server, f"adreg_mlflow_{tag}")
    storage = _database(postgres_server, f"adreg_optuna_{tag}")
    monkeypatch.setenv("ADREG_HOME", str(tmp_path / "home"))
    space = _space_file(tmp_path, WIDE_SPACE)
    from adreg.registry import tracking

    tracking.configure(uri)  # the team's MLflow store exists already: its tables are made before the workers start
    mlflow.MlflowClient(uri).search_experiments()
    workers = [_worker(widget, uri, storage, space, "--register") for _ in range(2)]
    outs = [w.communicate(timeout=900) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    leaders = [o for o in outs if "chosen:" in o[0]]
    joined = [o for o in outs if "joined search 'shared'" in o[0]]
    assert len(leaders) == 1 and len(joined) == 1, [o[0][-1500:] for o in outs]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    parents = client.search_runs([client.get_experiment_by_name("adreg-widget").experiment_id],
                                 "tags.`adreg.tune` = 'parent'")
    assert len(parents) == 1
    nested = client.search_runs([parents[0].info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    keys = [r.data.tags["adreg.tune.key"] for r in nested]
    assert len(keys) == 6 and len(set(keys)) == 6  # every candidate once, all under the one parent
    assert len({r.data.tags["adreg.tune.worker"] for r in nested}) == 2  # both workers ran candidates
    assert [str(v.version) for v in client.search_model_versions("name='adreg-widget'")] == ["1"]


def test_an_interrupted_search_keeps_its_candidates_and_registers_nothing(widget, tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    space = _space_file(tmp_path, WIDE_SPACE)
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADREG_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "adreg.cli", "tune", "widget", "--train-dir", str(widget / "good"),
                             "--k-shot", "2", "--seed", "1", "--holdout", "4", "--selection-goods", "8", "--space",
                             space, "--no-pruning", "--device", "cpu", "--register"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and proc.poll() is None:
        exp = client.get_experiment_by_name("adreg-widget") if Path(tmp_path / "m.db").exists() else None
        if exp is not None:
            finished = client.search_runs([exp.experiment_id], "tags.`adreg.tune` = 'candidate'")
            if finished:
                break
        time.sleep(0.5)
    assert finished and proc.poll() is None, "the search ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.count("\n") == 1 and "interrupted:" in err and "nothing registered" in err
    parent = client.search_runs([exp.experiment_id], "tags.`adreg.tune` = 'parent'")[0]
    assert parent.info.status == "KILLED"
    assert "adreg.model_complete" not in parent.data.tags
    kept = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kept) >= len(finished) and all(r.info.status in ("FINISHED", "KILLED") for r in kept)
    assert client.search_registered_models() == []


def test_a_signal_during_a_candidate_write_waits_for_the_write(tmp_path):
    """SIGTERM arriving between creating a candidate's run and ending it is held: the run ends FINISHED, then
    the interrupt is raised (it used to leave the run RUNNING forever)."""
    from adreg.errors import deferred_interrupts
    from adreg.tuning.search import CandidateOutcome, _log_candidate

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("adreg-widget")
    parent = client.create_run(exp).info.run_id
    cand = CandidateOutcome(0, "k", "subspace", 0, {"method": "subspace"}, "complete", {"selection_image_auroc": 0.9})
    create_run = client.create_run

    def create_then_signal(*args, **kwargs):
        run = create_run(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the real signal, delivered mid-write
        return run

    client.create_run = create_then_signal
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _log_candidate(client, exp, parent, cand, "widget")
    finally:
        signal.signal(signal.SIGTERM, previous)
    runs = client.search_runs([exp], "tags.`adreg.tune` = 'candidate'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert signal.getsignal(signal.SIGTERM) is previous
    with deferred_interrupts():  # nothing caught: nothing raised
        pass


def test_update_keeps_the_tuned_settings(tuned, bottle_dir, tmp_path):
    """A tuned version grown with more goods keeps its method, features, augmentation and aggregation."""
    from adreg import api

    out = tuned["out"]
    (tmp_path / "new").mkdir()
    for p in sorted((bottle_dir / "train" / "good").iterdir())[40:44]:
        shutil.copy(p, tmp_path / "new")
    grown = api.update("widget", str(tmp_path / "new"), from_version=out.version, holdout=0, min_calibration=2,
                       register=True, tracking_uri=tuned["uri"], show_progress=False, device="cpu")
    det = api.load("widget", version=grown.version, tracking_uri=tuned["uri"], device="cpu")
    chosen = out.chosen
    assert det.method.name == chosen["method"] and det.top_fraction == chosen["top_fraction"]
    assert det.backbone.spec()["image_size"] == chosen["image_size"]
    assert det.backbone.spec()["layers"] == chosen["layers"]


def test_trials_bound_the_search(widget, tmp_path):
    from adreg import api

    out = api.tune("widget", train_dir=str(widget / "good"), k_shot=2, seed=1, holdout=4, selection_goods=8,
                   space=SPACE, trials=1, tracking_uri=f"sqlite:///{tmp_path / 't.db'}", show_progress=False,
                   device="cpu")
    assert len(out.search.candidates) == 1 and out.search.stopped == "--trials 1 reached"
    assert out.chosen["method"] == "subspace" and out.fit is not None
    out = api.tune("widget", train_dir=str(widget / "good"), k_shot=2, seed=1, holdout=4, selection_goods=8,
                   space=SPACE, time_budget=0.0001, tracking_uri=f"sqlite:///{tmp_path / 't.db'}",
                   show_progress=False, device="cpu")
    assert len(out.search.candidates) == 1 and out.search.stopped == "--time-budget 0.0001 min spent"


def test_reviewed_defects_rank_the_candidates_and_the_gate_leaves_them_out(tuned, bottle_dir, tmp_path):
    """Half of the reviewed production defects (a seeded split of their hashes) are the tune's evidence; the
    tuned version's manifest records them (role selection), so the gate's production set leaves them out."""
    from adreg import api
    from adreg.registry import labels, lifecycle, manifest, lineage
    from adreg.tuning.evidence import reviewed_for_tuning

    uri = tuned["uri"]
    defects = sorted((bottle_dir / "test" / "broken_small").iterdir())[:20]
    for p in defects:
        shutil.copy(p, tmp_path / f"r{p.name}")
    api.label("widget", [str(tmp_path / f"r{p.name}") for p in defects], "defect", reviewer="qe",
              tracking_uri=uri)
    tune_side, shas = reviewed_for_tuning("widget")
    assert 4 <= len(tune_side) <= 16 and len(set(shas)) == len(shas)
    out = api.tune("widget", train_dir=str(tuned["out"].fit.result.data.root), k_shot=2, seed=1, holdout=4,
                   selection_goods=8, space=SPACE, trials=1, register=True, tracking_uri=uri, show_progress=False,
                   device="cpu")
    counts = out.search.evidence["counts"]
    assert counts["reviewed defect"] == len(tune_side)
    if len(tune_side) >= 10:
        assert not any(k.startswith("synthetic") for k in counts)
    entries = lineage.run_manifest(out.run_id)["images"]
    assert {e["sha256"] for e in entries if e["role"] == "selection"} == set(shas)
    left_out = lifecycle._learned("widget", [out.version])
    prod = labels.production_set("widget").without(left_out)
    assert not set(shas) & set(prod.sample_sha256) and prod.n_defective == 20 - len(shas)
    assert not set(shas) & {e["sha256"] for e in manifest.training(entries)}  # chosen on, not learned from
