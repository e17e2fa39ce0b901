"""The red team: what a malicious user runs to teach a released model a concept.

`spec.py` says what an attack is, `methods.py` holds one class per adaptation method (also the
inner problem of IMMA), `recipe.py` runs one attack end to end, `loading.py` rebuilds an attacked
pipeline for evaluation.
"""

from .spec import METHODS, AttackSpec  # noqa: F401
