"""Samplers: whole trajectories against diffusers' schedulers driven by the same
deterministic nonlinear fake velocity, and the 20-step grid against docs/reference-model.md §3.3."""

from __future__ import annotations

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from mobileo_mlx.samplers import (
    DPMSolverState,
    SchedulerConfig,
    dpm_solver_plan,
    dpm_solver_step,
    euler_plan,
    get_sampler,
)
from tests.helpers import REFERENCE_DIR, relative_error

SCHEDULER_JSON = REFERENCE_DIR / "Sana_600M_512px_diffusers" / "scheduler" / "scheduler_config.json"
SANA_SCHEDULER_CONFIG = json.loads(SCHEDULER_JSON.read_text())  # the released file, not our copy of it
# docs/reference-model.md §3.3: the 20 integer timesteps of DPM-Solver++ with flow_shift 3 (an independent reference).
REFERENCE_TIMESTEPS_20 = [999, 982, 963, 944, 922, 899, 874, 847, 817, 785,
                     749, 710, 666, 617, 562, 499, 428, 345, 249, 136]
TOLERANCE = 1e-5
STEP_COUNTS = [1, 2, 3, 7, 20]
LATENT_SHAPE = (2, 8, 8, 32)


def fake_velocity_field(seed: int = 0):
    """v(x, t) = tanh(x) * t / 1000 + c, with a fixed random c: nonlinear in x and t."""
    offset = np.random.default_rng(seed).normal(0.0, 0.5, LATENT_SHAPE).astype(np.float32)

    def velocity(x: np.ndarray, t: float) -> np.ndarray:
        return (np.tanh(x) * np.float32(t / 1000.0) + offset).astype(np.float32)

    return velocity


def initial_noise(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LATENT_SHAPE).astype(np.float32)


def diffusers_trajectory(scheduler, num_steps: int, velocity):
    scheduler.set_timesteps(num_steps)
    x = torch.from_numpy(initial_noise())
    trajectory = []
    for t in scheduler.timesteps:
        v = torch.from_numpy(velocity(x.numpy(), float(t)))
        x = scheduler.step(v, t, x).prev_sample
        trajectory.append(x.numpy().copy())
    return list(scheduler.timesteps.tolist()), trajectory


def our_trajectory(name: str, config: SchedulerConfig, num_steps: int, velocity):
    sampler = get_sampler(name)
    plan = sampler.plan(config, num_steps)
    state = sampler.initial_state(plan)
    x = mx.array(initial_noise())
    trajectory = []
    for i, t in enumerate(plan.timesteps):
        v = mx.array(velocity(np.array(x), t))
        x, state = sampler.step(plan, state, i, x, v)
        trajectory.append(np.array(x))
    return plan, trajectory


def trajectory_error(actual: list[np.ndarray], expected: list[np.ndarray]) -> float:
    assert len(actual) == len(expected)
    return max(relative_error(a, e) for a, e in zip(actual, expected))


def test_config_from_dict_ignores_unknown_keys_and_defaults_are_sana():
    config = SchedulerConfig.from_dict({**SANA_SCHEDULER_CONFIG, "some_future_key": 1})
    assert config == SchedulerConfig()
    assert (config.flow_shift, config.solver_order, config.num_train_timesteps) == (3.0, 2, 1000)
    assert SchedulerConfig.from_dict({"flow_shift": 5.0}).flow_shift == 5.0


def test_dpm_20_step_timesteps_equal_spec():
    plan = dpm_solver_plan(SchedulerConfig(), 20)
    assert list(plan.timesteps) == REFERENCE_TIMESTEPS_20
    assert all(isinstance(t, int) for t in plan.timesteps)
    assert plan.sigmas[-1] == 0.0 and len(plan.sigmas) == 21
    assert plan.first_order_only[0] and plan.first_order_only[-1]
    assert not any(plan.first_order_only[1:-1])


@pytest.mark.parametrize("num_steps", STEP_COUNTS + [25])
def test_dpm_trajectory_matches_diffusers(num_steps):
    velocity = fake_velocity_field()
    reference = DPMSolverMultistepScheduler.from_config(SANA_SCHEDULER_CONFIG)
    expected_timesteps, expected = diffusers_trajectory(reference, num_steps, velocity)
    config = SchedulerConfig.from_dict(SANA_SCHEDULER_CONFIG)
    plan, actual = our_trajectory("dpm", config, num_steps, velocity)
    assert list(plan.timesteps) == expected_timesteps
    np.testing.assert_array_equal(np.array(plan.sigmas, np.float32), reference.sigmas.numpy())
    assert trajectory_error(actual, expected) <= TOLERANCE


def test_dpm_first_order_config_matches_diffusers():
    overrides = {**SANA_SCHEDULER_CONFIG, "solver_order": 1, "flow_shift": 2.0}
    velocity = fake_velocity_field(seed=3)
    _, expected = diffusers_trajectory(DPMSolverMultistepScheduler.from_config(overrides), 7, velocity)
    _, actual = our_trajectory("dpm", SchedulerConfig.from_dict(overrides), 7, velocity)
    assert trajectory_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("num_steps", STEP_COUNTS)
def test_euler_trajectory_matches_diffusers(num_steps):
    config = SchedulerConfig.from_dict(SANA_SCHEDULER_CONFIG)
    velocity = fake_velocity_field(seed=5)
    reference = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift
    )
    expected_timesteps, expected = diffusers_trajectory(reference, num_steps, velocity)
    plan, actual = our_trajectory("euler", config, num_steps, velocity)
    assert list(plan.timesteps) == expected_timesteps
    np.testing.assert_array_equal(np.array(plan.sigmas, np.float32), reference.sigmas.numpy())
    assert trajectory_error(actual, expected) <= TOLERANCE


def test_last_dpm_step_lands_on_the_data_prediction():
    plan = dpm_solver_plan(SchedulerConfig(), 20)
    rng = np.random.default_rng(9)
    x, v, previous = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(3))
    state = DPMSolverState(previous_data_prediction=mx.array(previous))
    result, _ = dpm_solver_step(plan, state, 19, mx.array(x), mx.array(v))
    expected = x.astype(np.float64) - np.float64(plan.sigmas[19]) * v
    assert relative_error(np.array(result), expected) <= 1e-6


def test_steps_are_pure_and_keep_float32_state_for_half_latents():
    sampler = get_sampler("dpm")
    plan = sampler.plan(SchedulerConfig(), 5)
    rng = np.random.default_rng(11)
    x0, v0, v1 = (rng.standard_normal(LATENT_SHAPE).astype(np.float16) for _ in range(3))
    state0 = sampler.initial_state(plan)
    x1, state1 = sampler.step(plan, state0, 0, mx.array(x0), mx.array(v0))
    assert x1.dtype == mx.float16
    assert state1.previous_data_prediction.dtype == mx.float32
    assert state0.previous_data_prediction is None  # the input state is untouched
    again, _ = sampler.step(plan, state1, 1, x1, mx.array(v1))
    twice, _ = sampler.step(plan, state1, 1, x1, mx.array(v1))
    np.testing.assert_array_equal(np.array(again), np.array(twice))
    # The fp16 step equals the float32 step on the same (upcast) inputs, rounded once.
    x1_32, _ = sampler.step(
        plan, state0, 0, mx.array(x0.astype(np.float32)), mx.array(v0.astype(np.float32))
    )
    np.testing.assert_array_equal(np.array(x1), np.array(x1_32.astype(mx.float16)))


def test_samplers_by_name():
    assert get_sampler("dpm").plan is dpm_solver_plan
    assert get_sampler("euler").plan is euler_plan
    with pytest.raises(ValueError):
        get_sampler("ddim")


@pytest.mark.parametrize(
    "override",
    [
        {"prediction_type": "epsilon"},
        {"use_flow_sigmas": False},
        {"use_karras_sigmas": True},
        {"solver_order": 3},
        {"final_sigmas_type": "sigma_min"},
        {"algorithm_type": "sde-dpmsolver++"},
    ],
)
def test_unsupported_dpm_settings_are_refused(override):
    config = dataclasses.replace(SchedulerConfig(), **override)
    with pytest.raises(ValueError):
        dpm_solver_plan(config, 20)
