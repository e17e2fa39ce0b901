"""The red team at its strongest: attacker sweeps on Ray Tune against one or more models (`sweep.py`), from an
attacker space (`space.py`, attack_spaces/*.yaml), with a capability guard, re-scoring and budget curves."""
