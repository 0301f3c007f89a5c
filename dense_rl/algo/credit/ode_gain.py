"""``ode_gain`` (DenseGRPO's credit, arXiv 2601.20218): a window's gain in the trained reward of the clean
image its boundary leads to. The state before each window's first step is completed to a clean image by
deterministic (ODE) steps to the end and scored by the trained reward; window j earns R_{j+1} - R_j, as in
``reward_gain``, but R_j is the reward of where the trajectory would end without more noise rather than of
the model's one-step guess. It costs sum_j (T - j w) extra denoiser calls per trajectory (50 for T = 20,
w = 5: 2.5 times the sampling's own) and T/w reward evaluations.
"""

from dense_rl.algo.credit.registry import CreditMode, register
from dense_rl.algo.credit.reward_gain import boundary_gain_step_weights

ODE_GAIN = register(CreditMode("ode_gain", step_weights=boundary_gain_step_weights, windowed=True, boundaries="ode"))
