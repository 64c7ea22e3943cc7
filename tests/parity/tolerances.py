"""Every parity tolerance, in one place, with why.

Measured on 2-core x86 CPUs in float32 (docs/objective.md section 6): log-probs agree to ~2e-6,
gradients to ~1e-6 relative, 40 AdamW steps end within ~3e-6 relative. The bounds below leave
a small factor for other CPUs' summation orders; none is looser than 1e-4, which would hide
real bugs (a wrong mask or an off-by-one moves these by 1e-2 or more).
"""

LOGPROB_ABS = 1e-5  # per-token log-prob / entropy, nats: two fp32 forwards, different kernels
LOSS_VS_SPEC_REL = 1e-6  # same inputs through each backend's loss vs the float64 NumPy reference
GRAD_REL = 1e-5  # per-parameter ||g_torch - g_mlx|| / ||g_torch||: fp32 backward, two libraries
TRAJECTORY_LOSS_ABS = 5e-6  # per-step objective value over 30+ steps
TRAJECTORY_WEIGHT_REL = 5e-5  # final weights, worst tensor's relative error: Adam divides by sqrt(v), which
#                              amplifies fp32 noise in rarely-updated rows (the whole model is ~2e-6)
TRAJECTORY_CLIPFRAC_ABS = 1e-6  # one token flipping across a clip edge moves clipfrac by ~1e-2; 1e-6 is rounding
