"""`saescope train`'s machinery; the verb itself is jobs/train.py, on top of this package.

Imports point one way (tests/test_layering.py checks it, TYPE_CHECKING imports included),
from the top down:

- ``transcoders``: ``--transcoder`` sets (uses ``transcoder_eval``, ``start``, ``match``);
- ``grid``: the shared batch loop of a grid's SAEs, its progress and table (uses ``start``, ``results``);
- ``start``: a fresh or resumed SAE ready to train (a ``Member``);
- ``results``: ``TrainSummary``;
- ``config``: ``TrainJobConfig``, its "auto" values, a grid's members;
- ``values``, ``match``, ``transcoder_eval``: helpers that import nothing from the package.

No module here imports jobs.train.
"""
