"""`adreg update`: lineage, duplicates, the contamination guard, bad inputs, nothing registered on failure.

One small parent per module (real bottle images in a custom product folder, 2 shots, 1 augmented copy,
SubspaceAD), registered and promoted in its own sqlite store.
"""

from __future__ import annotations

import shutil

import mlflow
import pytest

from adreg.cli import main as cli_main
from adreg.registry.resolve import existing_versions, get_model
from adreg.registry import derive, lineage, manifest, tracking, versions as registry

GOOD = [f"{i:03d}.png" for i in range(100, 108)]  # bottle train goods the parent never saw
DEFECTS = ["010.png", "011.png"]  # bottle test/broken_large images outside the evaluation set


@pytest.fixture(scope="module")
def parent(bottle_dir, tmp_path_factory):
    from adreg.fitting import FitOptions, fit_category

    root = tmp_path_factory.mktemp("update")
    product = root / "product"
    for sub, src, names in [("good", "train/good", [f"{i:03d}.png" for i in range(10)]),
                            ("val/good", "train/good", [f"{i:03d}.png" for i in range(10, 16)]),
                            ("test/good", "test/good", [f"{i:03d}.png" for i in range(4)]),
                            ("test/broken_large", "test/broken_large", [f"{i:03d}.png" for i in range(4)])]:
        (product / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(bottle_dir / src / n, product / sub / n)
            if "broken" in sub:
                shutil.copy(bottle_dir / "ground_truth/broken_large" / n.replace(".png", "_mask.png"),
                            product / sub / n.replace(".png", "_mask.png"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking.configure(uri)
    result = fit_category(FitOptions(category="bottle", train_dir=str(product / "good"), k_shot=2, seed=0,
                                     aug_count=1, device="cpu"), show_progress=False)
    logged = derive.log_fit(result)
    version = derive.register_version(logged, "bottle", result.metrics()).version
    registry.promote("bottle", version, "production")
    yield {"root": root, "uri": uri, "version": version, "run_id": logged.run_id, "shots": result.shots,
           "bottle": bottle_dir}
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def store(parent, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", parent["uri"])
    tracking.configure(parent["uri"])
    return parent


def capture_folder(parent, tmp_path, goods=GOOD, defects=(), duplicate=True, corrupt=True):
    """A folder shaped like the server's capture folder: <capture>/bottle/ok/<day>/*.png + .json sidecars."""
    day = tmp_path / "capture" / "bottle" / "ok" / "20261125"
    day.mkdir(parents=True)
    for n in goods:
        shutil.copy(parent["bottle"] / "train/good" / n, day / f"good_{n}")
        (day / f"good_{n}.json").write_text('{"score": 0.1}')
    for n in defects:
        shutil.copy(parent["bottle"] / "test/broken_large" / n, day / f"defect_{n}")
    if duplicate:  # the same bytes as one of the parent's shots, under another name
        shutil.copy(parent["shots"][0], day / "again.png")
    if corrupt:
        (day / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return tmp_path / "capture"


def versions(category="bottle"):
    return [str(v) for v in existing_versions(category)]


def test_update_records_lineage_skips_duplicates_and_holds_out_suspects(store, tmp_path, capsys):
    folder = capture_folder(store, tmp_path, defects=DEFECTS)
    assert cli_main(["update", "bottle", "--add-good", str(folder), "--register", "--holdout", "2"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 duplicate" in out and "again.png" in out
    assert "skipped 1 unreadable" in out and "truncated.png" in out
    assert "suspect(s) score above version 1's threshold" in out
    assert "subspace: added" in out  # what the update did for the method

    client = mlflow.MlflowClient()
    mv = client.get_model_version("adreg-bottle", "2")
    assert mv.tags["adreg.parent.version"] == "1" and mv.tags["adreg.parent.run_id"] == store["run_id"]
    assert "Grown from adreg-bottle version 1" in mv.description
    run = client.get_run(mv.run_id)
    assert run.data.tags["adreg.parent.version"] == "1" and run.data.params["parent_run_id"] == store["run_id"]
    assert str(get_model("bottle").aliases["production"]) == "1"  # no --promote: production untouched

    doc = lineage.run_manifest(mv.run_id)
    by_path = {e["path"]: e for e in manifest.training(doc["images"])}
    for shot in store["shots"]:  # the parent's images, added by the fit
        assert by_path[str(shot)]["added_by"] == "fit" and by_path[str(shot)]["run_id"] == store["run_id"]
    added = [e for e in doc["images"] if e["added_by"] == "update" and e["role"] == "train"]
    assert added and all(e["run_id"] == mv.run_id for e in added)
    for e in added:
        assert e["sha256"] == manifest.sha256_file(e["path"])
    names = {p.rsplit("/", 1)[-1] for p in by_path}
    assert not names & {"again.png", "truncated.png", "good_100.png.json"}

    report = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{lineage.UPDATE_REPORT_ARTIFACT}")
    suspects = {s["path"].rsplit("/", 1)[-1] for s in report["suspects"]}
    assert {f"defect_{n}" for n in DEFECTS} <= suspects  # the parent sees the broken bottles
    assert not suspects & names  # held out: not learned from
    assert len(report["calibration_images"]) == 2
    assert not {p.rsplit("/", 1)[-1] for p in report["calibration_images"]} & names
    assert run.data.metrics["n_images_duplicate"] == 1 and run.data.metrics["n_images_unreadable"] == 1
    assert run.data.metrics["n_training_images"] == len(by_path) == 2 + len(added)
    calibration = [e for e in doc["images"] if e["role"] == "calibration"]
    assert len(calibration) == 6 + 2  # the parent's validation goods + the 2 held-out new goods
    # MLflow dataset lineage: the manifest's digest is the run's training input
    inputs = [d for d in run.inputs.dataset_inputs if any(t.value == "training" for t in d.tags)]
    assert [d.dataset.digest for d in inputs] == [doc["digest"]]
    reference = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{lineage.REFERENCE_ARTIFACT}")
    assert reference["threshold"] == pytest.approx(run.data.metrics["threshold"])
    assert len(reference["images"]) == 2 + 6  # 2 held-out new goods + the parent's 6 validation goods

    # the same folder again, from the new version: the goods were learned from or calibrated on (skipped as
    # duplicates), the broken bottles are still suspects -> nothing to learn from, nothing registered
    code = cli_main(["update", "bottle", "--from-version", "2", "--add-good", str(folder), "--register"])
    err = capsys.readouterr().err
    assert code == 2 and "score above adreg-bottle version 2's threshold" in err and "nothing registered" in err
    assert versions() == ["1", "2"]


def test_include_suspects_takes_them_in(store, tmp_path):
    from adreg.registry.update import UpdateOptions, prepare_update

    folder = capture_folder(store, tmp_path, goods=GOOD[:4], defects=DEFECTS, duplicate=False, corrupt=False)
    held = prepare_update(UpdateOptions("bottle", [str(folder)], from_version="1", holdout=1), show_progress=False)
    taken = prepare_update(UpdateOptions("bottle", [str(folder)], from_version="1", holdout=1,
                                         include_suspects=True), show_progress=False)
    defect_paths = {str(p) for p in folder.rglob("defect_*")}
    assert defect_paths <= {s["path"] for s in held.suspects}
    assert not defect_paths & {str(p) for p in held.added}
    assert defect_paths <= {str(p) for p in taken.added} | {str(p) for p in taken.calibration_images}
    assert len(taken.added) + len(taken.calibration_images) == 6
    assert taken.metrics()["n_suspects_included"] == len(taken.suspects)


def test_second_look_learns_the_suspects_the_grown_model_clears(store, tmp_path):
    from adreg.registry.update import UpdateOptions, prepare_update

    from PIL import Image, ImageEnhance

    folder = capture_folder(store, tmp_path, goods=[], defects=DEFECTS, duplicate=False, corrupt=False)
    day = next(folder.rglob("defect_*")).parent
    # the line's lighting dims in steps (100% down to 30%): the 2-shot parent flags some of the dimmed goods,
    # the model grown on the others no longer does
    for n, i in enumerate(range(100, 124)):
        image = Image.open(store["bottle"] / "train/good" / f"{i:03d}.png").convert("RGB")
        ImageEnhance.Brightness(image).enhance(1.0 - 0.1 * (n % 8)).save(day / f"good_{i}.png")
    strict = prepare_update(UpdateOptions("bottle", [str(folder)], from_version="1", holdout=2, second_look=False),
                            show_progress=False)
    looked = prepare_update(UpdateOptions("bottle", [str(folder)], from_version="1", holdout=2), show_progress=False)
    assert not strict.cleared and all("second_score" not in s for s in strict.suspects)
    # the same suspects (same parent), now either cleared or still held out
    assert {s["path"] for s in looked.suspects} | {c["path"] for c in looked.cleared} == \
        {s["path"] for s in strict.suspects}
    defects = {str(p) for p in folder.rglob("defect_*")}
    assert defects <= {s["path"] for s in looked.suspects}  # the grown model still sees the broken bottles
    assert all(s["second_score"] > s["second_threshold"] for s in looked.suspects)
    assert looked.cleared  # the 2-shot parent's false alarms among the goods
    assert all(c["second_score"] <= c["second_threshold"] for c in looked.cleared)
    added = {str(p) for p in looked.added}
    assert {c["path"] for c in looked.cleared} <= added and added - {str(p) for p in strict.added} == \
        {c["path"] for c in looked.cleared}
    assert looked.metrics()["n_suspects_cleared"] == len(looked.cleared)
    # one report and one fit_info for both updates
    assert looked.method_report["n_images"] == len(looked.added)
    assert looked.method_report["patches_before"] == strict.method_report["patches_before"]
    info = looked.detector.fit_info
    assert info["update_seconds"] == pytest.approx(info["update_feature_seconds"] + info["update_method_seconds"])
    assert info["update_seconds"] == pytest.approx(looked.method_report["seconds"])
    assert looked.report()["cleared"] == looked.cleared


def test_bad_inputs_are_clear_errors_with_nothing_registered(store, tmp_path, capsys):
    before = versions()
    empty = tmp_path / "empty" / "ok" / "20261125"
    empty.mkdir(parents=True)
    (empty / "sidecar.json").write_text("{}")
    assert cli_main(["update", "bottle", "--add-good", str(tmp_path / "empty"), "--register"]) == 2
    assert "no images found" in capsys.readouterr().err
    assert cli_main(["update", "bottle", "--add-good", str(tmp_path / "missing"), "--register"]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = capture_folder(store, tmp_path, goods=[], duplicate=True, corrupt=True)
    assert cli_main(["update", "bottle", "--add-good", str(junk), "--register"]) == 2
    err = capsys.readouterr().err
    assert "nothing new to add" in err and "1 duplicate" in err and "1 unreadable" in err
    assert cli_main(["update", "bottle", "--add-good", str(junk), "--from-version", "9"]) == 2
    assert "has no version '9'" in capsys.readouterr().err
    assert versions() == before


def test_failure_half_way_registers_nothing_and_leaves_the_parent_untouched(store, tmp_path, monkeypatch):
    from adreg.registry.update import UpdateOptions, update_version

    client = mlflow.MlflowClient()
    parent_files = {a.path: a.file_size for a in client.list_artifacts(store["run_id"], "fit")}
    before = versions()

    def broken_log_model(*args, **kwargs):
        raise OSError("disk full")  # the artifact store fails while the update's model is being logged

    monkeypatch.setattr(tracking.mlflow.pyfunc, "log_model", broken_log_model)
    folder = capture_folder(store, tmp_path, goods=GOOD[:3], duplicate=False, corrupt=False)
    with pytest.raises(OSError, match="disk full"):
        update_version(UpdateOptions("bottle", [str(folder)], from_version="1", holdout=1), register=True,
                       promote="production", show_progress=False)
    assert versions() == before
    assert str(get_model("bottle").aliases["production"]) == "1"
    failed = client.search_runs([mlflow.get_experiment_by_name("adreg-bottle").experiment_id],
                                "tags.`adreg.lineage` = 'update'", order_by=["start_time DESC"], max_results=1)[0]
    assert failed.info.status == "FAILED" and "adreg.model_complete" not in failed.data.tags
    with pytest.raises(Exception, match="no completely logged model"):
        registry.register(f"runs:/{failed.info.run_id}/model", failed.info.run_id, "bottle")
    assert {a.path: a.file_size for a in client.list_artifacts(store["run_id"], "fit")} == parent_files


def test_mlproject_entry_maps_switches_and_folder_lists():
    from pipelines.update import to_cli

    argv = ["mtd", "--add-good", "a,b", "--from", "production", "--from-version", "3", "--register", "true",
            "--promote", "", "--include-suspects", "false", "--holdout", "20"]
    assert to_cli(argv) == ["mtd", "--add-good", "a", "b", "--from-version", "3", "--register", "--holdout", "20"]
