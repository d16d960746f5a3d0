"""Zoos: a manifest (:mod:`~soup_core.zoo.manifest`), its checkpoints and evaluator
(:mod:`~soup_core.zoo.zoo`), and the points of weight space they name (:mod:`~soup_core.zoo.points`).

Sample zoos and user zoos are the same thing: the built-in ones are ordinary manifests in the
``sample_data`` package.

>>> from soup_core.zoo import open_zoo, sample_zoos
>>> sorted(sample_zoos())
['code-lm', 'digits-bn', 'digits-finetune', 'digits-scratch', 'digits-soup']
"""

from soup_core.errors import ZooError
from soup_core.zoo.manifest import (
                                    ALLOWED_ROOTS_ENV,
                                    BASE,
                                    CheckpointEntry,
                                    Manifest,
                                    allowed_roots_from_env,
                                    read_manifest,
                                    sample_root,
                                    sample_zoos,
                                    within_roots,
)
from soup_core.zoo.points import make_soup, zoo_plane, zoo_point
from soup_core.zoo.zoo import Zoo, open_zoo

__all__ = ["ALLOWED_ROOTS_ENV", "BASE", "CheckpointEntry", "Manifest", "Zoo", "ZooError", "allowed_roots_from_env",
           "make_soup", "open_zoo", "read_manifest", "sample_root", "sample_zoos", "within_roots", "zoo_plane",
           "zoo_point"]
