import numpy as np
import pytest

from raystack.metrics import rsgr, set_similarity, sgr


def test_sgr_hand_computed():
    # M(x_r, x_A) = 0.8 (attack without hardening), M(x_r, x_I) = 0.2 (with hardening)
    assert sgr(0.8, 0.2) == pytest.approx(0.75)
    assert sgr(0.5, 0.5) == 0.0
    assert sgr(0.4, 0.6) == pytest.approx(-0.5)  # hardening helped the attacker: negative


def test_rsgr_hand_computed():
    # other concepts unchanged by hardening (0.9), target images changed a lot (0.3)
    assert rsgr(0.9, 0.3) == pytest.approx(2 / 3)
    assert rsgr(0.6, 0.6) == 0.0


def test_set_similarity_is_mean_pairwise_cosine():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    # pairs: 1, sqrt(.5), 0, sqrt(.5) -> mean (1 + 2 sqrt(.5)) / 4
    assert set_similarity(a, b) == pytest.approx((1 + 2 * np.sqrt(0.5)) / 4)
    assert set_similarity(a, a) == pytest.approx(0.5)


def test_crossed_matrix_pivots_runs():
    from raystack.evaluation import crossed_matrix

    runs = {
        "a": {"attack": "lora", "hardening": None, "target_accuracy": 0.9},
        "b": {"attack": "lora", "hardening": {"method": "imma", "against": "lora"}, "target_accuracy": 0.1,
              "model": "/m/imma"},
        "c": {"attack": "dreambooth", "hardening": {"method": "imma", "against": "lora"}, "target_accuracy": 0.4,
              "model": "/m/imma"},
        "d": {"attack": None, "hardening": None, "target_accuracy": 0.0},
    }
    assert crossed_matrix(runs) == {"none": {"lora": 0.9}, "lora": {"lora": 0.1, "dreambooth": 0.4}}


def test_crossed_matrix_names_a_robust_release_by_its_pool():
    """A robust release (`harden --attacker-space`) records the drawn pool, a dict, as what it was hardened
    against; the matrix must name it (evaluate crashed on it after scoring every run)."""
    from raystack.evaluation import crossed_matrix

    pool = {"attacker_space": "../spaces/narrow_lora.yaml", "restart": 0.0,
            "pool": [{"method": "lora", "lr": 3e-3}, {"method": "lora", "lr": 1e-3}]}
    runs = {"r": {"attack": "lora", "hardening": {"method": "imma", "against": pool}, "target_accuracy": 0.2,
                  "model": "/m/robust"},
            "s": {"attack": "full", "hardening": {"method": "imma", "against": pool}, "target_accuracy": 0.5,
                  "model": "/m/robust"}}
    assert crossed_matrix(runs) == {"pool of 2 from narrow_lora.yaml": {"lora": 0.2, "full": 0.5}}


def test_crossed_matrix_keeps_the_original_apart_from_a_mask_release():
    """The demo's two runs: the same full fine-tune of the original and of a FreezeAsGuard release (which
    simulates no attacker: `against` null). The release used to be filed under 'none' and overwrite the
    original's 0.375 with its own 0.042."""
    from raystack.evaluation import crossed_matrix

    fag = {"method": "freezeasguard", "against": None, "frozen_ratio": 0.3}
    runs = {"original": {"attack": "full", "hardening": None, "target_accuracy": 0.375, "model": "/tiny-sd"},
            "hardened": {"attack": "full", "hardening": fag, "target_accuracy": 0.0417, "model": "/runs/hardened",
                         "mask": "/runs/hardened/freeze_mask.safetensors"},
            "ignores_mask": {"attack": "full", "hardening": fag, "target_accuracy": 0.458, "model": "/runs/hardened"}}
    assert crossed_matrix(runs) == {"none": {"full": 0.375}, "freezeasguard (mask kept)": {"full": 0.0417},
                                    "freezeasguard": {"full": 0.458}}
    # two unhardened models, and two runs of one method on one model: every number keeps its own cell
    runs = {"a": {"attack": "lora", "hardening": None, "target_accuracy": 0.1, "model": "/x/one"},
            "b": {"attack": "lora", "hardening": None, "target_accuracy": 0.2, "model": "/x/two"},
            "c": {"attack": "lora", "hardening": None, "target_accuracy": 0.3, "model": "/x/one"}}
    assert crossed_matrix(runs) == {"none": {"lora": 0.1, "lora (c)": 0.3}, "none (two)": {"lora": 0.2}}
