"""The adreg command line as a user runs it: real subprocesses, real store, real data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from adreg.cli import main
from adreg.images import file_to_b64

ROOT = Path(__file__).resolve().parents[1]


def _adreg(*args, uri, timeout=600):
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADREG_PROGRESS="0")
    return subprocess.run([sys.executable, "-m", "adreg.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _small_product(bottle_dir, root: Path, n_good=4) -> Path:
    """A custom-layout product folder (good/ + val/ + test/) built from a few real bottle images."""
    for sub in ("good", "val/good", "val/defect", "test/good", "test/broken_large"):
        (root / sub).mkdir(parents=True)
    goods = sorted((bottle_dir / "train" / "good").iterdir())
    for p in goods[:n_good]:
        shutil.copy(p, root / "good")
    for p in goods[n_good:n_good + 3]:
        shutil.copy(p, root / "val" / "good")
    shutil.copy(bottle_dir / "test" / "contamination" / "001.png", root / "val" / "defect")
    for name in ("000.png", "001.png", "002.png", "003.png", "004.png"):  # 5 + 5: enough evidence for the gate
        shutil.copy(bottle_dir / "test" / "good" / name, root / "test" / "good")
        shutil.copy(bottle_dir / "test" / "broken_large" / name, root / "test" / "broken_large")
    return root


def test_fit_register_promote_models_predict(bottle_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    product = _small_product(bottle_dir, tmp_path / "widget")
    r = _adreg("fit", "--method", "subspace", "--category", "widget", "--train-dir", str(product / "good"),
               "--k-shot", "2", "--seed", "3", "--aug-count", "4", "--top-fraction", "0.005", "--sigma", "2",
               "--register", "--promote", "staging", uri=uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "registered adreg-widget version 1" in r.stdout
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    params = client.get_run(client.get_model_version_by_alias("adreg-widget", "staging").run_id).data.params
    assert (params["top_fraction"], params["sigma"], params["aug_count"]) == ("0.005", "2.0", "4")
    assert "f1_optimal" in r.stdout and "validation folder" in r.stdout
    r = _adreg("promote", "widget", "--version", "1", "--alias", "production", uri=uri)
    assert r.returncode == 0 and "production -> adreg-widget version 1" in r.stdout
    r = _adreg("models", uri=uri)
    assert "widget" in r.stdout and "production,staging" in r.stdout
    imgs = [str(product / "test" / "good" / "000.png"), str(product / "test" / "broken_large" / "000.png")]
    r = _adreg("predict", "widget", *imgs, "--save-maps", str(tmp_path / "maps"), uri=uri)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list((tmp_path / "maps").glob("*.png"))) == 2


@pytest.mark.parametrize("args, message", [
    (["fit", "--category", "bottle", "--k-shot", "500"], "larger than the 209 training images"),
    (["fit", "--category", "gizmo"], "no bundled data for category 'gizmo'"),
    (["fit", "--category", "bad name!"], "category 'bad name!' must be"),
    (["fit", "--category", "bottle", "--backbone", "resnet"], "unknown backbone"),
    (["serve", "gizmo"], "unknown category 'gizmo'"),
    (["predict", "gizmo", "x.png"], "unknown category 'gizmo'"),
])
def test_bad_input_gives_one_clear_line_not_a_traceback(tracking_uri, capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_empty_train_folder(tracking_uri, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["fit", "--category", "x", "--train-dir", str(tmp_path / "empty")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_hf_backbone_fit_log_and_serve_offline(bottle_dir, tmp_path, tracking_uri):
    """The transformers path end to end on a tiny random DINOv2 saved to a local folder: the folder is
    bundled into the logged model, which then loads and scores with the folder gone."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from adreg.fitting import FitOptions, fit_category
    from adreg.registry import derive

    torch.manual_seed(0)
    vit_dir = tmp_path / "tiny-dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=112)).save_pretrained(vit_dir)
    product = _small_product(bottle_dir, tmp_path / "widget")
    opts = FitOptions(category="widget", train_dir=str(product / "good"), k_shot=2, backbone=f"hf:{vit_dir}",
                      layers=[-1, -2], image_size=112, aug_count=2, method_params={"layer_combine": "mean"})
    result = fit_category(opts, show_progress=False)
    assert result.detector.method.summary()["feature_dim"] == 32
    logged = derive.log_fit(result)
    version = derive.register_version(logged, "widget", result.metrics()).version
    shutil.rmtree(vit_dir)
    model = mlflow.pyfunc.load_model(f"models:/adreg-widget/{version}")
    img = product / "test" / "good" / "000.png"
    out = model.predict(pd.DataFrame({"image": [file_to_b64(img)]}))
    assert out.loc[0, "error"] == ""
    from adreg.images import load_image

    assert out.loc[0, "score"] == pytest.approx(float(result.detector.predict([load_image(img)]).scores[0]), rel=1e-5)


@pytest.mark.slow
def test_mlflow_run_fit_entry_point(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, ADREG_PROGRESS="0")
    r = subprocess.run(["mlflow", "run", str(ROOT), "-e", "fit", "--env-manager", "local", "--experiment-name",
                        "adreg-bottle", "-P", "category=bottle", "-P", "promote=staging", "-P", "augment=hflip,vflip",
                        "-P", "top_fraction=0.001"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("adreg-bottle", "staging")
    assert str(mv.version) == "1"
    params = client.get_run(mv.run_id).data.params
    assert (params["augment"], params["top_fraction"]) == ("hflip,vflip", "0.001")


@pytest.mark.slow
def test_quickstart_in_a_fresh_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(ADREG_HOME=str(tmp_path / "store"), ADREG_PROGRESS="0")
    r = subprocess.run([sys.executable, "-m", "adreg.cli", "quickstart"], capture_output=True, text=True,
                       timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "models:/adreg-bottle@production" in r.stdout
    assert (tmp_path / "store" / "mlflow.db").is_file() and (tmp_path / "store" / "artifacts").is_dir()


def test_every_argument_of_every_command_has_help_and_the_description_names_every_command():
    import argparse

    from adreg.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.dest) for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []
    assert all(name in parser.description for name in sub.choices)


def test_a_fit_setting_is_one_field_of_fit_options():
    """A new field (default, help) in a FitOptions subclass is a flag of the parser with that default and
    help, reaches the options through the parsed arguments, and is logged with the run parameters."""
    import argparse
    import dataclasses

    from adreg.cli.commands import _fit_settings
    from adreg.cli.parser import add_fit_arguments
    from adreg.options import FitOptions, option

    @dataclasses.dataclass
    class Wider(FitOptions):
        blur_radius: float = option(1.5, "blur before scoring, pixels (default {default})")

    parser = argparse.ArgumentParser()
    add_fit_arguments(parser, Wider)
    assert "blur before scoring, pixels (default 1.5)" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--category", "c"]).blur_radius == 1.5
    args = parser.parse_args(["--category", "c", "--blur-radius", "2.5", "--k-shot", "3"])
    settings = _fit_settings(args, Wider)
    params = settings.pop("params")
    opts = Wider(category="c", method_params=params, **settings)
    assert opts.params()["blur_radius"] == 2.5 and opts.params()["k_shot"] == 3
