"""`adreg score` in-process: real registered model, real bottle images, a corrupt file, resume, schema."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from adreg.batch import SCHEMA, collect_inputs
from adreg.batch.score import map_file
from adreg.cli import main
from adreg.images import decode_image_b64, load_image


def make_image_folder(bottle_dir: Path, target: Path) -> Path:
    """4 real bottle test images in two sub-folders, a corrupt PNG and a mask (skipped)."""
    (target / "good").mkdir(parents=True)
    (target / "defect").mkdir()
    for src in sorted((bottle_dir / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(src, target / "good" / src.name)
    for src in sorted((bottle_dir / "test" / "broken_large").glob("*.png"))[:2]:
        shutil.copy(src, target / "defect" / src.name)
    (target / "defect" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    shutil.copy(sorted((bottle_dir / "ground_truth" / "broken_large").glob("*.png"))[0],
                target / "defect" / "000_mask.png")
    return target


@pytest.fixture(scope="module")
def image_folder(bottle_dir, tmp_path_factory) -> Path:
    return make_image_folder(bottle_dir, tmp_path_factory.mktemp("batch") / "images")


def test_base64_wrapped_at_76_columns_decodes(bottle_dir):
    path = sorted((bottle_dir / "test" / "good").glob("*.png"))[0]
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(path.read_bytes()).decode(), 76)) + "\r\n"
    assert np.array_equal(np.asarray(decode_image_b64(wrapped)), np.asarray(load_image(path)))


def test_collect_inputs_folders_globs_files(image_folder):
    folder = collect_inputs([str(image_folder)])
    assert len(folder) == 5 and not any("_mask" in p for p in folder)  # recursive, masks skipped
    assert collect_inputs([str(image_folder / "*" / "0*.png")]) == [p for p in folder if "corrupt" not in p]
    assert collect_inputs([folder[0], folder[0]]) == [folder[0]]


def test_score_cli_rows_schema_errors_maps_and_resume(use_registered, image_folder, tmp_path, capsys):
    out, maps = tmp_path / "results.parquet", tmp_path / "maps"
    rc = main(["score", "bottle", str(image_folder), "--output", str(out), "--batch-size", "2",
               "--save-maps", str(maps)])
    assert rc == 1, "a corrupt file must make the exit status 1"
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMA
    rows = {r["path"]: r for r in table.to_pylist()}
    assert len(rows) == 5
    bad = rows.pop(str(image_folder / "defect" / "corrupt.png"))
    assert bad["score"] is None and bad["is_anomaly"] is None and "not a readable image" in bad["error"]
    assert all(r["error"] is None and r["model_version"] == use_registered["version"]
               and r["model_alias"] == "production" and r["model_name"] == "adreg-bottle" for r in rows.values())
    # the scores are the registered detector's (the fit's in-memory detector, scored directly)
    paths = sorted(rows)
    detector = use_registered["result"].detector
    expected = detector.predict([load_image(p) for p in paths]).scores
    got = np.array([rows[p]["score"] for p in paths])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [rows[p]["is_anomaly"] for p in paths] == [bool(s > rows[p]["threshold"]) for p, s in zip(paths, got)]
    assert any(rows[p]["is_anomaly"] for p in paths if "/defect/" in p)
    assert sorted(maps.iterdir()) == sorted(map_file(maps, p) for p in paths)

    # --resume: only the new image is scored; the parts already written are untouched
    parts_before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    new = image_folder / "good" / "new.png"
    shutil.copy(sorted(image_folder.glob("good/0*.png"))[0], new)
    try:
        capsys.readouterr()
        rc = main(["score", "bottle", str(image_folder), "--output", str(out), "--resume", "--batch-size", "2"])
        assert rc == 1  # the output still holds the corrupt file's row
        assert "scored 1 image(s), 0 failed, 5 skipped" in capsys.readouterr().out
        after = pq.read_table(out).to_pylist()
        assert len(after) == 6 and len({r["path"] for r in after}) == 6
        assert all((out / name).read_bytes() == data for name, data in parts_before.items())
        rc = main(["score", "bottle", str(image_folder), "--output", str(out), "--resume"])
        assert len(pq.read_table(out)) == 6
    finally:
        new.unlink()


def test_existing_output_needs_resume(use_registered, image_folder, tmp_path, capsys):
    out = tmp_path / "r.parquet"
    out.mkdir()
    assert main(["score", "bottle", str(image_folder), "-o", str(out)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["nosuchcat"], "unknown category 'nosuchcat'"),
    (["bottle", "--alias", "nosuchalias"], "has no alias 'nosuchalias'"),
    (["bottle", "--version", "99"], "has no version '99'"),
])
def test_bad_registry_input_fails_fast_with_one_line(use_registered, image_folder, tmp_path, capsys, args, message):
    rc = main(["score", *args[:1], str(image_folder), "-o", str(tmp_path / "o.parquet"), *args[1:]])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("adreg: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.parquet").exists()


def test_missing_input_fails_with_one_line(use_registered, tmp_path, capsys):
    assert main(["score", "bottle", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_unknown_alias_fails_before_spark_starts(use_registered, image_folder, tmp_path):
    """A separate process: the one-line error comes back and no Spark/JVM output appears."""
    proc = subprocess.run([sys.executable, "-m", "adreg.cli", "score", "bottle", str(image_folder), "-o",
                           str(tmp_path / "o"), "--engine", "spark", "--alias", "nosuchalias"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("adreg: error: adreg-bottle has no alias 'nosuchalias'")
    assert "SparkContext" not in proc.stdout + proc.stderr  # Spark never started (it logs on start-up)
