"""The reward library users import holds rewards only: no fault-injection hook in its call, no import of
the system package (fault injection is the reward role's, dense_rl.system.roles.reward)."""

import inspect

from dense_rl.rewards import WeightedRewards
from support.imports import import_graph


def test_weighted_rewards_take_images_and_prompts_only():
    assert list(inspect.signature(WeightedRewards.__call__).parameters) == ["self", "images", "prompts"]


def test_no_reward_module_imports_the_system_or_its_fault_injection():
    top, nested, _ = import_graph()
    imported = {target for module in top if module.startswith("dense_rl.rewards")
                for target in top[module] | nested[module]}
    assert imported and not {target for target in imported if target.startswith("dense_rl.system")}
    roles = top["dense_rl.system.roles.reward"] | nested["dense_rl.system.roles.reward"]
    assert "dense_rl.system.faults" in roles  # where the reward faults of the reliability tests strike now
