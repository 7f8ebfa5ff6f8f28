"""An example third-party forkcore plugin: strategy `weighted_rendezvous`.

Installed next to forkcore, it registers through the entry point `example` of group
`forkcore` (see `plugin.py`); select it with `strategy = "weighted_rendezvous"`.
"""

from .strategy import WeightedRendezvous, weighted_rendezvous

__all__ = ["WeightedRendezvous", "weighted_rendezvous"]
