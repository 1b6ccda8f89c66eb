"""The named choices a user picks from: samplers, autocast precisions, image channels; each written here only.

A module with no imports, so that ``resdiff.config`` (which checks a config's choices against these names)
loads without torch or diffusers. The things the names stand for live where they are used:
``resdiff.diffusion.make_sampler`` builds the scheduler, ``resdiff.hardware.MIXED_PRECISIONS`` holds the dtypes.
"""

__all__ = ["SAMPLERS", "STOCHASTIC_SAMPLERS", "PRECISIONS", "IMAGE_CHANNELS", "EMA_SIGMA_REL_MAX", "TIMESTEP_SAMPLING"]

# Samplers by name: the diffusers scheduler's class name, its default step count and fixed settings.
SAMPLERS: dict[str, tuple[str, int, dict]] = {
    # Ancestral sampling of Ho et al. on 50 of the timesteps (--steps 1000: the paper's full chain). Fresh noise at
    # every step corrects part of a model's errors: on real images (bench/contenders.py) it beats DDIM at 50 steps
    # on both sets, so it is sample.py's default (resdiff.settings.SamplingSettings).
    "ddpm": ("DDPMScheduler", 50, {}),
    "ddim": ("DDIMScheduler", 50, {}),  # Song et al.; eta=0 is deterministic
    "dpm++": ("DPMSolverMultistepScheduler", 20, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # Probability-flow ODE solvers: a ResNet block's residual update is a forward-Euler step of an ODE,
    # and these integrate the diffusion's ODE the same way (Euler) or with a second-order correction (Heun).
    "euler": ("EulerDiscreteScheduler", 50, {}),
    "heun": ("HeunDiscreteScheduler", 50, {}),
    # Built for few steps: UniPC (Zhao et al. 2023, predictor-corrector, order 2), DPM-Solver++(3M) (Lu et al. 2022),
    # and the SDE variant of DPM-Solver++(2M), which adds fresh noise at each step as ancestral DDPM does. (Karras or
    # exponential noise levels are not offered: on the cosine schedule sigma_max is in the thousands, and 20 such
    # levels fall on a handful of repeated timesteps.)
    "unipc": ("UniPCMultistepScheduler", 20, {"solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", 20, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpm++sde": ("DPMSolverMultistepScheduler", 20, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
}

# The samplers that draw fresh noise at each step (an image then depends on the noise of every step, drawn from the
# image's own generator); the others are deterministic given the initial noise (interpolation needs one of those).
STOCHASTIC_SAMPLERS = ("ddpm", "dpm++sde")

# The autocast precisions (--mixed-precision, train.mixed_precision): name -> torch dtype name (None: fp32).
PRECISIONS: dict[str, str | None] = {"no": None, "fp16": "float16", "bf16": "bfloat16"}

# How training draws its timesteps (diffusion.timestep_sampling; resdiff.diffusion.GaussianDiffusion.draw_timesteps).
TIMESTEP_SAMPLING = ("uniform", "laplace")

# The channel counts of the images resdiff reads, trains on and writes: grayscale or RGB.
IMAGE_CHANNELS = (1, 3)

# The widest power-function EMA (train.ema_sigma_rel, EDM2): gamma = 0, a uniform average of the whole run, has
# sigma_rel 1/sqrt(12) = 0.289; anything wider needs gamma < 0, which weights the first steps the most.
EMA_SIGMA_REL_MAX = 0.28
