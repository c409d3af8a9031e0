"""Re-identification attacks (importing this package registers the built-in kinds: ``trained.py``,
``edge.py``, ``recognizer.py``) and their library: the contrastive encoder, its loss and training engines.

The kinds, by what the attacker has (docs/attacks.md):

- ``contrastive``: (anonymized, original) pairs of the anonymizer's own training split (the paper's attack);
- ``surrogate``: query access only, trained on its own identity-disjoint ``aux`` identities;
- ``edge``: no access: a training-free match of edge maps;
- ``edge-encoder``: no access: an encoder that sees only edge maps, trained on originals;
- ``recognizer``: an off-the-shelf face recognizer (dlib, ArcFace, FaceNet from local weights).
"""

from anonrisk.attack import edge, recognizer, trained  # noqa: F401  (register the built-in kinds)
from anonrisk.attack.base import ATTACKS, Attack, AttackContext

__all__ = ["ATTACKS", "Attack", "AttackContext"]
