"""Bridges to third-party meta-learning libraries (all optional).

- :mod:`lcp_meta.adapters.l2l`: an LCP learner with learn2learn's ``clone()`` / ``adapt()`` workflow,
  batches from learn2learn ``TaskDataset`` s, and runtime fixes for learn2learn 0.2.0.
- :mod:`lcp_meta.adapters.higher_compat`: higher's functional models as lcp_meta models, and higher's
  MAML meta-gradient (the cross-check of our built-in MAML).
- :mod:`lcp_meta.adapters.torchmeta_compat`: a runtime patch that makes torchmeta 1.8.0 work on torch 2.x,
  and torchmeta batch dicts as :class:`lcp_meta.meta.TaskBatch`.

Importing this package imports none of those libraries (nor does ``import lcp_meta``).
``higher_compat`` and ``torchmeta_compat`` import their library and raise ``ImportError`` with the install
command when it is missing; ``l2l.LCPLearner`` needs no learn2learn (only ``l2l.task_batch`` does).  Install all
three with ``bash scripts/install_adapters.sh`` (see ``docs/adapters.md``).
"""

__all__: list = []
