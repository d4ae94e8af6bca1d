"""Seeding: the first full copy of a VM travels by disk instead of the network.

- `link`: link a hand-made copy (a snapshot exported and imported on the target by hand) to a
  job, with Xen Orchestra `xo-cr-seed`'s arguments; our keys, or theirs with ``--xo``.
- `manifest`: what a seed directory holds and how it is checked.
- `export` / `load`: the two-command seed, `xencr seed export` and `xencr seed import`.
"""
