"""SweepSpec: a hyperparameter search over any JobSpec field, run as ordinary jobs (scheduler/sweeps.py).

A base JobSpec, a search space keyed by dotted JobSpec paths (choice, uniform, log_uniform, int; a
parameter may apply only `when` an earlier one takes given values), the objectives, the budget, the
parallelism, the sampler and the pruner. Every path and every value is checked against JobSpec here, so a
sweep that validates never submits a trial the job spec refuses. The same shape is the YAML of
`tuneforge sweep run` and the body of POST /v1/sweeps.
"""

from __future__ import annotations

import difflib
import itertools
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tuneforge.spec.job import LOWER_IS_BETTER, JobSpec

MAX_PARAMETERS = 32
MAX_CHOICES = 64
MAX_GRID_POINTS = 10_000
MAX_TRIALS = 10_000
MAX_OBJECTIVES = 4
Scalar = str | int | float | bool | None
ChoiceValue = Scalar | list[Scalar]  # a list: e.g. adapter.target_modules [q_proj, v_proj]


class SweepSpecError(ValueError):
    """A sweep spec that cannot be used; the message names the file, line and field, as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameter(_Section):
    """One dimension of the search space."""

    type: Literal["choice", "uniform", "log_uniform", "int"] = Field(
        ..., description="choice (one of values), uniform or log_uniform (a float in [low, high]), int (an integer "
        "in [low, high], every step-th)."
    )
    values: Annotated[list[ChoiceValue], Field(min_length=1, max_length=MAX_CHOICES)] | None = Field(
        None, description="choice: the values to choose from."
    )
    low: float | None = Field(None, description="uniform, log_uniform, int: the smallest value.")
    high: float | None = Field(None, description="uniform, log_uniform, int: the largest value.")
    step: float | None = Field(None, gt=0, description="int: the spacing of the values (default 1); uniform: "
                               "a discretization step (needed for grid).")
    log: bool = Field(False, description="int: sample on a log scale.")
    when: dict[str, Annotated[list[ChoiceValue], Field(min_length=1)]] | None = Field(
        None, description="Only sample this parameter when each named earlier parameter takes one of the listed "
        "values, e.g. {adapter.type: [lora, qlora]} for adapter.rank."
    )

    @model_validator(mode="after")
    def _shape(self) -> Parameter:
        if self.type == "choice":
            if self.values is None or self.low is not None or self.high is not None or self.step is not None:
                raise ValueError("type choice takes values (a list), not low / high / step")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type} takes low and high, not values")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs low and high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.type == "log_uniform" and self.low <= 0:
            raise ValueError(f"type log_uniform needs low > 0, got {self.low}")
        if self.type == "log_uniform" and self.step is not None:
            raise ValueError("type log_uniform takes no step")
        if self.type == "int":
            if self.low != int(self.low) or self.high != int(self.high) or (self.step and self.step != int(self.step)):
                raise ValueError("type int needs whole numbers for low, high and step")
            if self.log and (self.low < 1 or self.step not in (None, 1)):
                raise ValueError("type int with log needs low >= 1 and no step")
        if self.log and self.type != "int":
            raise ValueError("log applies to type int; use type log_uniform for floats")
        return self

    def grid(self) -> list[Any]:
        """Every value a grid visits (choice, int, or a uniform with a step)."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.type == "uniform" and self.step:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        raise ValueError(f"a {self.type} parameter{' without a step' if self.type == 'uniform' else ''} has no "
                         "grid; use choice, int or a uniform with step, or sampler random / tpe")

    def edges(self) -> list[Any]:
        """The values checked against JobSpec: every choice, or both bounds."""
        if self.type == "choice":
            return list(self.values)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]


class Objective(_Section):
    metric: str = Field(..., min_length=1, max_length=64, description="An evaluation metric (evaluation.metrics) or "
                        "grader name (evaluation.graders) of the base job, measured on the validation set.")
    direction: Literal["auto", "min", "max"] = Field(
        "auto", description="min or max; auto: min for loss and perplexity, max for every other metric and grader."
    )

    def resolved_direction(self) -> Literal["min", "max"]:
        if self.direction != "auto":
            return self.direction
        return "min" if self.metric in LOWER_IS_BETTER else "max"


class Budget(_Section):
    """When the sweep stops asking for trials: whichever limit is reached first (running trials finish)."""

    max_trials: int | None = Field(None, ge=1, le=MAX_TRIALS, description="Trials to run (grid: at most its size).")
    gpu_hours: float | None = Field(None, gt=0, le=1e6, description="GPU-hours of all trials together (CPU slots "
                                    "count as GPUs); measured from the jobs' own accounting.")
    cost_usd: float | None = Field(None, gt=0, le=1e9, description="US dollars of all trials together, as the "
                                   "cost module prices their device time (the tenant's rates, TUNEFORGE_PRICE_TABLE).")
    wall_hours: float | None = Field(None, gt=0, le=8760, description="Hours since the sweep was created.")


class SweepSpec(_Section):
    """A hyperparameter sweep."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$",
                             description="Short name (letters, digits, . _ -); trial jobs are named NAME-tN.")
    base: JobSpec = Field(..., description="The job every trial starts from (a job file's sections).")
    space: dict[str, Parameter] = Field(..., min_length=1, max_length=MAX_PARAMETERS,
                                        description="Dotted JobSpec path -> parameter, in the order they are sampled.")
    objectives: list[Objective] = Field(..., min_length=1, max_length=MAX_OBJECTIVES,
                                        description="What to optimize; several give a Pareto front.")
    budget: Budget = Field(default_factory=Budget, description="When to stop.")
    parallelism: int = Field(1, ge=1, le=64, description="Trials running at once.")
    sampler: Literal["grid", "random", "tpe"] = Field("tpe", description="grid (every combination), random or tpe.")
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = Field(
        "none", description="Stop bad trials early on the validation metrics measured every "
        "base.evaluation.eval_every_steps (one objective only)."
    )
    pruner_warmup_trials: int = Field(3, ge=0, le=1000, description="pruner median: trials that report before "
                                      "any is pruned (the median of fewer says little).")
    pruner_warmup_steps: int | None = Field(
        None, ge=1, le=10**7, description="Steps every trial trains before a pruner may stop it (median: Optuna's "
        "n_warmup_steps; successive halving and Hyperband: their min_resource, the first rung). Default: "
        "base.evaluation.eval_every_steps, the first validation.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the sampler.")

    @field_validator("space")
    @classmethod
    def _paths(cls, space: dict[str, Parameter]) -> dict[str, Parameter]:
        for path in space:
            problem = path_problem(path)
            if problem:
                raise ValueError(f"{path}: {problem}")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        self._check_conditions()
        self._check_values()
        measured = self.base.evaluation.measured()
        for index, objective in enumerate(self.objectives):
            if objective.metric not in measured:
                raise ValueError(f"objectives.{index}.metric {objective.metric!r} is not measured by the base job: "
                                 f"expected one of base.evaluation.metrics or graders ({', '.join(measured)})")
        if len({o.metric for o in self.objectives}) != len(self.objectives):
            raise ValueError("objectives: each metric once")
        if self.pruner != "none":
            if len(self.objectives) > 1:
                raise ValueError(f"pruner {self.pruner}: pruning needs one objective (Optuna cannot prune on a Pareto "
                                 "front); set pruner none")
            if self.base.evaluation.eval_every_steps is None:
                raise ValueError(f"pruner {self.pruner} is fed by the validation metrics during training: set "
                                 "base.evaluation.eval_every_steps")
            last = self.base.training.max_steps
            if last is not None and self.warmup_steps() >= last:
                raise ValueError(f"pruner_warmup_steps {self.warmup_steps()}: a trial of base.training.max_steps "
                                 f"{last} would never be judged before its last step; expected fewer steps")
        elif self.pruner_warmup_steps is not None:
            raise ValueError("pruner_warmup_steps: there is no pruner (pruner none); set one or leave it out")
        if self.sampler == "grid":
            for path, parameter in self.space.items():
                try:
                    parameter.grid()
                except ValueError as exc:
                    raise ValueError(f"space.{path}: sampler grid: {exc}") from None
            if math.prod(len(p.grid()) for p in self.space.values()) > MAX_GRID_POINTS:
                raise ValueError(f"sampler grid: more than {MAX_GRID_POINTS} combinations; narrow the space or use "
                                 "random / tpe")
        elif all(limit is None for limit in self.budget.model_dump().values()):
            raise ValueError(f"budget: sampler {self.sampler} has no end of its own: set budget.max_trials, "
                             "gpu_hours, cost_usd or wall_hours")
        return self

    def _check_conditions(self) -> None:
        seen: list[str] = []
        for path, parameter in self.space.items():
            for other, allowed in (parameter.when or {}).items():
                if other not in seen:
                    raise ValueError(f"space.{path}.when: {other!r} is not a parameter declared before {path!r}")
                known = self.space[other]
                if known.type == "choice":
                    unknown = [v for v in allowed if v not in known.values]
                    if unknown:
                        raise ValueError(f"space.{path}.when.{other}: {unknown[0]!r} is not one of its values "
                                         f"{known.values}")
            seen.append(path)

    def _check_values(self) -> None:
        """Every choice and both bounds of every range, applied to the base (with the conditions they
        need), must make a valid JobSpec: a sweep never submits a trial that the job spec refuses."""
        for path, value, chosen in self._edges():
            try:
                self.trial_spec(chosen)
            except ValidationError as exc:
                problem = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'job'}: "
                                    f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()[:3])
                raise ValueError(f"space.{path}: the job spec refuses the value {value!r} ({problem})") from None

    def _edges(self) -> list[tuple[str, Any, dict[str, Any]]]:
        """(path, value, the choices that make it apply) for every choice and both bounds of every range."""
        edges = []
        for path, parameter in self.space.items():
            context = {other: allowed[0] for other, allowed in (parameter.when or {}).items()}
            edges += [(path, value, {**context, path: value}) for value in parameter.edges()]
        return edges

    def edge_specs(self) -> list[tuple[str, JobSpec]]:
        """("base", the base) and ("space.PATH", its trial spec) for every choice and both bounds of every range:
        every model a trial can name is named by one of them (what the API checks the caller may use)."""
        return [("base", self.base), *((f"space.{path}", self.trial_spec(chosen)) for path, _, chosen in self._edges())]

    # ---- what the driver asks -------------------------------------------------------------------

    def warmup_steps(self) -> int:
        """The first step a pruner may judge a trial at."""
        return self.pruner_warmup_steps or self.base.evaluation.eval_every_steps or 1

    def conditional(self) -> bool:
        """Whether some parameter applies only under a condition (TPE then models each group of parameters that
        appear together on its own)."""
        return any(parameter.when for parameter in self.space.values())

    def directions(self) -> list[Literal["minimize", "maximize"]]:
        return ["minimize" if o.resolved_direction() == "min" else "maximize" for o in self.objectives]

    def active(self, path: str, chosen: dict[str, Any]) -> bool:
        """Whether a parameter applies, given the values chosen for the parameters before it."""
        return all(other in chosen and chosen[other] in allowed for other, allowed in (self.space[path].when or {}).items())

    def grid_points(self) -> list[dict[str, Any]]:
        """Every distinct combination, in order; a conditional parameter appears only where it applies."""
        points: list[dict[str, Any]] = []
        seen: set[str] = set()
        for combination in itertools.product(*(p.grid() for p in self.space.values())):
            chosen: dict[str, Any] = {}
            for path, value in zip(self.space, combination):
                if self.active(path, chosen):
                    chosen[path] = value
            key = repr(sorted(chosen.items()))
            if key not in seen:
                seen.add(key)
                points.append(chosen)
        return points

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample one configuration with an Optuna trial (define-by-run: conditions follow the choices)."""
        chosen: dict[str, Any] = {}
        for path, p in self.space.items():
            if not self.active(path, chosen):
                continue
            if p.type == "choice":
                # Optuna stores choices that are scalars; a list choice goes by its index.
                if all(not isinstance(v, list) for v in p.values):
                    chosen[path] = trial.suggest_categorical(path, p.values)
                else:
                    chosen[path] = p.values[trial.suggest_categorical(path, list(range(len(p.values))))]
            elif p.type == "int":
                chosen[path] = trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                chosen[path] = trial.suggest_float(path, p.low, p.high, log=p.type == "log_uniform", step=p.step)
        return chosen

    def optuna_params(self, chosen: dict[str, Any]) -> dict[str, Any]:
        """A grid point as Optuna's params (a list choice by its index), for enqueue_trial."""
        return {path: self.space[path].values.index(v) if isinstance(v, list) else v for path, v in chosen.items()}

    def trial_spec(self, chosen: dict[str, Any], *, name: str | None = None) -> JobSpec:
        """The base with the chosen values at their paths (raises pydantic's ValidationError)."""
        data = self.base.model_dump(mode="json", exclude_unset=True)
        for path, value in chosen.items():
            node = data
            *sections, field = path.split(".")
            for section in sections:
                node = node.setdefault(section, {})
            node[field] = value
        if name is not None:
            data["name"] = name
        return JobSpec.model_validate(data)


def path_problem(path: str) -> str | None:
    """Why a dotted path is not a JobSpec field (None when it is one)."""
    model: type[BaseModel] = JobSpec
    parts = path.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        where = ".".join(parts[:depth]) or "the job spec"
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            return f"{part!r} is not a field of {where}" + (f"; did you mean {close[0]!r}?" if close else
                                                            f" (fields: {', '.join(fields)})")
        annotation = fields[part].annotation
        section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if depth < len(parts) - 1:
            if not section:
                return f"{'.'.join(parts[:depth + 1])} is a value, not a section"
            model = annotation
        elif section:
            return f"{path} is a section; name one of its fields ({', '.join(annotation.model_fields)})"
    if parts[0] in ("name", "method") or path in ("dataset.path", "dataset.validation_path"):
        return f"{path} is fixed for a sweep (every trial trains the same method on the same data)"
    return None


def validate_sweep_spec(data: Any, *, source: str = "sweep spec", lines: dict[tuple, int] | None = None) -> SweepSpec:
    """Validate a sweep spec; raise SweepSpecError naming the line (when known) and the field."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or "-" in p)))
            where = source
            for depth in range(len(loc), 0, -1):
                if lines and loc[:depth] in lines:
                    where = f"{source}:{lines[loc[:depth]]}"
                    break
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown field"
            if not loc:  # a rule over several fields: its message starts with the field it is about
                where = _line_of_message(message, source, lines or {})
                problems.append(f"{where}: {message}")
                continue
            head = message.split(":", 1)[0]  # a space path the message starts with: its own line
            if lines and loc + (head,) in lines:
                where = f"{source}:{lines[loc + (head,)]}"
            problems.append(f"{where}: {'.'.join(loc)}: {message}")
        raise SweepSpecError("invalid sweep spec\n  " + "\n  ".join(dict.fromkeys(problems))) from None


def _line_of_message(message: str, source: str, lines: dict[tuple, int]) -> str:
    """source:line of the field a whole-spec message names first (space.PATH..., objectives.N..., budget...)."""
    head = message.split(" ", 1)[0].rstrip(":")
    section, _, rest = head.partition(".")
    keys = [(section, rest[:cut]) for cut in range(len(rest), 0, -1) if rest[:cut].count(".") >= 0]
    for key in [*keys, (section,)]:
        if key in lines:
            return f"{source}:{lines[key]}"
    return source


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file."""
    from tuneforge.spec.loader import _key_lines

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        document, data = yaml.compose(text), yaml.safe_load(text)
    except OSError as exc:
        raise SweepSpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SweepSpecError(f"{path}{f':{mark.line + 1}' if mark else ''}: malformed YAML") from None
    if not isinstance(data, dict):
        raise SweepSpecError(f"{path}: expected a mapping (base, space, objectives, budget, ...)")
    return validate_sweep_spec(data, source=str(path), lines=_key_lines(document) if document else {})


# ---- the API's shapes (api/routers/sweeps.py) ---------------------------------------------------------


class SweepTrialObject(BaseModel):
    object: Literal["sweep.trial"] = "sweep.trial"
    number: int
    status: Literal["running", "succeeded", "pruned", "failed", "cancelled"]
    job_id: str | None = None
    params: dict[str, Any]
    values: list[float] | None = None
    error: str | None = None
    created_at: int
    finished_at: int | None = None


class SweepBest(BaseModel):
    number: int
    job_id: str | None = None
    fine_tuned_model: str | None = None
    params: dict[str, Any]
    values: list[float]


class SweepObject(BaseModel):
    object: Literal["sweep"] = "sweep"
    id: str
    name: str | None = None
    status: Literal["running", "succeeded", "cancelled", "failed"]
    created_at: int
    finished_at: int | None = None
    stop_reason: str | None = None
    spec: dict[str, Any]
    trial_counts: dict[str, int]
    gpu_hours: float
    best: list[SweepBest] = Field(default_factory=list, description="The best trial, or the Pareto front for "
                                  "several objectives (best first by the first objective).")
    importance: dict[str, float] | None = Field(None, description="Each parameter's importance for the first "
                                                "objective (Optuna's PED-ANOVA), once two trials completed.")
