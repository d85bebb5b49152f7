"""Near-duplicates of upstream training images in downstream test sets (BiT paper §4.5, Table 6, Appendix D).

- `bit-dedup` / `python -m dedup` (`dedup.cli`): the command line; one run is `dedup.job.run_dedup`.
- `dedup.features`: L2-normalised pre-logit features of a BiT model, cached per source and model.
- `dedup.search`: exact cosine nearest neighbours in bounded memory (torch, or faiss when asked).
- `dedup.calibration`: the threshold, calibrated with planted near-duplicates, and their recall.
- `finetune.duplicates` (below this package, so bit-finetune reads it too): `duplicates.json` and Table 6.
"""

from .calibration import NEAR_DUPLICATE_KINDS, calibrate, measure
from .features import DEFAULT_MODEL, FeatureModel, load_feature_model
from .job import DedupJob, DedupResult, run_dedup
from .search import ExactCosineSearch, FaissSearch

__all__ = [
    "DEFAULT_MODEL",
    "NEAR_DUPLICATE_KINDS",
    "DedupJob",
    "DedupResult",
    "ExactCosineSearch",
    "FaissSearch",
    "FeatureModel",
    "calibrate",
    "load_feature_model",
    "measure",
    "run_dedup",
]
