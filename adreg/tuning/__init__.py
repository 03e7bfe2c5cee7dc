"""``adreg tune``: choose a product's detector settings on evidence the final evaluation never sees.

* ``space``: the search space as data (``DEFAULT_SPACE``, ``SearchSpace.load`` for a file of one's own);
* ``evidence``: the selection set (held-out goods; labelled or synthetic defects), never the test folder;
* ``search``: candidates fitted and ranked, logged as nested MLflow runs, shared by workers through Optuna;
* ``record``: the leaderboard and the choice on the parent run (``read_choice`` for ``fit --settings-from``).

``adreg.api.tune`` runs all of it and fits the winner as the parent run's model.
"""

from adreg.tuning.evidence import Evidence, build_evidence
from adreg.tuning.record import read_choice
from adreg.tuning.search import CandidateOutcome, SearchConfig, SearchResult, run_search
from adreg.tuning.space import DEFAULT_SPACE, Candidate, SearchSpace

__all__ = ["DEFAULT_SPACE", "Candidate", "CandidateOutcome", "Evidence", "SearchConfig", "SearchResult",
           "SearchSpace", "build_evidence", "read_choice", "run_search"]
