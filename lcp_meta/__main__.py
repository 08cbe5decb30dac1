"""``python -m lcp_meta ...``: the ``lcp-meta`` command line; also the entry point under torchrun::

    torchrun --standalone --nproc_per_node 2 -m lcp_meta fewshot --task sinusoid --methods lcp --out DIR

Under torchrun each rank joins the process group when its run starts (``lcp_meta.distributed.setup``)
and leaves it here; without torchrun this is exactly ``lcp-meta``.
"""
import sys

from . import distributed
from .cli import main

try:
    code = main()
finally:
    distributed.shutdown()
sys.exit(code)
