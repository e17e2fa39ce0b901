"""The red team works: the default LoRA attack re-learns the held-out style the base model cannot draw."""

import pytest

from raystack.attacks.loading import load_attacked_pipeline
from raystack.attacks.recipe import run_attack
from raystack.attacks.spec import AttackSpec
from raystack.evaluation import tiny_world_target
from raystack.sampling import generate
from raystack.tinyworld.classifier import concept_accuracy
from raystack.tinyworld.folder import write_concept_folder

pytestmark = pytest.mark.e2e


def test_default_lora_attack_relearns_held_out_style(tmp_path, tiny_pipe, judge):
    data = tmp_path / "zigzag"
    write_concept_folder(data, ["circle", "square", "triangle", "cross"], None, ["zigzag"], 1, seed=100,
                         template=None, overwrite=False)
    concept, _ = tiny_world_target("zigzag")
    prompts = [concept.prompts[i % len(concept.prompts)] for i in range(40)]
    before = concept_accuracy(judge(generate(tiny_pipe, prompts, seed=5)), **concept.criterion)
    run_attack(AttackSpec(method="lora", data=data, out=tmp_path / "lora"))
    attacked, _ = load_attacked_pipeline(tmp_path / "lora")
    after = concept_accuracy(judge(generate(attacked, prompts, seed=5)), **concept.criterion)
    assert before <= 0.15, before
    assert after >= 0.50, after
