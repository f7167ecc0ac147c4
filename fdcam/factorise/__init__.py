"""Exact shortcuts for the switch passes: the tail split at its first linear op and at its final Linear.

A switch pass runs the tail on A ⊙ m for a channel mask m. When the tail's first operation is linear
in the masked features, its pre-activation for m is

    z(m) = Σ_k m_k C_k + b,

C_k the contribution of channel k alone, and only what follows the first non-linearity has to run
per mask. `match` recognises the first op and the last Linear in a tail's fx graph (`tail_shortcut`),
`shortcut` is the module that runs the passes that way (`TailShortcut`, `ShortcutGraph` for export),
and `sparse` describes 0/1 mask rows by their few ones or few zeros for the gathered sums.
"""

from .match import tail_shortcut
from .shortcut import GATHER_SHARE, ShortcutGraph, TailShortcut, expand_rows, shortcut_passes
from .sparse import fits_sparse, max_group_size, sparse_rows

__all__ = [
    "GATHER_SHARE",
    "ShortcutGraph",
    "TailShortcut",
    "expand_rows",
    "fits_sparse",
    "max_group_size",
    "shortcut_passes",
    "sparse_rows",
    "tail_shortcut",
]
