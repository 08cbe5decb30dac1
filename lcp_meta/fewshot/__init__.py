"""Few-shot comparisons of meta-learning methods: task sources, the runner, reports (``lcp-meta fewshot``/``demo``)."""
from .runner import DEFAULT_METHODS, FewShotConfig, run_fewshot

__all__ = ["DEFAULT_METHODS", "FewShotConfig", "run_fewshot"]
