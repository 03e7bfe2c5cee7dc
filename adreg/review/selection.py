"""Which captures a reviewer sees first: the review queue's strategies, each capture with its reason.

A reviewer's time is the loop's scarce resource. Three strategies order one category's captures
(``adreg review --strategy``, ``adreg.review(strategy=...)``):

* ``informative`` (the default): flagged captures nearest the threshold first (``score / threshold`` closest
  to 1: the line's least certain alarms, where false alarms are), alternating with the passed captures the
  version covers least (the capture's ``novelty``: the mean of its anomaly map over the threshold, the
  method's own distance from what it learned: RAD / kNN nearest-bank distance, SubspaceAD residual). The
  passed ones go through a k-center (farthest-first) step on the captures' pooled backbone embeddings: a
  capture's priority is the smaller of its novelty and its distance to the captures already placed before it
  (in units of the pool's median pairwise distance), so a batch of near-duplicates is shown once, and its
  twins come late, marked "like one shown above".
* ``newest``: flagged captures newest first, then a seeded sample (``sample_rate``) of the passed ones.
* ``random``: every capture in a seeded random order.

**The random slice.** Actively chosen images are not a sample of the line, so figures computed on them are
biased (the queue looks for the line's hardest images). Under every strategy, a seeded share
(``random_share``) of all captures, flagged or not, is the *random slice*: chosen by a hash of the capture's
path and the seed, whatever it looks like, and placed at every ``round(1 / random_share)``-th position so every
round of reviews holds its share. A label given to such a capture records ``selection = "random"`` and the
share (``adreg.registry.labels``); the production set's evaluation side, ``adreg quality`` and the threshold
from the line read only those labels, where there are any.

Reasons (``REASONS``): what the page shows on each tile. The signals come from the capture's sidecar
(``adreg.pyfunc.capture``: score, threshold, novelty, embedding); a capture without them (written by hand,
or scored without signals) ranks by ``score / threshold`` alone and is never treated as a duplicate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from adreg.errors import DataError
from adreg.review.cache import BoundedCache

if TYPE_CHECKING:  # numpy is imported on use: the CLI's parser reads this module's constants
    import numpy as np

STRATEGIES = ("informative", "newest", "random")
DEFAULT_STRATEGY = "informative"
DEFAULT_RANDOM_SHARE = 0.2
REASONS = {
    "random": "random check",
    "threshold": "near the threshold",
    "novel": "least like anything learned",
    "duplicate": "like one shown above",
    "newest": "flagged, newest first",
    "sample": "passed sample",
    "shuffled": "random order",
}
KCENTER_POOL = 1000  # passed captures that go through the k-center step (the rest follow by novelty)
DUPLICATE_SHARE = 0.5  # placed at under half its novelty because of one placed before: "like one shown above"


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise DataError(f"review strategy {strategy!r} is one of {', '.join(STRATEGIES)}")
    return strategy


def check_share(share: float) -> float:
    share = float(share)
    if not 0.0 <= share <= 1.0:
        raise DataError(f"random share {share} is not between 0 and 1")
    return share


def _unit(key: str) -> float:
    h = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def sampled(rel: str, rate: float, seed: int = 0) -> bool:
    """Whether a passed capture is in the ``newest`` strategy's sample: a seeded hash of its path below ``rate``."""
    return _unit(f"adreg-review-sample:{seed}:{rel}") < rate


def in_random_slice(rel: str, share: float, seed: int = 0) -> bool:
    """Whether the capture at ``rel`` (its path below the category's folder) is in the random slice."""
    return _unit(f"adreg-review-slice:{seed}:{rel}") < share


@dataclass(frozen=True)
class Signals:
    """What a capture's sidecar says about it, for ranking: ``ratio`` = score / threshold, ``novelty`` =
    novelty / threshold (falls back to ``ratio``), ``embedding`` (unit vector or None)."""

    ratio: float
    novelty: float
    embedding: np.ndarray | None


_signal_cache: BoundedCache[Signals] = BoundedCache()


def signals(entry) -> Signals:
    """The ranking signals of a queue entry (``adreg.review.queue.Entry``), cached by path: a capture's sidecar
    is written once with its image and never changes (a capture whose sidecar is not written yet is read again
    next time)."""
    from adreg.pyfunc.capture import decode_embedding

    key = str(entry.path)
    got = _signal_cache.get(key)
    if got is not None:
        return got
    side = entry.load_sidecar()
    score, threshold, novelty = (_number(side.get(k)) for k in ("score", "threshold", "novelty"))
    ratio = score / threshold if score is not None and threshold else float("nan")
    got = Signals(ratio, novelty / threshold if novelty is not None and threshold else ratio,
                  decode_embedding(side.get("embedding")))
    if not side:  # the image is written before its sidecar: do not remember a half-written capture
        return got
    return _signal_cache.put(key, got)


def _number(value) -> float | None:
    import numpy as np

    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def k_center(novelty: np.ndarray, embeddings: Sequence[np.ndarray | None]) -> tuple[list[int], list[bool]]:
    """Farthest-first order of a pool: each step places the capture whose priority, min(novelty, distance to
    every capture placed so far / the pool's median pairwise distance), is largest. Returns (order, for each
    placed capture whether a capture placed before it halved its priority or more: a near-duplicate).

    ``novelty`` is scaled to at most 1 first; captures without an embedding keep their novelty."""
    import numpy as np

    n = len(novelty)
    if n == 0:
        return [], []
    nov = np.nan_to_num(np.asarray(novelty, dtype=np.float64), nan=0.0)
    nov = nov / nov.max() if nov.max() > 0 else np.ones(n)
    has = np.array([e is not None for e in embeddings])
    priority = nov.copy()
    dim = next((len(e) for e in embeddings if e is not None), 0)
    if has.sum() >= 2 and all(e is None or len(e) == dim for e in embeddings):
        emb = np.zeros((n, dim), np.float32)
        emb[has] = np.stack([e for e in embeddings if e is not None])
        sample = emb[has][:256]
        pair = np.sqrt(np.maximum(2 - 2 * sample @ sample.T, 0))
        scale = float(np.median(pair[np.triu_indices(len(sample), 1)])) or 1.0
    else:
        has[:] = False
        emb, scale = None, 1.0
    placed = np.zeros(n, bool)
    order, duplicate = [], []
    for _ in range(n):
        i = int(np.argmax(np.where(placed, -np.inf, priority)))
        placed[i] = True
        order.append(i)
        duplicate.append(bool(priority[i] < DUPLICATE_SHARE * nov[i]))
        if has[i]:
            d = np.sqrt(np.maximum(2 - 2 * emb @ emb[i], 0)) / scale
            priority = np.where(has, np.minimum(priority, d), priority)
    return order, duplicate


def _interleave(random_part: list, chosen: list, share: float) -> list:
    """``chosen`` with the next of ``random_part`` at every round(1/share)-th position (1-based); whichever
    list runs out first, the other continues."""
    every = max(1, round(1 / share)) if share > 0 else 0
    out, ri, ci = [], 0, 0
    while ri < len(random_part) or ci < len(chosen):
        slot = every and (len(out) + 1) % every == 0
        if ri < len(random_part) and (slot or ci >= len(chosen)):
            out.append(random_part[ri])
            ri += 1
        else:
            out.append(chosen[ci])
            ci += 1
    return out


def _alternate(first: list, second: list) -> list:
    out = []
    for i in range(max(len(first), len(second))):
        out.extend(x[i] for x in (first, second) if i < len(x))
    return out


def order(entries: list, strategy: str = DEFAULT_STRATEGY, *, sample_rate: float = 0.1, seed: int = 0,
          random_share: float = DEFAULT_RANDOM_SHARE) -> list[tuple[object, str]]:
    """``(entry, reason key)`` for the captures a reviewer sees, in the order the strategy puts them (see the
    module doc). ``entries``: ``adreg.review.queue.Entry`` s of one category."""
    import numpy as np

    check_strategy(strategy)
    share = check_share(random_share)
    newest = sorted(entries, key=lambda e: e.sort_key, reverse=True)
    in_slice = [e for e in newest if in_random_slice(e.rel, share, seed)]
    in_slice.sort(key=lambda e: _unit(f"adreg-review-slice-order:{seed}:{e.rel}"))
    sliced = {id(e) for e in in_slice}
    rest = [e for e in newest if id(e) not in sliced]
    random_part = [(e, "random") for e in in_slice]
    if strategy == "random":
        rest.sort(key=lambda e: _unit(f"adreg-review-shuffle:{seed}:{e.rel}"))
        return _interleave(random_part, [(e, "shuffled") for e in rest], share)
    flagged = [e for e in rest if e.verdict == "flagged"]
    passed = [e for e in rest if e.verdict != "flagged"]
    if strategy == "newest":
        chosen = [(e, "newest") for e in flagged] + [(e, "sample") for e in passed
                                                       if sampled(e.rel, sample_rate, seed)]
        return _interleave(random_part, chosen, share)
    # informative
    def closeness(e):
        r = signals(e).ratio
        return (np.isnan(r), abs(np.log(r)) if r > 0 else np.inf, e.rel)
    flagged.sort(key=closeness)
    sig = {id(e): signals(e) for e in passed}
    passed.sort(key=lambda e: (-np.nan_to_num(sig[id(e)].novelty, nan=-np.inf), e.rel))
    pool, tail = passed[:KCENTER_POOL], passed[KCENTER_POOL:]
    idx, dup = k_center(np.array([sig[id(e)].novelty for e in pool]), [sig[id(e)].embedding for e in pool])
    ranked = [(pool[i], "duplicate" if d else "novel") for i, d in zip(idx, dup)] + [(e, "novel") for e in tail]
    return _interleave(random_part, _alternate([(e, "threshold") for e in flagged], ranked), share)


#: a passed capture below this normal percentile of the version that judged it is learned without review
COVERED_PERCENTILE = 50.0


def covered_goods(entries: list, version: str, *, seed: int = 0, random_share: float = DEFAULT_RANDOM_SHARE,
                  below: float = COVERED_PERCENTILE) -> list:
    """The passed captures among ``entries`` (``adreg.review.queue.Entry`` s) that ``version`` judged and scored
    below its median normal image (``normal_percentile`` < ``below``): goods the version already covers,
    learned without a person's review (``adreg update --covered-from``, ``ReviewQueue.covered``). The random
    slice is never among them: its images stay unlearned so their labels can evaluate. Oldest first."""
    out = []
    for e in sorted(entries, key=lambda e: e.sort_key):
        if e.verdict != "ok" or in_random_slice(e.rel, random_share, seed):
            continue
        side = e.load_sidecar()
        pct = _number(side.get("normal_percentile"))
        if str(side.get("version")) == str(version) and pct is not None and pct < below:
            out.append(e)
    return out


#: at most this many captures in a "same as this" group
GROUP_SIZE = 8


def similar(entries: list, anchor, k: int = GROUP_SIZE, *, seed: int = 0,
            random_share: float = DEFAULT_RANDOM_SHARE, exclude: set[str] = frozenset()) -> list:
    """The ``k`` passed captures nearest ``anchor`` (pooled embeddings), for a "same as this" group: offered
    after a reviewer confirms a flagged capture good, labelled with one key. Only the nearer half of the passed
    captures qualify (distance at most the median), never the random slice (its images are labelled one by
    one), never ``anchor`` itself or a path in ``exclude`` (labelled ones); empty when the anchor has no
    embedding. Nearest first."""
    import numpy as np

    target = signals(anchor).embedding
    if target is None:
        return []
    scored = []
    for e in entries:
        if e.verdict != "ok" or str(e.path) == str(anchor.path) or str(e.path) in exclude \
                or in_random_slice(e.rel, random_share, seed):
            continue
        emb = signals(e).embedding
        if emb is not None and emb.shape == target.shape:
            scored.append((float(np.linalg.norm(emb - target)), e.rel, e))
    if not scored:
        return []
    limit = float(np.median([d for d, _, _ in scored]))
    return [e for d, _, e in sorted(scored, key=lambda t: t[:2]) if d <= limit][:k]
