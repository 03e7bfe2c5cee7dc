"""Review labels: what a person said about an image the line produced, kept as records in the tracking store.

Every label is one run of the category's review experiment ``adreg-<category>/reviews`` (append-only: a new
label never overwrites an old one, and two reviewers writing at once each get their own run, so none is
lost). A run holds who (the user the server authenticated, else the same label identity the history uses),
when, the image's sha256, the verdict (``good``, ``defect`` or ``skip``), what the line's model said about it
(version, score, threshold, flagged, from the capture's sidecar), the optional defect region as
``mask.png``, and a copy of the image itself (``image.<ext>``), so the labelled set outlives the capture
folder's rotation and reads the same on every machine.

Reading: ``read_labels`` (all records, oldest first), ``consensus`` (one verdict per image: the latest label
of each reviewer; reviewers who disagree make the image ``disputed``, shown and left out of every set),
``production_set`` (the evaluation side: the review queue's random slice where reviewers labelled any of it,
else reviewed defects + the reviewed goods a seeded split puts there, as ``adreg.data.Sample`` s with masks
where drawn; the other goods are for growing: a reviewed good is either grown on or evaluated on, never both).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

from adreg import store
from adreg.data import Sample
from adreg.errors import ConflictError, DataError, ImageDecodeError
from adreg.images import load_image
from adreg.integrity import sha256_file
from adreg.names import model_name, reviews_experiment_name
from adreg.registry import governance

VERDICTS = ("good", "defect", "skip")
LABEL_TAG = "adreg.review_label"
MASK_ARTIFACT = "mask.png"
DEFAULT_EVAL_FRACTION = 0.5  # of the reviewed goods: evaluated on (the rest are grown on)
DISPUTED = "disputed"
REVIEWER_IDENTITY = "label (review page)"  # a name typed on the review page, where the store has no users


@dataclass(frozen=True)
class Label:
    """One review record (``adreg.label`` returns them, ``adreg.labels`` lists them).

    Attributes:
        verdict: ``good``, ``defect`` or ``skip``; ``sha256``: the image's bytes, what the label is about.
        path: the file labelled; ``user`` / ``identity``: who labelled it (authenticated on a server with
            users); ``at``: when (UTC ISO); ``seq``: order of the records.
        judged_version, judged_score, judged_threshold, flagged, judged_at: what the model on the line said
            (None for an image that did not come from a capture).
        mask: whether a defect region was drawn (artifact ``mask.png`` of the label's run ``run_id``).
        selection: how the image came before the reviewer: ``random`` (the review queue's random slice, a
            seeded share ``random_share`` of all captures: the labels honest figures rest on), the queue's
            reason for an actively chosen one (``threshold``, ``novel``, ``duplicate``, ``newest``, ``sample``,
            ``shuffled``, ``group``: see ``adreg.review.selection``), or ``manual`` (``adreg label``).

    Examples:
        ```python
        [lab] = adreg.label("bottle", "captures/bottle/flagged/20261207/101502-123456-v3-a1b2.png", "good")
        print(lab.verdict, lab.judged_version, lab.flagged)     # good 3 True: a false alarm of v3
        false_alarms = [x for x in adreg.labels("bottle") if x.verdict == "good" and x.flagged]
        ```
    """

    category: str
    sha256: str
    verdict: str
    path: str
    user: str
    identity: str
    at: str
    seq: int
    judged_version: str | None = None
    judged_score: float | None = None
    judged_threshold: float | None = None
    flagged: bool | None = None
    judged_at: str | None = None
    mask: bool = False
    source: str = "cli"
    selection: str = "manual"
    random_share: float | None = None
    run_id: str = ""
    image_artifact: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def reviews_experiment_id(category: str, create: bool = True) -> str | None:
    return store.experiment_id(reviews_experiment_name(category), create=create,
                               tags={"adreg.category": category, "adreg.kind": "reviews",
                                     "mlflow.note.content": f"Review labels of {model_name(category)}: one run "
                                                            "per label (adreg review / adreg label)."})


def read_sidecar(path: Path) -> dict:
    """The capture sidecar (``<image>.json``: score, threshold, is_anomaly, version, at) or {}."""
    side = Path(path).with_suffix(".json")
    try:
        doc = json.loads(side.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _float(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def mask_png(mask, size: tuple[int, int]) -> bytes:
    """A defect region as an 8-bit PNG (0 / 255) of the image's ``size`` (w, h): from a bool/0-1 array, or
    PNG bytes / a mask file (resized to the image, binarised at half intensity)."""
    import io

    from PIL import Image

    if isinstance(mask, (bytes, bytearray)):
        img = Image.open(io.BytesIO(bytes(mask)))
    elif isinstance(mask, (str, Path)):
        img = Image.open(mask)
    else:
        arr = np.asarray(mask)
        img = Image.fromarray((arr > 0.5).astype(np.uint8) * 255)
    gray = img.convert("L").resize(size, Image.NEAREST)
    binary = (np.asarray(gray) >= 128).astype(np.uint8) * 255
    if not binary.any():
        raise DataError("the drawn defect region is empty")
    buf = io.BytesIO()
    Image.fromarray(binary).save(buf, format="PNG")
    return buf.getvalue()


def check_verdict(verdict: str) -> None:
    """``DataError`` unless ``verdict`` is one of ``VERDICTS``."""
    if verdict not in VERDICTS:
        raise DataError(f"a label is one of {', '.join(VERDICTS)}, got {verdict!r}")


def check_label(path: str | Path, verdict: str, *, mask=None,
                expected_sha256: str | None = None) -> tuple[str, bytes | None]:
    """Everything a label must be before it is written (``record_label``, and the review page for a label it
    journals while the store is down): a known verdict; an image file, whose bytes are ``expected_sha256``
    when given (``ConflictError``: it changed since it was shown); a readable image unless skipped; a mask
    only on a defect. Returns the file's sha256 and the mask as a PNG of the image's size (None without one)."""
    check_verdict(verdict)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image")
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise ConflictError(f"{path} changed since it was shown (sha256 {digest[:12]}... is not the "
                            f"{expected_sha256[:12]}... reviewed); reload it and label again")
    try:
        size = load_image(path).size
    except ImageDecodeError:
        if verdict != "skip":
            raise
        size = None
    if mask is not None and verdict != "defect":
        raise DataError("a defect region is only drawn on a defect")
    return digest, mask_png(mask, size) if mask is not None else None


def record_label(category: str, path: str | Path, verdict: str, *, mask=None, expected_sha256: str | None = None,
                 judged: dict | None = None, source: str = "cli", at: str | None = None,
                 reviewer: str | None = None, selection: str = "manual",
                 random_share: float | None = None) -> Label:
    """Record one label of the image at ``path`` (``verdict``: good, defect or skip), checked by ``check_label``.

    ``expected_sha256``: the bytes the reviewer saw; a file that changed since is refused (``ConflictError``).
    ``judged``: what the line's model said (a capture sidecar); read from ``<image>.json`` when not given.
    ``mask``: the defect region (array, PNG bytes or a file), defects only. ``at``: when the reviewer labelled
    (a label queued while the store was down keeps its time). ``reviewer``: a name the reviewer gave (the
    review page asks for one) where the store has no users; where it authenticates, the label is always the
    authenticated user's (the credentials in ``MLFLOW_TRACKING_USERNAME/PASSWORD``), and labelling needs EDIT
    on the category (``PermissionDenied``). ``selection`` / ``random_share``: how the image was chosen for review
    (``Label.selection``; the review page passes the queue's)."""
    digest, png = check_label(path, verdict, mask=mask, expected_sha256=expected_sha256)
    path = Path(path)
    ident = governance.require(category, "EDIT", f"labelling images of {model_name(category)}")
    judged = read_sidecar(path) if judged is None else judged
    now_ns = time.time_ns()
    label = Label(category=category, sha256=digest, verdict=verdict, path=str(path.resolve()),
                  user=ident.user if ident.authenticated or not reviewer else reviewer,
                  identity=ident.kind if ident.authenticated or not reviewer else REVIEWER_IDENTITY,
                  at=at or datetime.fromtimestamp(now_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds"),
                  seq=now_ns, judged_version=None if judged.get("version") is None else str(judged["version"]),
                  judged_score=_float(judged.get("score")), judged_threshold=_float(judged.get("threshold")),
                  flagged=None if judged.get("is_anomaly") is None else bool(judged["is_anomaly"]),
                  judged_at=judged.get("at"), mask=png is not None, source=source, selection=str(selection),
                  random_share=None if random_share is None else float(random_share))
    return _write(label, path, png)


def _write(label: Label, image: Path, png: bytes | None) -> Label:
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient()
    try:
        exp_id = reviews_experiment_id(label.category)
        run = client.create_run(exp_id, start_time=label.seq // 1_000_000,
                                run_name=f"{label.verdict} {label.sha256[:10]} by {label.user}",
                                tags={LABEL_TAG: "true", "adreg.category": label.category,
                                      "adreg.sha256": label.sha256, "adreg.verdict": label.verdict,
                                      "adreg.reviewer": label.user,
                                      "adreg.judged_version": label.judged_version or "-"})
        with tempfile.TemporaryDirectory() as tmp:
            if label.verdict != "skip":
                copy = Path(tmp) / ("image" + image.suffix.lower())
                shutil.copyfile(image, copy)
                client.log_artifact(run.info.run_id, str(copy))
            if png is not None:
                (Path(tmp) / MASK_ARTIFACT).write_bytes(png)
                client.log_artifact(run.info.run_id, str(Path(tmp) / MASK_ARTIFACT))
        record = {k: v for k, v in label.as_dict().items()
                  if k not in ("run_id", "image_artifact", "category", "user", "identity")}
        record["image_artifact"] = "" if label.verdict == "skip" else "image" + image.suffix.lower()
        # who, as params of their own: the adreg-auth server lets a review run record only the authenticated user
        client.log_batch(run.info.run_id, params=[Param("user", label.user), Param("identity", label.identity),
                                                  Param("record", json.dumps(record, sort_keys=True))],
                         tags=[RunTag("mlflow.note.content", f"{label.user} labelled {Path(label.path).name} "
                                                             f"{label.verdict} at {label.at}")])
        with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's URL; stdout may carry --json
            client.set_terminated(run.info.run_id)
    except MlflowException as exc:
        raise store.translate(exc, f"recording a label in {reviews_experiment_name(label.category)}") or exc from exc
    return Label(**{**label.as_dict(), "run_id": run.info.run_id, "image_artifact": record["image_artifact"]})


def _run_label(category: str, run) -> Label | None:
    try:
        record = json.loads(run.data.params["record"])
        record.update(user=run.data.params["user"], identity=run.data.params["identity"])
    except (KeyError, ValueError):
        return None  # a run whose record never arrived (writer died): no label
    fields = set(Label.__dataclass_fields__)
    return Label(category=category, run_id=run.info.run_id, **{k: v for k, v in record.items() if k in fields})


def read_labels(category: str) -> list[Label]:
    """Every label of ``category`` (empty when none was ever recorded), oldest first."""
    exp_id = reviews_experiment_id(category, create=False)
    if exp_id is None:
        return []
    client, token, out = mlflow.MlflowClient(), None, []
    try:
        while True:
            page = client.search_runs([exp_id], filter_string=f"tags.`{LABEL_TAG}` = 'true'", max_results=1000,
                                      page_token=token)
            out.extend(lab for lab in (_run_label(category, r) for r in page) if lab is not None)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        raise store.translate(exc, f"reading labels of {model_name(category)}") or exc from exc
    return sorted(out, key=lambda lab: (lab.at, lab.seq))


@dataclass
class Verdict:
    """The reviewers' verdict on one image: ``verdict`` good / defect / disputed (``skip`` labels count
    for nothing), the latest label of each reviewer in ``labels``."""

    sha256: str
    verdict: str
    labels: list[Label] = field(default_factory=list)

    @property
    def latest(self) -> Label:
        return self.labels[-1]


def consensus(labels: list[Label]) -> dict[str, Verdict]:
    """One verdict per image (by sha256): each reviewer's latest non-skip label counts; when reviewers
    disagree the image is ``disputed`` (visible, in no set)."""
    latest: dict[tuple[str, str], Label] = {}
    for lab in sorted(labels, key=lambda x: (x.at, x.seq)):
        if lab.verdict != "skip":
            latest[(lab.sha256, lab.user)] = lab
        else:
            latest.pop((lab.sha256, lab.user), None)  # a reviewer who skipped after labelling withdrew it
    per: dict[str, list[Label]] = {}
    for (sha, _), lab in latest.items():
        per.setdefault(sha, []).append(lab)
    out = {}
    for sha, labs in per.items():
        labs.sort(key=lambda x: (x.at, x.seq))
        kinds = {lab.verdict for lab in labs}
        out[sha] = Verdict(sha, kinds.pop() if len(kinds) == 1 else DISPUTED, labs)
    return out


def labels_digest(labels: list[Label]) -> str:
    """sha256 over the label records (run, image, verdict, reviewer), order-independent: names exactly the
    labels a set or an update was built from."""
    rows = sorted(f"{lab.run_id}:{lab.sha256}:{lab.verdict}:{lab.user}:{int(lab.mask)}" for lab in labels)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def evaluation_side(sha256: str, seed: int = 0, fraction: float = DEFAULT_EVAL_FRACTION) -> bool:
    """Whether a reviewed good is evaluated on (True) or grown on (False): a seeded hash of its bytes' digest,
    so an image keeps its side as more labels arrive and every reader splits the same way."""
    h = hashlib.sha256(f"adreg-review-split:{seed}:{sha256}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


@dataclass
class ProductionSet:
    """The reviewed images of a category, split (``adreg.production_set`` returns one).

    Attributes:
        samples: the evaluation side, what the gate judges on: reviewed defects (with their masks where
            drawn) and the evaluation-side goods; ``n_good`` / ``n_defective`` count them.
        grow: the grow-side goods, what ``adreg update --from-reviews`` learns from (paths).
        seed, fraction: the seeded split of reviewed goods (a hash of each image's bytes, so an image keeps
            its side as labels arrive) where no label is from the review queue's random slice.
        random_slice: True when the evaluation side is the random slice (``Label.selection == "random"``):
            goods and defects as the line makes them; ``n_chosen_defects`` counts the reviewed defects the
            queue chose actively, left out of both sides.
        digest: sha256 of what the set rests on (recorded with every gate that used it).
        n_disputed: images whose reviewers disagree (left out); ``n_masks``: defects with a drawn region.

    Examples:
        ```python
        prod = adreg.production_set("bottle")
        print(prod.describe())               # counts of each side
        print(prod.n_good, prod.n_defective, len(prod.grow))
        ```
    """

    category: str
    samples: list[Sample]
    sample_sha256: list[str]
    grow: list[Path]
    grow_sha256: list[str]
    digest: str
    seed: int
    fraction: float
    n_disputed: int
    n_masks: int
    labels: list[Label] = field(default_factory=list, repr=False)
    random_slice: bool = False  # the evaluation side is the review queue's random slice
    n_chosen_defects: int = 0  # reviewed defects the queue chose actively: in neither side
    n_excluded: int = 0  # evaluation images left out because a compared version learned from them

    @property
    def n_good(self) -> int:
        return sum(1 for s in self.samples if s.label == 0)

    @property
    def n_defective(self) -> int:
        return sum(1 for s in self.samples if s.label == 1)

    def describe(self) -> str:
        masks = f", {self.n_masks} with a drawn region" if self.n_defective else ""
        excluded = f"; {self.n_excluded} left out: learned from" if self.n_excluded else ""
        kind = "production set's random slice" if self.random_slice else "production set"
        chosen = f"; {self.n_chosen_defects} chosen defects not evaluated" if self.n_chosen_defects else ""
        return (f"{kind} ({self.n_defective} reviewed defects{masks}, {self.n_good} reviewed goods; "
                f"labels {self.digest[:12]}{chosen}{excluded})")


    def without(self, sha256s: set[str]) -> "ProductionSet":
        """This set less the evaluation images in ``sha256s`` (those a compared version learned from)."""
        keep = [i for i, sha in enumerate(self.sample_sha256) if sha not in sha256s]
        out = ProductionSet(**{**self.__dict__, "samples": [self.samples[i] for i in keep],
                               "sample_sha256": [self.sample_sha256[i] for i in keep]})
        out.n_excluded = len(self.samples) - len(keep)
        return out


def _cache_dir(category: str) -> Path:
    return store.adreg_home() / "reviews" / category


def _materialise(category: str, lab: Label, artifact: str, suffix: str) -> Path:
    """A label run's artifact (the image copy, the mask) as a file in the local content cache."""
    dst = _cache_dir(category) / f"{lab.sha256}{suffix}"
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=lab.run_id, artifact_path=artifact)
    except Exception as exc:  # noqa: BLE001 - classified
        raise store.translate(exc, f"downloading {artifact} of label run {lab.run_id}") or exc from exc
    tmp = dst.with_suffix(dst.suffix + ".part")
    shutil.copyfile(local, tmp)
    tmp.replace(dst)
    return dst


def image_file(lab: Label) -> Path:
    """The labelled image on this machine: the original when its bytes are unchanged, else the run's copy."""
    p = Path(lab.path)
    if p.is_file() and sha256_file(p) == lab.sha256:
        return p
    if not lab.image_artifact:
        raise DataError(f"the image of label {lab.run_id} is neither at {p} nor stored with the label")
    return _materialise(lab.category, lab, lab.image_artifact, Path(lab.image_artifact).suffix)


def production_set(category: str, seed: int = 0, fraction: float = DEFAULT_EVAL_FRACTION,
                   labels: list[Label] | None = None) -> ProductionSet:
    """The category's reviewed images as an evaluation set and a grow set (see the module docstring).

    Where reviewers labelled any of the review queue's random slice (``Label.selection == "random"``), the
    evaluation side is exactly that slice, goods and defects at the line's own rates, and every other reviewed
    good is grown on (actively chosen defects are left out of both: they are not a sample of the line). Without
    a random slice (labels given with ``adreg label``), it is every reviewed defect and the goods a seeded hash
    puts on the evaluation side (``fraction``)."""
    labels = read_labels(category) if labels is None else labels
    verdicts = consensus(labels)
    sliced = {sha for sha, v in verdicts.items() if any(lab.selection == "random" for lab in v.labels)}
    samples, sample_sha, grow, grow_sha, used, n_masks, n_chosen = [], [], [], [], [], 0, 0
    for sha, v in sorted(verdicts.items(), key=lambda kv: (kv[1].latest.at, kv[0])):
        if v.verdict == DISPUTED:
            continue
        lab = v.latest
        evaluated = sha in sliced if sliced else (v.verdict == "defect" or evaluation_side(sha, seed, fraction))
        if v.verdict == "defect" and not evaluated:
            n_chosen += 1
            continue
        used.extend(v.labels)
        if v.verdict == "defect":
            masked = next((x for x in reversed(v.labels) if x.mask), None)
            mask = _materialise(category, masked, MASK_ARTIFACT, ".mask.png") if masked else None
            n_masks += mask is not None
            samples.append(Sample(image_file(lab), 1, "reviewed", mask))
            sample_sha.append(sha)
        elif evaluated:
            samples.append(Sample(image_file(lab), 0, "good"))
            sample_sha.append(sha)
        else:
            grow.append(image_file(lab))
            grow_sha.append(sha)
    n_disputed = sum(1 for v in verdicts.values() if v.verdict == DISPUTED)
    return ProductionSet(category, samples, sample_sha, grow, grow_sha, labels_digest(used), seed, fraction,
                         n_disputed, n_masks, used, random_slice=bool(sliced), n_chosen_defects=n_chosen)
