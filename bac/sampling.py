"""A fused sampler step: diffusers' ``scheduler.step`` with its per-step scalar work done once, up front.

In a cached batch-1 policy call the model is cheap, and diffusers' step, mostly tiny operations on 0-dim
tensors that depend on the step index only, is a large share of the call. :class:`FusedSampler` does that
work when it is built; its trajectories' :meth:`~FusedTrajectory.step` does only the sample-sized
operations and is bit-identical to ``scheduler.step(...).prev_sample``. The supported schedulers and why
the result is bit-identical: docs/guide/core.md ("The fused sampler step").

Use::

    scheduler.set_timesteps(K)
    sampler = FusedSampler(scheduler)          # reads the scheduler's arrays and config once; read-only after
    trajectory = sampler.start()               # per sampling call: DPM-Solver's previous x0 lives here
    for i, t in enumerate(sampler.timesteps):
        x = trajectory.step(i, model(x, t), x, generator=g)

Calls running at the same time (threads sharing one sampler) each take their own trajectory.

Layout: per scheduler kind, a builder (``_ddpm_plan``, ``_ddim_plan``, ``_dpm_plan``, ``_flow_plan``)
turns the scheduler into a *plan*, one ``(step function, coefficients)`` entry per step index, and pure
step functions ``fn(coefficients, model_output, sample, generator, trajectory)`` do the sample-sized work.
A trajectory's step is one plan lookup and one call.
"""
from __future__ import annotations

try:
    import diffusers  # noqa: F401  (the core installs without it)
except ModuleNotFoundError as err:
    raise ModuleNotFoundError(f"bac.sampling needs diffusers: pip install 'bac[diffusers]' ({err})") from err

import inspect
import warnings
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from bac.errors import ConfigError

__all__ = ["DrawnNoise", "FusedSampler", "FusedTrajectory", "draw_noise"]

#: ``fn(coefficients, model_output, sample, generator, trajectory) -> prev_sample``
StepFunction = Callable[[tuple, torch.Tensor, torch.Tensor, Any, "FusedTrajectory"], torch.Tensor]
#: One entry per step index: the step function and the coefficients it is called with.
StepPlan = list[tuple[StepFunction, tuple]]

ANY = None  # a config field whose value the fused step handles whatever it is (it only shapes the arrays)
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_BETAS = {f: ANY for f in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                           "timestep_spacing", "steps_offset", "rescale_betas_zero_snr")}
_UNUSED_WITHOUT_THRESHOLDING = {"dynamic_thresholding_ratio": ANY, "sample_max_value": ANY}

# Per scheduler class: each __init__ field -> ANY or the values the fused step implements. A field of
# __init__ missing here (a newer diffusers) is refused rather than guessed at.
_SUPPORTED_FIELDS: dict[type, dict[str, tuple | None]] = {
    DDPMScheduler: {
        **_BETAS, **_UNUSED_WITHOUT_THRESHOLDING,
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
        "clip_sample": ANY, "clip_sample_range": ANY,
        "prediction_type": _PREDICTIONS,
        "thresholding": (False,),
    },
    DDIMScheduler: {
        **_BETAS, **_UNUSED_WITHOUT_THRESHOLDING,
        "clip_sample": ANY, "clip_sample_range": ANY, "set_alpha_to_one": ANY,
        "prediction_type": _PREDICTIONS,
        "thresholding": (False,),
    },
    DPMSolverMultistepScheduler: {
        **_BETAS, **_UNUSED_WITHOUT_THRESHOLDING,
        "solver_order": (1, 2),
        "prediction_type": _PREDICTIONS,
        "thresholding": (False,),
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "lower_order_final": ANY, "euler_at_final": ANY,
        "use_karras_sigmas": ANY, "use_exponential_sigmas": ANY, "use_beta_sigmas": ANY, "use_lu_lambdas": ANY,
        "use_flow_sigmas": (False,),
        "flow_shift": ANY, "use_dynamic_shifting": ANY, "time_shift_type": ANY,  # act through flow sigmas only
        "final_sigmas_type": ("zero", "sigma_min"),
        "lambda_min_clipped": ANY,
        "variance_type": (None,),
    },
    FlowMatchEulerDiscreteScheduler: {
        f: ANY for f in ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                         "base_image_seq_len", "max_image_seq_len", "invert_sigmas", "shift_terminal",
                         "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type",
                         "stochastic_sampling")
    },
}

_DDIM_ETA = 0.0  # DDIMScheduler.step's default eta: the deterministic sampler


# -- checks and helpers shared by the kinds ---------------------------------------------------------
def _check_config(scheduler: Any) -> None:
    cls = type(scheduler)
    supported = _SUPPORTED_FIELDS[cls]
    fields = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for field in fields:  # keys of config outside __init__ (from_config of another class) are ignored by diffusers too
        value = scheduler.config.get(field)
        if field not in supported:
            raise ConfigError(f"FusedSampler: {cls.__name__} config field {field}={value!r} is unknown to the fused "
                              f"step (written for diffusers 0.42); use scheduler.step")
        allowed = supported[field]
        if allowed is not ANY and value not in allowed:
            raise ConfigError(f"FusedSampler: {cls.__name__} {field}={value!r} is not supported; "
                              f"supported: {', '.join(repr(a) for a in allowed)}")


class DrawnNoise:
    """Noise drawn before the call, handed out in order where a step would draw from a generator: pass it as
    a trajectory step's ``generator``. A traced call (:mod:`bac.graphs`) takes its noise as an input this way,
    so the graph holds no random number generator and stays seeded by its caller."""

    __slots__ = ("_noise", "_next")

    def __init__(self, noise: torch.Tensor):
        self._noise, self._next = noise, 0  # [draws, *sample shape]

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if self._next >= self._noise.shape[0]:
            raise ConfigError(f"DrawnNoise: a step needs noise draw {self._next + 1}, but only "
                              f"{self._noise.shape[0]} were given (FusedSampler.noise_draws says how many)")
        value = self._noise[self._next]
        self._next += 1
        if tuple(value.shape) != tuple(shape):
            raise ConfigError(f"DrawnNoise: drawn noise has shape {list(value.shape)}, the step needs {list(shape)}")
        return value.to(dtype, copy=True)  # the step writes into its draw


def draw_noise(shape, generator, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The draw a step makes from ``generator`` (what :class:`DrawnNoise` replaces), the same values."""
    return _noise(shape, generator, device, dtype)


def _noise(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' ``randn_tensor(shape, generator=generator, device=device, dtype=dtype)``, the same draw.

    Where ``randn_tensor`` makes exactly one ``torch.randn(shape, generator, device, dtype)`` call (no
    generator, or one generator on that device, on a CPU or CUDA device), that call is made directly
    (its checks cost more than the draw on a tiny sample); anything else goes to ``randn_tensor``.
    """
    if isinstance(generator, DrawnNoise):
        return generator.take(shape, dtype)
    if device.type in ("cpu", "cuda") and (generator is None or (type(generator) is torch.Generator
                                                                and generator.device == device)):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _clip_range(cfg: Any) -> float | None:
    """DDPM's and DDIM's ``clip_sample_range`` where they clip the predicted x0, else None."""
    return cfg.clip_sample_range if (not cfg.thresholding and cfg.clip_sample) else None


def _sigma_steps(s: Any) -> int:
    """The step count of a sigma-based scheduler (DPM-Solver, flow matching), checked to start at step 0."""
    name = type(s).__name__
    if getattr(s, "num_inference_steps", None) is None:
        raise ConfigError(f"FusedSampler: {name}.num_inference_steps is None; call set_timesteps first")
    k = len(s.timesteps)
    if len(s.sigmas) != k + 1:
        raise ConfigError(f"FusedSampler: {name} has {len(s.sigmas)} sigmas for {k} timesteps; expected {k + 1}")
    first = _first_index(s)
    if first != 0:
        raise ConfigError(f"FusedSampler: {name} would start its trajectory at step index {first} (begin_index "
                          f"or a repeated first timestep); the fused step starts at 0")
    return k


def _first_index(scheduler: Any) -> int:
    """The step index DPM-Solver and FlowMatchEuler give their first ``step``, as ``_init_step_index`` does."""
    if scheduler.begin_index is not None:
        return scheduler.begin_index
    try:
        return scheduler.index_for_timestep(scheduler.timesteps[0].to(scheduler.timesteps.device))
    except IndexError:  # FlowMatchEuler: the first timestep is not in its own schedule (NaN)
        raise ConfigError(f"FusedSampler: {type(scheduler).__name__}'s first timestep {scheduler.timesteps[0]!r} is "
                          f"not found in its own schedule; diffusers' step would fail too") from None


# -- DDPM -------------------------------------------------------------------------------------------
def _ddpm_plan(s: DDPMScheduler) -> StepPlan:
    cfg = s.config
    if s.variance_type != cfg.variance_type:
        raise ConfigError(f"FusedSampler: DDPMScheduler.variance_type={s.variance_type!r} differs from its "
                          f"config's {cfg.variance_type!r}")
    clip = _clip_range(cfg)
    fn = {"epsilon": _ddpm_epsilon, "sample": _ddpm_sample, "v_prediction": _ddpm_v}[cfg.prediction_type]
    plan = []
    for t in s.timesteps:  # the 0-dim tensors a `for t in scheduler.timesteps` loop passes to step
        # DDPMScheduler.step, steps 1, 2 and 4, verbatim.
        prev_t = s.previous_timestep(t)
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        sqrt_alpha, sqrt_beta = alpha_prod_t ** (0.5), beta_prod_t ** (0.5)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        plan.append((fn, (sqrt_alpha, sqrt_beta, clip, x0_coeff, sample_coeff, _ddpm_std(s, t))))
    return plan


def _ddpm_std(s: DDPMScheduler, t: torch.Tensor) -> torch.Tensor | None:
    """DDPMScheduler.step, step 6: the noise's std for t > 0 (fixed_small_log's _get_variance is the std already)."""
    if t <= 0:  # the last step adds no noise
        return None
    std = s._get_variance(t, predicted_variance=None)
    return std if s.variance_type == "fixed_small_log" else std ** 0.5


def _ddpm_finish(x: torch.Tensor, std, model_output: torch.Tensor, generator) -> torch.Tensor:
    """DDPM's ``x + variance``: x is a fresh tensor of the step's result dtype and shape."""
    if std is None:
        return x.add_(0)  # diffusers adds the int 0 (turns -0.0 into 0.0)
    noise = _noise(model_output.shape, generator, model_output.device, model_output.dtype)
    return x.add_(torch.mul(std, noise, out=noise))  # variance = std * noise


def _ddpm_epsilon(c, model_output, sample, generator, trajectory):
    sqrt_alpha, sqrt_beta, clip, x0_coeff, sample_coeff, std = c
    x = sample - sqrt_beta * model_output  # fresh, result dtype/shape of both inputs: in place from here
    x.div_(sqrt_alpha)
    if clip is not None:
        x.clamp_(-clip, clip)
    torch.mul(x0_coeff, x, out=x).add_(sample_coeff * sample)
    return _ddpm_finish(x, std, model_output, generator)


def _ddpm_sample(c, model_output, sample, generator, trajectory):
    _, _, clip, x0_coeff, sample_coeff, std = c
    if clip is not None:
        x0 = model_output.clamp(-clip, clip)
        torch.mul(x0_coeff, x0, out=x0)
    else:
        x0 = x0_coeff * model_output
    x = x0 + sample_coeff * sample  # out of place: x0 has model_output's dtype only
    return _ddpm_finish(x, std, model_output, generator)


def _ddpm_v(c, model_output, sample, generator, trajectory):
    sqrt_alpha, sqrt_beta, clip, x0_coeff, sample_coeff, std = c
    x = sqrt_alpha * sample - sqrt_beta * model_output
    if clip is not None:
        x.clamp_(-clip, clip)
    torch.mul(x0_coeff, x, out=x).add_(sample_coeff * sample)
    return _ddpm_finish(x, std, model_output, generator)


# -- DDIM (eta = 0) ---------------------------------------------------------------------------------
def _ddim_plan(s: DDIMScheduler) -> StepPlan:
    if getattr(s, "num_inference_steps", None) is None:
        raise ConfigError("FusedSampler: DDIMScheduler.num_inference_steps is None; call set_timesteps first")
    clip = _clip_range(s.config)
    fn = {"epsilon": _ddim_epsilon, "sample": _ddim_sample, "v_prediction": _ddim_v}[s.config.prediction_type]
    plan = []
    for t in s.timesteps:
        # DDIMScheduler.step, steps 1, 2, 5, 6 and 7, verbatim, with eta = 0.0.
        prev_timestep = t - s.config.num_train_timesteps // s.num_inference_steps
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else s.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        variance = s._get_variance(t, prev_timestep)
        std_dev_t = _DDIM_ETA * variance ** (0.5)
        direction_coeff = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
        x0_coeff = alpha_prod_t_prev ** (0.5)
        plan.append((fn, (alpha_prod_t ** (0.5), beta_prod_t ** (0.5), clip, x0_coeff, direction_coeff)))
    return plan


def _ddim_epsilon(c, model_output, sample, generator, trajectory):
    sqrt_alpha, sqrt_beta, clip, x0_coeff, direction_coeff = c
    x = sample - sqrt_beta * model_output
    x.div_(sqrt_alpha)
    if clip is not None:
        x.clamp_(-clip, clip)
    return torch.mul(x0_coeff, x, out=x).add_(direction_coeff * model_output)


def _ddim_sample(c, model_output, sample, generator, trajectory):
    sqrt_alpha, sqrt_beta, clip, x0_coeff, direction_coeff = c
    eps = sample - sqrt_alpha * model_output  # from the unclipped x0 = model_output, as diffusers does
    torch.mul(direction_coeff, eps.div_(sqrt_beta), out=eps)  # the direction
    if clip is not None:
        x0 = model_output.clamp(-clip, clip)
        torch.mul(x0_coeff, x0, out=x0)
    else:
        x0 = x0_coeff * model_output
    return torch.add(x0, eps, out=eps)  # x0 + direction into eps, which has the result dtype


def _ddim_v(c, model_output, sample, generator, trajectory):
    sqrt_alpha, sqrt_beta, clip, x0_coeff, direction_coeff = c
    x0 = sqrt_alpha * sample - sqrt_beta * model_output
    eps = sqrt_alpha * model_output + sqrt_beta * sample
    if clip is not None:
        x0.clamp_(-clip, clip)
    return torch.mul(x0_coeff, x0, out=x0).add_(torch.mul(direction_coeff, eps, out=eps))


# -- DPM-Solver++ multistep (orders 1 and 2) --------------------------------------------------------
def _dpm_plan(s: DPMSolverMultistepScheduler) -> StepPlan:
    cfg = s.config
    k = _sigma_steps(s)
    plan = []
    for j in range(k):  # j is the scheduler's step_index
        # DPMSolverMultistepScheduler.step: which update it takes at this step_index.
        lower_order_final = (j == k - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and k < 15) or cfg.final_sigmas_type == "zero")
        lower_order_second = (j == k - 2) and cfg.lower_order_final and k < 15
        lower_order_nums = min(j, cfg.solver_order)
        alpha_j, sigma_j = s._sigma_to_alpha_sigma_t(s.sigmas[j])  # convert_model_output's coefficients
        x0_coeffs = (j, cfg.prediction_type, alpha_j, sigma_j)
        if cfg.solver_order == 1 or lower_order_nums < 1 or lower_order_final:
            plan.append((_dpm_first, x0_coeffs + _dpm_first_order_coefficients(s, j)))
        elif cfg.solver_order == 2 or lower_order_nums < 2 or lower_order_second:
            fn = _dpm_midpoint if cfg.solver_type == "midpoint" else _dpm_heun
            plan.append((fn, x0_coeffs + _dpm_second_order_coefficients(s, j)))
        else:  # unreachable: solver_order is checked to be 1 or 2
            raise ConfigError(f"FusedSampler: DPMSolverMultistepScheduler solver_order={cfg.solver_order!r} is not supported")
    return plan


def _dpm_first_order_coefficients(s: DPMSolverMultistepScheduler, j: int) -> tuple:
    """dpm_solver_first_order_update's, verbatim: x_t = a*sample - b*D0."""
    conv = s._sigma_to_alpha_sigma_t
    sigma_t, sigma_s = s.sigmas[j + 1], s.sigmas[j]
    alpha_t, sigma_t = conv(sigma_t)
    alpha_s, sigma_s = conv(sigma_s)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    h = lambda_t - lambda_s
    return sigma_t / sigma_s, alpha_t * (torch.exp(-h) - 1.0)


def _dpm_second_order_coefficients(s: DPMSolverMultistepScheduler, j: int) -> tuple:
    """multistep_dpm_solver_second_order_update's, verbatim: x_t = a*sample - b*D0 -/+ c*D1."""
    conv = s._sigma_to_alpha_sigma_t
    sigma_t, sigma_s0, sigma_s1 = s.sigmas[j + 1], s.sigmas[j], s.sigmas[j - 1]
    alpha_t, sigma_t = conv(sigma_t)
    alpha_s0, sigma_s0 = conv(sigma_s0)
    alpha_s1, sigma_s1 = conv(sigma_s1)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    if s.config.solver_type == "midpoint":  # x_t = a*sample - b*D0 - c*D1
        d1_coeff = 0.5 * (alpha_t * (torch.exp(-h) - 1.0))
    else:  # heun: x_t = a*sample - b*D0 + c*D1
        d1_coeff = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
    return sigma_t / sigma_s0, alpha_t * (torch.exp(-h) - 1.0), 1.0 / r0, d1_coeff


def _dpm_x0(prediction, alpha, sigma, model_output, sample):
    """convert_model_output for dpmsolver++."""
    if prediction == "epsilon":
        x0 = sample - sigma * model_output
        return x0.div_(alpha)
    if prediction == "sample":
        return model_output
    return alpha * sample - sigma * model_output  # v_prediction


def _dpm_first(c, model_output, sample, generator, trajectory):
    j, prediction, alpha_j, sigma_j, sample_coeff, d0_coeff = c
    x0 = _dpm_x0(prediction, alpha_j, sigma_j, model_output, sample)
    trajectory.prev_x0, trajectory.last = x0, j
    sample = sample.to(torch.float32)
    prev = sample_coeff * sample - d0_coeff * x0
    return prev.to(x0.dtype)


def _dpm_second(c, model_output, sample, trajectory):
    """The second-order update up to its last operation: (a*sample - b*D0, c*D1, the result dtype)."""
    j, prediction, alpha_j, sigma_j, sample_coeff, d0_coeff, inv_r0, d1_coeff = c
    if trajectory.last != j - 1:
        raise RuntimeError(f"FusedTrajectory.step({j}) follows step({trajectory.last}); DPM-Solver's steps run "
                           f"in order from 0 in one trajectory (sampler.start())")
    m0, m1 = _dpm_x0(prediction, alpha_j, sigma_j, model_output, sample), trajectory.prev_x0
    trajectory.prev_x0, trajectory.last = m0, j
    d1 = m0 - m1
    torch.mul(inv_r0, d1, out=d1)  # D1 = (1.0 / r0) * (m0 - m1)
    torch.mul(d1_coeff, d1, out=d1)
    sample = sample.to(torch.float32)
    return sample_coeff * sample - d0_coeff * m0, d1, m0.dtype


def _dpm_midpoint(c, model_output, sample, generator, trajectory):
    prev, d1, dtype = _dpm_second(c, model_output, sample, trajectory)
    return (prev - d1).to(dtype)


def _dpm_heun(c, model_output, sample, generator, trajectory):
    prev, d1, dtype = _dpm_second(c, model_output, sample, trajectory)
    return (prev + d1).to(dtype)


# -- FlowMatchEuler ---------------------------------------------------------------------------------
def _flow_plan(s: FlowMatchEulerDiscreteScheduler) -> StepPlan:
    k = _sigma_steps(s)
    plan = []
    for j in range(k):
        sigma, sigma_next = s.sigmas[j], s.sigmas[j + 1]
        if s.config.stochastic_sampling:
            plan.append((_flow_stochastic, (sigma, sigma_next, 1.0 - sigma_next)))
        else:
            plan.append((_flow_euler, (sigma_next - sigma,)))
    return plan


def _flow_euler(c, model_output, sample, generator, trajectory):
    (dt,) = c
    return (sample.to(torch.float32) + dt * model_output).to(model_output.dtype)


def _flow_stochastic(c, model_output, sample, generator, trajectory):
    sigma, sigma_next, keep = c
    sample = sample.to(torch.float32)
    x0 = sample - sigma * model_output
    noise = _noise(sample.shape, generator, sample.device, sample.dtype)
    torch.mul(keep, x0, out=x0)  # (1 - s') * x0 + s' * noise
    return x0.add_(torch.mul(sigma_next, noise, out=noise)).to(model_output.dtype)


# -- the sampler and its trajectories ---------------------------------------------------------------
_PLAN_BUILDERS: dict[type, Callable[[Any], StepPlan]] = {
    DDPMScheduler: _ddpm_plan,
    DDIMScheduler: _ddim_plan,
    DPMSolverMultistepScheduler: _dpm_plan,
    FlowMatchEulerDiscreteScheduler: _flow_plan,
}


def _alpha_scales(s: Any) -> list[tuple]:
    """DDPM/DDIM ``add_noise`` at each timestep: (sqrt(alpha_bar), sqrt(1 - alpha_bar)), as diffusers computes them."""
    alphas = s.alphas_cumprod.to(dtype=torch.float32)
    return [(alphas[t] ** 0.5, (1 - alphas[t]) ** 0.5) for t in s.timesteps]


def _dpm_scales(s: Any) -> list[tuple]:
    return [tuple(s._sigma_to_alpha_sigma_t(s.sigmas[j])) for j in range(len(s.timesteps))]


def _flow_scales(s: Any) -> list[tuple]:
    return [(1.0 - s.sigmas[j], s.sigmas[j]) for j in range(len(s.timesteps))]


def _alpha_x0(s: Any) -> list[tuple]:
    return [(s.config.prediction_type, a, b) for a, b in _alpha_scales(s)]


def _dpm_x0_coefficients(s: Any) -> list[tuple]:
    return [(s.config.prediction_type, a, b) for a, b in _dpm_scales(s)]


def _flow_x0(s: Any) -> list[tuple]:
    return [("v_prediction", 1.0, s.sigmas[j]) for j in range(len(s.timesteps))]  # x0 = x - sigma * velocity


_NOISE_SCALES = {DDPMScheduler: _alpha_scales, DDIMScheduler: _alpha_scales, DPMSolverMultistepScheduler: _dpm_scales,
                 FlowMatchEulerDiscreteScheduler: _flow_scales}
_X0_COEFFICIENTS = {DDPMScheduler: _alpha_x0, DDIMScheduler: _alpha_x0, DPMSolverMultistepScheduler: _dpm_x0_coefficients,
                    FlowMatchEulerDiscreteScheduler: _flow_x0}


def _draws_noise(fn: StepFunction, c: tuple) -> bool:
    if fn in (_ddpm_epsilon, _ddpm_sample, _ddpm_v):
        return c[5] is not None  # the std; None at the last step
    return fn is _flow_stochastic


class FusedTrajectory:
    """One sampling call of a :class:`FusedSampler`: what :meth:`FusedSampler.start` returns.

    It holds the call's own state (DPM-Solver's previous data prediction and the last step index), so
    calls running at the same time, each with its own trajectory, share only the sampler's coefficients.
    """

    __slots__ = ("_plan", "prev_x0", "last", "begin")

    def __init__(self, plan: StepPlan, begin: int = 0):
        self._plan = plan
        self.prev_x0: torch.Tensor | None = None
        self.last = begin - 1
        self.begin = begin

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """``scheduler.step(model_output, timesteps[i], sample, generator=generator).prev_sample``, bit for bit."""
        fn, c = self._plan[i]
        return fn(c, model_output, sample, generator, self)


class FusedSampler:
    """``scheduler.step`` fused from coefficients precomputed once.

    ``FusedSampler(scheduler)`` takes a supported diffusers scheduler (DDPM, DDIM with eta 0, DPM-Solver++
    orders 1-2, flow-matching Euler; anything else is a :class:`bac.errors.ConfigError` naming the field,
    docs/guide/core.md lists them) on which ``set_timesteps`` has been called. ``timesteps`` (the
    scheduler's tensor, for the model calls) and ``num_steps``; :meth:`start` returns a new
    :class:`FusedTrajectory` for each sampling call, whose ``step`` runs for ``i = 0 .. num_steps - 1`` in order.

    The sampler holds only coefficients, read and never written after it is built, so threads may share
    it, each with its own trajectory. The schedule is a snapshot: after ``set_timesteps`` with other
    arguments, build a new sampler. Inputs are never modified and the returned sample is a new tensor;
    like the scheduler, DPM-Solver's trajectory keeps a reference to the previous step's data prediction
    (for ``prediction_type="sample"`` the model output itself: don't modify it in place before the next step).
    """

    def __init__(self, scheduler: Any):
        build = _PLAN_BUILDERS.get(type(scheduler))
        if build is None:
            raise ConfigError(f"FusedSampler: scheduler {type(scheduler).__name__} is not supported; supported: "
                              f"{', '.join(c.__name__ for c in _PLAN_BUILDERS)}")
        _check_config(scheduler)
        self.kind = type(scheduler).__name__
        self.timesteps: torch.Tensor = scheduler.timesteps
        self.num_steps = len(self.timesteps)
        if self.num_steps < 1:
            raise ConfigError(f"FusedSampler: {self.kind} has no timesteps; call set_timesteps first")
        # 0-dim coefficient tensors, kept where the scheduler keeps them (the CPU): on CUDA, dividing by them
        # would round differently (docs/guide/core.md, "The fused sampler step")
        self._plan: StepPlan = build(scheduler)
        #: how many noise draws one sampling call's steps make (DDPM's steps before the last; stochastic flow)
        self.noise_draws = sum(_draws_noise(fn, c) for fn, c in self._plan)
        self._current = FusedTrajectory(self._plan)  # only for the deprecated FusedSampler.step
        # A warm start (a trajectory begun at step i > 0): where the sample entering step i lies between the
        # data and the noise (add_noise's coefficients), and how a step's model output predicts the data.
        self._noise_scales = _NOISE_SCALES[type(scheduler)](scheduler)
        self._x0_coefficients = _X0_COEFFICIENTS[type(scheduler)](scheduler)
        # DPM-Solver's first step of a trajectory is first order: a trajectory begun at i > 0 takes it there
        self._first_steps = ([(_dpm_first, c[:4] + _dpm_first_order_coefficients(scheduler, j))
                              for j, (_, c) in enumerate(self._plan)] if type(scheduler) is DPMSolverMultistepScheduler
                             else None)
        self._begun: dict[int, StepPlan] = {0: self._plan}

    def __repr__(self) -> str:
        return f"FusedSampler({self.kind}, num_steps={self.num_steps})"

    def start(self, begin: int = 0) -> FusedTrajectory:
        """A new trajectory (one sampling call's state), independent of every other, whose steps run for
        ``i = begin .. num_steps - 1``. ``begin > 0`` is a warm start (the sample entering step ``begin``:
        :meth:`noised`): bit for bit diffusers' steps after ``scheduler.set_begin_index(begin)`` (DPM-Solver
        takes a first-order step there, as its first step of any trajectory)."""
        plan = self._begun.get(begin)
        if plan is None:
            if isinstance(begin, bool) or not isinstance(begin, int) or not 0 <= begin < self.num_steps:
                raise ConfigError(f"FusedSampler: a trajectory begins at a step index in [0, {self.num_steps - 1}], "
                                  f"got {begin!r}")
            plan = list(self._plan)
            if self._first_steps is not None:
                plan[begin] = self._first_steps[begin]
            self._begun[begin] = plan  # the same value whichever thread builds it first
        trajectory = FusedTrajectory(plan, begin)
        self._current = trajectory  # only for the deprecated step(); another thread may replace it at once
        return trajectory

    def noised(self, i: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The sample entering step ``i`` for data ``x0`` and Gaussian ``noise``: the scheduler's own forward
        process at that step (DDPM/DDIM ``add_noise`` at ``timesteps[i]``, DPM-Solver ``add_noise`` at
        sigma ``i``, flow matching ``scale_noise``), what a trajectory begun at ``i`` starts from."""
        data_scale, noise_scale = self._noise_scales[i]
        return data_scale * x0 + noise_scale * noise

    def predict_x0(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The data (clean sample) the model output at step ``i`` on ``sample`` predicts (no clipping)."""
        prediction, sample_scale, output_scale = self._x0_coefficients[i]
        if prediction == "sample":
            return model_output
        if prediction == "epsilon":
            return (sample - output_scale * model_output) / sample_scale
        return sample_scale * sample - output_scale * model_output  # v-prediction; flow: x - sigma * v

    def scales(self, i: int) -> tuple[float, float]:
        """``(data_scale, noise_scale)`` of the sample entering step ``i``: ``x = data_scale * x0 +
        noise_scale * noise`` (what :meth:`noised` computes), as Python floats."""
        return tuple(float(v) for v in self._noise_scales[i])

    def shift_output(self, i: int, model_output: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
        """The model output at step ``i`` whose data prediction (:meth:`predict_x0`, on the same sample) is
        moved by ``change``: how a guidance term on the data enters the sampler's own step, whatever the
        model predicts (noise, data, velocity)."""
        prediction, sample_scale, output_scale = self._x0_coefficients[i]
        if prediction == "sample":
            return model_output + change
        if prediction == "epsilon":  # x0 = (x - b * eps) / a
            return model_output - change * (sample_scale / output_scale)
        return model_output - change / output_scale  # v-prediction and flow: x0 = a * x - b * v

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """Deprecated: the step of the trajectory the last :meth:`start` made (not safe across threads)."""
        warnings.warn("FusedSampler.step is deprecated: use trajectory = sampler.start(); trajectory.step(...)",
                      DeprecationWarning, stacklevel=2)
        return self._current.step(i, model_output, sample, generator)
