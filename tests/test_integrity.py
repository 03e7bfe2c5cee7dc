"""Tamper evidence: the sha256 manifest of a detector folder, and refusals when a stored artifact is edited
in a real sqlite store's artifact folder (predict, the gate, loading by version)."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from adreg import cli, integrity
from adreg.integrity import IntegrityError
from adreg.registry.resolve import get_model
from adreg.registry import derive, lifecycle, versions


def _folder(tmp_path) -> Path:
    d = tmp_path / "detector"
    (d / "backbone").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "state.safetensors").write_bytes(b"\x00" * 1000)
    (d / "backbone" / "weights.bin").write_bytes(b"\x01" * 100)
    return d


def test_manifest_detects_modified_missing_and_added_files(tmp_path):
    d = _folder(tmp_path)
    digest = integrity.write_manifest(d)
    manifest = json.loads((d / integrity.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {"config.json", "state.safetensors", "backbone/weights.bin"}
    assert integrity.verify(d) == digest == integrity.manifest_digest(d)
    assert integrity.verify(d, expected_digest=digest) == digest
    with pytest.raises(IntegrityError, match="registered version expects"):
        integrity.verify(d, expected_digest="0" * 64)

    (d / "backbone" / "weights.bin").write_bytes(b"\x02" * 100)
    with pytest.raises(IntegrityError, match=r"backbone/weights\.bin was modified"):
        integrity.verify(d)
    (d / "backbone" / "weights.bin").write_bytes(b"\x01" * 100)
    (d / "extra.py").write_text("import os")
    with pytest.raises(IntegrityError, match=r"extra\.py was added"):
        integrity.verify(d)
    (d / "extra.py").unlink()
    (d / "state.safetensors").unlink()
    with pytest.raises(IntegrityError, match=r"state\.safetensors is missing"):
        integrity.verify(d)


@pytest.fixture()
def tampered_store(tracking_uri, bottle_fit, tmp_path):
    """bottle_fit logged and registered in a fresh sqlite store, promoted; returns (version, detector folder)."""
    logged = derive.log_fit(bottle_fit)
    version = derive.register_version(logged, "bottle", bottle_fit.metrics()).version
    versions.promote("bottle", version, "production")
    run_tag = mlflow.MlflowClient().get_run(logged.run_id).data.tags[integrity.DIGEST_TAG]
    assert mlflow.MlflowClient().get_model_version("adreg-bottle", version).tags[integrity.DIGEST_TAG] == run_tag
    folders = [p.parent for p in (tmp_path / "artifacts").rglob("detector/config.json")]
    assert len(folders) == 1, folders
    assert integrity.verify(folders[0], run_tag) == run_tag
    return version, folders[0]


def test_edited_artifact_in_the_store_is_refused_with_the_file_named(tampered_store, bottle_dir, capsys):
    version, folder = tampered_store
    image = str(bottle_dir / "test" / "good" / "000.png")
    assert cli.main(["predict", "bottle", image, "--device", "cpu"]) == 0  # intact: scores
    capsys.readouterr()

    cfg = json.loads((folder / "config.json").read_text())
    cfg["threshold"]["value"] = 1e9  # "nothing is ever anomalous"
    (folder / "config.json").write_text(json.dumps(cfg))
    code = cli.main(["predict", "bottle", image, "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "config.json was modified after fit" in err and err.count("\n") == 1
    assert "config.json" in json.loads(out)["error"]
    with pytest.raises(IntegrityError, match="config.json was modified"):
        lifecycle.promote_gated("bottle", version, "staging")  # the gate refuses to evaluate it
    assert "staging" not in get_model("bottle").aliases

    # rewriting the manifest to match does not help: the version's digest tag no longer matches
    integrity.write_manifest(folder)
    with pytest.raises(IntegrityError, match="replaced after registration"):
        lifecycle.load_version_detector("bottle", version, device="cpu")


def test_removed_manifest_is_refused_where_the_version_is_known(tampered_store):
    version, folder = tampered_store
    shutil.move(folder / integrity.MANIFEST_FILE, folder.parent / "moved.json")
    with pytest.raises(IntegrityError, match="manifest is gone"):
        lifecycle.load_version_detector("bottle", version, device="cpu")
