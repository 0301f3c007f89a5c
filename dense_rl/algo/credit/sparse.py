"""``sparse`` (DDPO): no step credit; every step is trained with the trajectory's advantage."""

from dense_rl.algo.credit.registry import CreditMode, register

SPARSE = register(CreditMode("sparse", step_weights=None))
