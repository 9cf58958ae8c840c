"""Flow samplers as pure step functions: DPM-Solver++ (2M, flow sigmas) and flow-matching Euler.

Both follow diffusers step for step with the Sana scheduler config (docs/reference-model.md §1.4, §3.3):

* ``"dpm"``: ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``, ``flow_prediction``,
  ``dpmsolver++``, midpoint, ``final_sigmas_type="zero"`` and ``lower_order_final`` (the
  first and the last step are first order, the last one lands on the data prediction);
  the model sees integer (truncated) timesteps.
* ``"euler"``: ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)``; float timesteps.

Usage (the pipeline owns the loop; nothing here keeps hidden state)::

    sampler = get_sampler("dpm")
    plan = sampler.plan(config, num_steps)
    state = sampler.initial_state(plan)
    for i, t in enumerate(plan.timesteps):
        velocity = model(latents, t)
        latents, state = sampler.step(plan, state, i, latents, velocity)

The grid and the step coefficients are computed once in numpy (``plan``); the
state math runs in float32 whatever the latent dtype, and each step returns
latents in the dtype it was given.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple, Union

import mlx.core as mx
import numpy as np

@dataclass(frozen=True)
class SchedulerConfig:
    """The diffusers scheduler settings that change the flow samplers (defaults: Sana's).

    Settings with no effect on flow sigmas (betas, ``timestep_spacing``,
    ``lambda_min_clipped``, ...) are not kept; settings this module does not
    implement are kept so that :func:`dpm_solver_plan` can refuse them.
    """

    num_train_timesteps: int = 1000
    flow_shift: float = 3.0
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    prediction_type: str = "flow_prediction"
    use_flow_sigmas: bool = True
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False
    thresholding: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_dynamic_shifting: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "SchedulerConfig":
        """From a diffusers ``scheduler_config.json`` dict; unknown keys are ignored."""
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in fields})


# --------------------------------------------------------------------------- DPM-Solver++


@dataclass(frozen=True)
class DPMSolverPlan:
    """Grid and per-step coefficients of a DPM-Solver++ (flow) run of ``num_steps``.

    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]`` with the data prediction
    ``x0 = x - sigmas[i] * v``:
    first order  ``x' = sample_coefficients[i] * x + data_coefficients[i] * x0``;
    second order adds ``correction_coefficients[i] * (x0 - previous x0)``.
    """

    sigmas: tuple[float, ...]  # num_steps + 1 values (float32-exact); the last is 0
    timesteps: tuple[int, ...]  # what the model sees: int(sigma * num_train_timesteps)
    sample_coefficients: tuple[float, ...]  # sigma_t / sigma_s
    data_coefficients: tuple[float, ...]  # alpha_t * (1 - exp(-h))
    correction_coefficients: tuple[float, ...]  # data_coefficient / (2 r0); 0 where unused
    first_order_only: tuple[bool, ...]  # steps forced to first order (lower_order_final)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class DPMSolverState:
    """The previous step's data prediction (float32), ``None`` before the first step."""

    previous_data_prediction: mx.array | None = None


def _check_dpm_solver_config(config: SchedulerConfig) -> None:
    unsupported = []
    if config.algorithm_type != "dpmsolver++":
        unsupported.append(f"algorithm_type={config.algorithm_type!r}")
    if config.prediction_type != "flow_prediction":
        unsupported.append(f"prediction_type={config.prediction_type!r}")
    if not config.use_flow_sigmas:
        unsupported.append("use_flow_sigmas=False")
    if config.final_sigmas_type != "zero":
        unsupported.append(f"final_sigmas_type={config.final_sigmas_type!r}")
    if config.solver_order not in (1, 2):
        unsupported.append(f"solver_order={config.solver_order}")
    if config.solver_order == 2 and config.solver_type != "midpoint":
        unsupported.append(f"solver_type={config.solver_type!r}")
    for flag in ("thresholding", "use_karras_sigmas", "use_exponential_sigmas",
                 "use_beta_sigmas", "use_lu_lambdas", "use_dynamic_shifting"):
        if getattr(config, flag):
            unsupported.append(f"{flag}=True")
    if unsupported:
        raise ValueError("unsupported DPM-Solver settings: " + ", ".join(unsupported))


def dpm_solver_grid(config: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float32 [N+1] ending in 0, integer timesteps [N]) as diffusers' ``set_timesteps``:
    ``sigma = flip(shift*s / (1 + (shift-1)*s))[:-1]`` with ``s = 1 - linspace(1, 1/T, N+1)``,
    timesteps truncated from the float64 sigmas."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    train_steps = config.num_train_timesteps
    shift = config.flow_shift
    unshifted = 1.0 - np.linspace(1.0, 1.0 / train_steps, num_steps + 1)
    sigmas = np.flip(shift * unshifted / (1.0 + (shift - 1.0) * unshifted))[:-1]
    timesteps = (sigmas * train_steps).astype(np.int64)
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
    return sigmas, timesteps


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (flow)."""
    return float(np.log(1.0 - sigma) - np.log(sigma))


def dpm_solver_plan(config: SchedulerConfig, num_steps: int) -> DPMSolverPlan:
    _check_dpm_solver_config(config)
    sigmas32, timesteps = dpm_solver_grid(config, num_steps)
    sigmas = [float(s) for s in sigmas32]

    sample_coefficients, data_coefficients, corrections, first_order_only = [], [], [], []
    for i in range(num_steps):
        sigma_s, sigma_t = sigmas[i], sigmas[i + 1]
        alpha_s, alpha_t = 1.0 - sigma_s, 1.0 - sigma_t
        exp_minus_h = (sigma_t * alpha_s) / (alpha_t * sigma_s)  # = exp(-(lambda_t - lambda_s))
        data_coefficient = alpha_t * (1.0 - exp_minus_h)
        is_last = i == num_steps - 1
        lower_order_final = is_last and (
            config.euler_at_final
            or (config.lower_order_final and num_steps < 15)
            or config.final_sigmas_type == "zero"
        )
        first_only = config.solver_order == 1 or i == 0 or lower_order_final
        correction = 0.0
        if not first_only:
            h = _log_snr(sigma_t) - _log_snr(sigma_s)
            h_previous = _log_snr(sigma_s) - _log_snr(sigmas[i - 1])
            # midpoint: + (1/2) * data_coefficient * D1, D1 = (x0 - previous x0) / r0, r0 = h_previous / h
            correction = 0.5 * data_coefficient * h / h_previous
        sample_coefficients.append(sigma_t / sigma_s)
        data_coefficients.append(data_coefficient)
        corrections.append(correction)
        first_order_only.append(first_only)

    return DPMSolverPlan(
        sigmas=tuple(sigmas),
        timesteps=tuple(int(t) for t in timesteps),
        sample_coefficients=tuple(sample_coefficients),
        data_coefficients=tuple(data_coefficients),
        correction_coefficients=tuple(corrections),
        first_order_only=tuple(first_order_only),
    )


def dpm_solver_initial_state(plan: DPMSolverPlan) -> DPMSolverState:
    return DPMSolverState()


def dpm_solver_step(
    plan: DPMSolverPlan,
    state: DPMSolverState,
    step_index: int,
    latents: mx.array,
    velocity: mx.array,
) -> tuple[mx.array, DPMSolverState]:
    """One DPM-Solver++ step from ``sigmas[step_index]``: first order on the first
    step (no history) and on ``first_order_only`` steps, second-order midpoint otherwise."""
    sample = latents.astype(mx.float32)
    data_prediction = sample - plan.sigmas[step_index] * velocity.astype(mx.float32)
    updated = (
        plan.sample_coefficients[step_index] * sample
        + plan.data_coefficients[step_index] * data_prediction
    )
    previous = state.previous_data_prediction
    if previous is not None and not plan.first_order_only[step_index]:
        updated = updated + plan.correction_coefficients[step_index] * (data_prediction - previous)
    return updated.astype(latents.dtype), DPMSolverState(previous_data_prediction=data_prediction)


# --------------------------------------------------------------------------- flow Euler


@dataclass(frozen=True)
class EulerPlan:
    """Grid of a flow-matching Euler run: ``x' = x + (sigmas[i+1] - sigmas[i]) * v``."""

    sigmas: tuple[float, ...]  # num_steps + 1 float32-exact values; the last is 0
    timesteps: tuple[float, ...]  # sigma * num_train_timesteps in float32 (not rounded)
    step_sizes: tuple[float, ...]  # sigmas[i+1] - sigmas[i], in float32

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


@dataclass(frozen=True)
class EulerState:
    """Euler keeps no history."""


def euler_grid(config: SchedulerConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas float32 [N+1] ending in 0, float32 timesteps [N]) as diffusers'
    ``FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=flow_shift)``:
    the shifted training table gives sigma_max and sigma_min, the inference grid is
    linear between them in timestep units and is shifted once more."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if config.use_dynamic_shifting:
        raise ValueError("use_dynamic_shifting is not supported")
    train_steps = config.num_train_timesteps
    shift = config.flow_shift
    shift32 = np.float32(shift)
    train_sigmas = np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1] / np.float32(train_steps)
    train_sigmas = shift32 * train_sigmas / (np.float32(1) + (shift32 - np.float32(1)) * train_sigmas)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])

    timesteps = np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_steps)
    sigmas = timesteps / train_steps
    sigmas = (shift * sigmas / (1.0 + (shift - 1.0) * sigmas)).astype(np.float32)
    timesteps = sigmas * np.float32(train_steps)
    return np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps


def euler_plan(config: SchedulerConfig, num_steps: int) -> EulerPlan:
    sigmas, timesteps = euler_grid(config, num_steps)
    step_sizes = sigmas[1:] - sigmas[:-1]  # float32 arithmetic, as the reference
    return EulerPlan(
        sigmas=tuple(float(s) for s in sigmas),
        timesteps=tuple(float(t) for t in timesteps),
        step_sizes=tuple(float(d) for d in step_sizes),
    )


def euler_initial_state(plan: EulerPlan) -> EulerState:
    return EulerState()


def euler_step(
    plan: EulerPlan, state: EulerState, step_index: int, latents: mx.array, velocity: mx.array
) -> tuple[mx.array, EulerState]:
    updated = latents.astype(mx.float32) + plan.step_sizes[step_index] * velocity.astype(mx.float32)
    return updated.astype(latents.dtype), state


# --------------------------------------------------------------------------- by name

Plan = Union[DPMSolverPlan, EulerPlan]
State = Union[DPMSolverState, EulerState]


class Sampler(NamedTuple):
    """The three functions a denoising loop needs; pick one with :func:`get_sampler`."""

    name: str
    plan: Callable[[SchedulerConfig, int], Plan]
    initial_state: Callable[[Plan], State]
    step: Callable[[Plan, State, int, mx.array, mx.array], tuple[mx.array, State]]


SAMPLERS: dict[str, Sampler] = {
    "dpm": Sampler("dpm", dpm_solver_plan, dpm_solver_initial_state, dpm_solver_step),
    "euler": Sampler("euler", euler_plan, euler_initial_state, euler_step),
}


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None

