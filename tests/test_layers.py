"""The package's layers (README, "Where the code is"): every import points down them, none runs in a
cycle, and Ray and diffusers stay where they belong."""

import pytest

from support.imports import find_cycle, import_graph, modules

# Bottom to top. A module may import its own package and the layers below it; a command, anything.
LAYERS = ["dense_rl", "dense_rl.models", "dense_rl.algo", "dense_rl.rewards", "dense_rl.config",
          "dense_rl.diffusion", "dense_rl.run", "dense_rl.training", "dense_rl.system"]
COMMANDS = ["dense_rl.launch", "dense_rl.evaluate", "dense_rl.export", "dense_rl.runs", "dense_rl.bench", "dense_rl.models.tiny.train"]


def layer_of(module: str) -> int:
    """Index into LAYERS (the longest match), or len(LAYERS) for a command."""
    if any(module == c or module.startswith(c + ".") for c in COMMANDS):
        return len(LAYERS)
    matches = [i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")]
    return max(matches, key=lambda i: len(LAYERS[i]))


def test_every_module_is_in_a_layer_or_a_command():
    names = modules()
    assert "dense_rl.algo.credit.coca" in names and "dense_rl.system.roles.learner" in names  # the parser sees the package
    loose = [name for name in names if layer_of(name) == 0 and name != "dense_rl"]
    assert not loose, f"modules at the top of the package that are not commands: {loose}"


def test_imports_only_point_down_the_layers():
    top, nested, _ = import_graph()
    upward = [f"{module} -> {target}" for module in top for target in top[module] | nested[module]
              if layer_of(target) > layer_of(module)]
    assert not upward, upward


def test_the_package_has_no_import_cycle():
    top, nested, _ = import_graph()
    assert find_cycle(top) is None, " -> ".join(find_cycle(top))
    # Imports inside functions too: a cycle deferred to call time is still a cycle of ownership.
    everything = {name: top[name] | nested[name] for name in top}
    assert find_cycle(everything) is None, " -> ".join(find_cycle(everything))


@pytest.mark.parametrize("package", ["ray", "diffusers"])
def test_the_algorithm_imports_neither_ray_nor_diffusers(package):
    _, _, packages = import_graph()
    assert not [name for name, found in packages.items() if name.startswith("dense_rl.algo") and package in found]


def test_ray_is_imported_only_by_the_system_and_the_commands():
    _, _, packages = import_graph()
    users = sorted(name for name, found in packages.items() if "ray" in found)
    assert users and all(layer_of(name) >= LAYERS.index("dense_rl.system") for name in users), users
