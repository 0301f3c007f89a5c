"""Step-level credit assignment: how much of a trajectory's final reward each denoising step earns.

Each mode is a `CreditMode` in its own module here, registered by name (`credit_mode("coca")`):

- ``sparse`` (DDPO): no step weights; every step gets the trajectory advantage.
- ``uniform`` (UCA): every step gets weight 1/T.
- ``coca`` (CoCA): a window's gain in cosine similarity between predicted and final sample.
- ``reward_gain``: a window's gain in the trained reward of the decoded predicted clean samples.

Every module of this package is imported below, so a new mode is one new module (and its tests).
Tensors only: no diffusers, no Ray.
"""

import importlib
import pkgutil

from dense_rl.algo.credit.coca import coca_step_weights, coca_step_weights_from_cosines, cosine_to_final
from dense_rl.algo.credit.registry import CreditInputs, CreditMode, credit_mode, credit_mode_names, register
from dense_rl.algo.credit.reward_gain import reward_gain_step_weights
from dense_rl.algo.credit.shaping import shape_step_rewards
from dense_rl.algo.credit.uniform import uniform_step_weights
from dense_rl.algo.credit.windows import window_boundary_steps

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CreditInputs", "CreditMode", "coca_step_weights", "coca_step_weights_from_cosines", "cosine_to_final",
           "credit_mode", "credit_mode_names", "register", "reward_gain_step_weights", "shape_step_rewards",
           "uniform_step_weights", "window_boundary_steps"]
