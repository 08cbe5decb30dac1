"""Few-shot comparisons of meta-learning methods: task sources, the runner, reports (``lcp-meta fewshot``/``demo``)."""
from .config import FewShotConfig
from .defaults import DEFAULT_METHODS
from .runner import run_fewshot

__all__ = ["DEFAULT_METHODS", "FewShotConfig", "run_fewshot"]
