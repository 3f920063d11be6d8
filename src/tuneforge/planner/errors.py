"""The planner's one error type: bad input (unknown model, impossible numbers), said in one line."""


class PlannerError(ValueError):
    """Input the planner cannot plan for; the message names the field and what was expected."""
