"""How long training runs: the planned steps, the learning-rate drop, a time budget and early stopping.

The paper's schedule is a number of steps with the learning rate x0.1 after ``lr_drop_fraction``
(95%) of them. With a time budget, the step time is measured over the first steps of the run and
the same schedule is laid out on the steps that fit in what is left of the budget, then laid out
again after each step, on the latest steps' time, until the learning rate drops; ``steps`` stays an
upper bound, so the two together end at whichever comes first.

Free of torch: the command line states these rules in its help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import EARLY_STOP_AFTER, EARLY_STOP_MIN_IMPROVEMENT, EARLY_STOP_PATIENCE, LONG_RUN_SECONDS, VALIDATION_SHARE, VALIDATIONS_PER_RUN, TrainConfig

@dataclass
class Plan:
    """The steps a run takes, the step from which the learning rate is x0.1, and the validation interval."""

    steps: int
    drop_step: int
    validate_every: int
    step_seconds: float | None = None  # measured on this machine; None until the first steps are timed

    @classmethod
    def of(cls, config: TrainConfig, steps: int, step_seconds: float | None = None, validation_seconds: float = 0.0) -> Plan:
        """The paper's schedule laid out on ``steps`` steps, validating as :data:`VALIDATION_SHARE` allows once timed."""
        validate_every = config.validate_every or max(1, steps // VALIDATIONS_PER_RUN)
        if config.validate_every is None and step_seconds:
            validate_every = max(validate_every, math.ceil(validation_seconds / (VALIDATION_SHARE * step_seconds)))
        return cls(steps, max(1, int(config.lr_drop_fraction * steps)), validate_every, step_seconds)


def budget_plan(config: TrainConfig, done: int, seconds_left: float, step_seconds: float, validation_seconds: float) -> Plan:
    """The plan for a time budget: ``done`` steps plus those that fit in ``seconds_left``, at most ``config.steps``.

    Each step is charged its share of the validations, whose interval depends on the plan itself:
    first estimated from the steps alone.
    """
    left = max(seconds_left, 0.0)
    rough = Plan.of(config, done + int(left / step_seconds), step_seconds, validation_seconds)
    per_step = step_seconds + validation_seconds / rough.validate_every
    return Plan.of(config, min(config.steps, done + int(left / per_step)), step_seconds, validation_seconds)


def learning_rate(config: TrainConfig, plan: Plan, step: int) -> float:
    """The learning rate of step ``step`` (0-based): x0.1 from ``plan.drop_step`` on."""
    return config.learning_rate * 0.1 if step >= plan.drop_step else config.learning_rate


def flattened(totals: list[float], step: int, plan: Plan) -> bool:
    """Whether the total validation losses so far (oldest first) meet :data:`~efficientad.config.EARLY_STOP_RULE` at ``step``."""
    if step < EARLY_STOP_AFTER * plan.steps or len(totals) <= EARLY_STOP_PATIENCE:
        return False
    best_before = min(totals[:-EARLY_STOP_PATIENCE])
    return min(totals[-EARLY_STOP_PATIENCE:]) > best_before * (1.0 - EARLY_STOP_MIN_IMPROVEMENT)


def minutes(seconds: float) -> str:
    text = f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    return text if seconds < 2 * LONG_RUN_SECONDS else f"{text} ({seconds / 3600:.1f} h)"


def estimate(config: TrainConfig, plan: Plan, done: int, validation_seconds: float) -> str:
    """What the run will take, from the measured step time, and advice to set a budget when it is long."""
    seconds = (plan.steps - done) * plan.step_seconds + (plan.steps - done) // plan.validate_every * validation_seconds
    text = f"about {minutes(seconds)} for {plan.steps - done:,} more steps at {plan.step_seconds:.3f} s/step on this machine"
    if config.time_budget is not None:
        bound = "all the steps fit" if plan.steps == config.steps else f"{plan.steps:,} of {config.steps:,} steps fit"
        return f"time budget {minutes(config.time_budget)}: {bound}; {text}; learning rate x0.1 from step {plan.drop_step:,}"
    if seconds > LONG_RUN_SECONDS:
        text += "; to bound it, set a time budget (--time-budget MINUTES, or time_budget=SECONDS)"
    return text
