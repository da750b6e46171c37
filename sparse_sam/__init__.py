"""sparse_sam: zero-forget domain adaptation with sparse additive weight modifications."""
from . import backends, reference

__version__ = "0.1.0"
