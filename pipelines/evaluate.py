"""Evaluate a registered model (by alias or version) on a labelled test folder, logged as an MLflow evaluation run
through adreg's evaluator plugin (``mlflow.models.evaluate(..., evaluators="adreg")``: metrics with intervals,
ROC, score histogram and overlays as artifacts).

    python -m pipelines.evaluate bottle --alias production --test-dir ../shared/datasets/mvtec_ad/bottle/test
"""

from __future__ import annotations

import argparse
import json
import sys

import adreg
from adreg.data import default_category_dir, read_labelled_folder
from adreg.errors import AdregError, DataError
from adreg.registry import tracking


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("category")
    p.add_argument("--alias", default="production")
    p.add_argument("--version")
    p.add_argument("--test-dir", help="good/ + defect folders (default: the bundled MVTec test set)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the intervals")
    p.add_argument("--tracking-uri")
    args = p.parse_args(argv)
    try:
        import mlflow
        import pandas as pd

        ref = adreg.resolve(args.category, args.version or None, args.alias, tracking_uri=args.tracking_uri)
        test_dir = args.test_dir
        if not test_dir:
            root = default_category_dir(args.category)
            if root is None:
                raise DataError(f"no --test-dir given and no bundled data for {args.category!r}")
            test_dir = root / "test"
        samples = read_labelled_folder(test_dir, "test folder")
        data = pd.DataFrame({"image": [str(s.path) for s in samples], "label": [s.label for s in samples],
                             "mask": [None if s.mask_path is None else str(s.mask_path) for s in samples]})
        with mlflow.start_run(experiment_id=tracking.fit_experiment_id(args.category),
                              run_name=f"evaluate-{args.category}-v{ref.version}"):
            mlflow.set_tags({"adreg.category": args.category, "adreg.evaluated_model": ref.uri})
            mlflow.log_param("test_dir", str(test_dir))
            result = mlflow.models.evaluate(ref.uri, data, targets="label", model_type="anomaly_detection",
                                            evaluators="adreg", evaluator_config={"n_resamples": args.resamples})
        print(json.dumps({"model": ref.uri, **{k: round(v, 5) for k, v in result.metrics.items()}}, indent=2))
    except AdregError as exc:
        print(f"adreg: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
