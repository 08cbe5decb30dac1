"""Measuring the memory autograd keeps for the meta-gradient (device independent).

``torch.func`` transforms refuse ``saved_tensors_hooks``, so instead of hooking saves we walk the
autograd graph that exists when the meta-gradient is taken and add up the tensors its nodes saved for
backward (:func:`graph_saved_bytes`).  This is the memory that grows linearly with the number of
unrolled inner steps in MAML; LCP, iMAML, FOMAML, Reptile and contrastive meta-learning run their
inner dynamics without any graph (only transient single-step graphs inside ``torch.func.grad``).
Methods report it as ``MetaStats.extra["graph_bytes"]``.
"""
from __future__ import annotations

import torch

__all__ = ["graph_saved_bytes"]


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without storage (wrappers): count their elements
        return id(t), t.numel() * t.element_size()


def graph_saved_bytes(output: torch.Tensor) -> int:
    """Bytes of the tensors saved for backward in the autograd graph behind ``output`` (each storage
    counted once; 0 when ``output`` has no graph)."""
    seen_nodes, seen_storage, total = set(), set(), 0
    stack = [output.grad_fn] if output.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                val = getattr(node, name)
            except RuntimeError:  # already freed
                continue
            for t in (val if isinstance(val, (tuple, list)) else (val,)):
                if isinstance(t, torch.Tensor):
                    key, n = _storage_key(t)
                    if key not in seen_storage:
                        seen_storage.add(key)
                        total += n
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return total
