"""Runners for the graders of spec/graders.py: score a batch of (item, sample) pairs as OpenAI's graders do.

`build_grader(spec)` checks everything that can be checked before a sample exists (templates, the multi
formula, metrics that need data or models this machine lacks) and returns a runner whose `grade(items,
samples)` scores a whole batch: a model grader sends the batch to its judge in one call. A dataset row that
lacks a field a template names is an error for the whole batch (the data does not fit the grader); a model
output that cannot be graded (no number from the judge, `{{sample.output_json.x}}` on text that is not JSON)
is that item's error: score None, with the reason.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter, ValidationError

from tuneforge.evaluation.metrics import parse_json
from tuneforge.spec.graders import (
    DEFAULT_JUDGE_MAX_TOKENS,
    FORMULA_FUNCTIONS,
    TEMPLATE_FIELD,
    Grader,
    LabelModelGrader,
    Message,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
)

if TYPE_CHECKING:
    from tuneforge.evaluation.judges import Judge


class GraderError(ValueError):
    """A grader that cannot run, or data that does not fit it; the message is meant for the user as is."""


@dataclass
class GradeResult:
    """One item's grade. score: None when the item could not be graded (error says why). passed: None when the
    grader has no pass criterion. sub_scores: each named grader's score, for multi."""

    score: float | None
    passed: bool | None
    sub_scores: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    judge_output: str | None = None  # what a model grader's judge replied
    label: str | None = None  # the label a label_model judge chose


JudgeFactory = Callable[[str, "str | None"], "Judge"]  # judges.judge_for, or a stand-in


class GraderRunner:
    """Scores batches for one grader spec."""

    name: str

    def grade(self, items: Sequence[dict], samples: Sequence[dict]) -> list[GradeResult]:
        if len(items) != len(samples):
            raise GraderError(f"grader {self.name!r}: {len(items)} items but {len(samples)} samples")
        for what, rows in (("item", items), ("sample", samples)):
            for index, row in enumerate(rows):
                if not isinstance(row, dict):
                    raise GraderError(f"grader {self.name!r}: {what} {index} is {type(row).__name__}, not an object")
        return self._grade(list(items), list(samples)) if items else []

    def _grade(self, items: list[dict], samples: list[dict]) -> list[GradeResult]:
        raise NotImplementedError


def build_grader(spec: Grader | dict, *, judges: JudgeFactory | None = None) -> GraderRunner:
    """A runner for a grader spec (a model from spec/graders.py, or its JSON as a dict).

    judges(model, endpoint) returns the Judge a model grader talks to; by default evaluation.judges.judge_for."""
    if isinstance(spec, dict):
        try:
            spec = TypeAdapter(Grader).validate_python(spec)
        except ValidationError as exc:
            raise GraderError(f"grader {spec.get('name', '?')!r}: {_first_error(exc)}") from None
    if isinstance(spec, PythonGrader) or getattr(spec, "type", None) == "python":
        raise GraderError("the python grader runs arbitrary code, which a tuneforge job never does; use "
                          "string_check, text_similarity, score_model, label_model or multi")
    if isinstance(spec, StringCheckGrader):
        return StringCheckRunner(spec)
    if isinstance(spec, TextSimilarityGrader):
        return TextSimilarityRunner(spec)
    if isinstance(spec, (ScoreModelGrader, LabelModelGrader)):
        if judges is None:
            from tuneforge.evaluation.judges import judge_for as judges
        runner = ScoreModelRunner if isinstance(spec, ScoreModelGrader) else LabelModelRunner
        return runner(spec, judges(spec.model, spec.endpoint))
    if isinstance(spec, MultiGrader):
        return MultiRunner(spec, {name: build_grader(sub, judges=judges) for name, sub in spec.graders.items()})
    raise GraderError(f"unknown grader type {getattr(spec, 'type', type(spec).__name__)!r}")


def _first_error(exc) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


# -------------------------------------------------------------------------------------------- templates


class _ItemFailure(Exception):
    """The model's output cannot be graded: this item's error, not the batch's."""


class Template:
    """A template with `{{item.a.b}}` / `{{sample.output_text}}` / `{{sample.output_json.x}}` fields.

    Strings render as they are, other values as JSON; a numeric path part indexes a list (`item.choices.0`)."""

    def __init__(self, text: str, *, grader: str, where: str):
        self.text, self.grader, self.where = text, grader, where
        self.parts: list[str | list[str]] = []
        position = 0
        for found in TEMPLATE_FIELD.finditer(text):
            self.parts.append(text[position : found.start()])
            path = found.group(1).split(".")
            if path[0] not in ("item", "sample"):
                raise GraderError(f"grader {grader!r}: {where} {text!r} names {{{{{found.group(1)}}}}}; "
                                  "templates name item.<field> or sample.<field>")
            self.parts.append(path)
            position = found.end()
        self.parts.append(text[position:])

    def render(self, item: dict, sample: dict, index: int) -> str:
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else _format(self._lookup(part, item, sample, index)))
        return "".join(out)

    def _lookup(self, path: list[str], item: dict, sample: dict, index: int) -> Any:
        dotted = ".".join(path)
        if path[0] == "item":
            value, missing = _walk(item, path[1:])
            if missing is not None:
                raise GraderError(f"grader {self.grader!r}: {self.where} {self.text!r} names {{{{{dotted}}}}}, "
                                  f"but item {index} has no field {'.'.join(path[1 : missing + 2])!r}")
            return value
        if len(path) >= 2 and path[1] == "output_json" and "output_json" not in sample:
            if not isinstance(sample.get("output_text"), str):
                raise GraderError(f"grader {self.grader!r}: {self.where} {self.text!r} names {{{{{dotted}}}}}, "
                                  f"but sample {index} has no output_text")
            ok, parsed = parse_json(sample["output_text"], allow_code_fence=True)
            if not ok:
                raise _ItemFailure(f"{{{{{dotted}}}}}: the output is not JSON")
            sample = {**sample, "output_json": parsed}
        value, missing = _walk(sample, path[1:])
        if missing is not None:
            if len(path) >= 2 and path[1] == "output_json" and missing > 0:
                raise _ItemFailure(f"{{{{{dotted}}}}}: the output's JSON has no field "
                                   f"{'.'.join(path[2 : missing + 2])!r}")
            raise GraderError(f"grader {self.grader!r}: {self.where} {self.text!r} names {{{{{dotted}}}}}, "
                              f"but sample {index} has no field {'.'.join(path[1 : missing + 2])!r}")
        return value


def _walk(value: Any, path: list[str]) -> tuple[Any, int | None]:
    """(value at path, None), or (None, index of the first part that is not there)."""
    for depth, key in enumerate(path):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None, depth
    return value, None


def _format(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _render_pairs(templates: Sequence[Template], items: list[dict], samples: list[dict]):
    """Per item: the rendered templates, or the _ItemFailure message."""
    rendered: list[list[str] | str] = []
    for index, (item, sample) in enumerate(zip(items, samples)):
        try:
            rendered.append([t.render(item, sample, index) for t in templates])
        except _ItemFailure as failure:
            rendered.append(str(failure))
    return rendered


def _failed(message: str, **extra) -> GradeResult:
    return GradeResult(score=None, passed=None, error=message, **extra)


# ------------------------------------------------------------------------------------ string and text


class StringCheckRunner(GraderRunner):
    """1 when the check holds, else 0: eq / ne exact (in)equality, like: the reference occurs in the input,
    ilike: the same ignoring case."""

    def __init__(self, spec: StringCheckGrader):
        self.name, self.operation = spec.name, spec.operation
        self.templates = [Template(spec.input, grader=spec.name, where="input"),
                          Template(spec.reference, grader=spec.name, where="reference")]

    def _grade(self, items, samples):
        results = []
        for rendered in _render_pairs(self.templates, items, samples):
            if isinstance(rendered, str):
                results.append(_failed(rendered))
                continue
            text, reference = rendered
            holds = {
                "eq": lambda: text == reference,
                "ne": lambda: text != reference,
                "like": lambda: reference in text,
                "ilike": lambda: reference.casefold() in text.casefold(),
            }[self.operation]()
            results.append(GradeResult(score=float(holds), passed=holds))
        return results


def _rouge_similarity(kind: str) -> Callable[[str, str], float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([kind])
    return lambda text, reference: scorer.score(target=reference, prediction=text)[kind].fmeasure


def _bleu_similarity() -> Callable[[str, str], float]:
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)  # as sacrebleu.sentence_bleu
    return lambda text, reference: bleu.sentence_score(text, [reference]).score / 100.0


def _gleu_similarity() -> Callable[[str, str], float]:
    from nltk.translate.gleu_score import sentence_gleu

    def gleu(text: str, reference: str) -> float:
        hypothesis, gold = text.split(), reference.split()
        if not hypothesis or not gold:
            return float(hypothesis == gold)
        return float(sentence_gleu([gold], hypothesis))

    return gleu


def _fuzzy_similarity() -> Callable[[str, str], float]:
    from rapidfuzz import fuzz

    # Indel-distance similarity: 1 - (insertions + deletions) / (len(a) + len(b)), the ratio difflib also gives.
    return lambda text, reference: fuzz.ratio(text, reference) / 100.0


def wordnet_problem() -> str | None:
    """Why NLTK's WordNet (which METEOR needs for synonyms) cannot be loaded here, or None when it can."""
    import nltk

    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
    except LookupError:
        return "no wordnet corpus in NLTK's data path: " + ", ".join(str(p) for p in nltk.data.path)
    except OSError as exc:
        return f"the wordnet corpus does not load: {exc}"
    return None


def _meteor_similarity() -> Callable[[str, str], float]:
    from nltk.translate.meteor_score import single_meteor_score

    return lambda text, reference: float(single_meteor_score(reference.split(), text.split()))


class TextSimilarityRunner(GraderRunner):
    """A similarity in [0, 1]: fuzzy_match (rapidfuzz ratio), bleu (sacrebleu sentence BLEU / 100), gleu (nltk
    sentence_gleu on whitespace tokens), meteor (nltk, needs WordNet), rouge_1..5 / rouge_l (rouge-score
    F-measure). Passes at or above pass_threshold."""

    def __init__(self, spec: TextSimilarityGrader):
        self.name, self.threshold = spec.name, spec.pass_threshold
        self.templates = [Template(spec.input, grader=spec.name, where="input"),
                          Template(spec.reference, grader=spec.name, where="reference")]
        metric = spec.evaluation_metric
        if metric == "cosine":
            raise GraderError(f"grader {spec.name!r}: evaluation_metric cosine compares embeddings, and tuneforge "
                              "runs no embeddings model; use fuzzy_match, bleu, gleu, rouge_1..5 or rouge_l, or a "
                              "score_model grader that judges similarity")
        if metric == "meteor":
            problem = wordnet_problem()
            if problem is not None:
                raise GraderError(
                    f"grader {spec.name!r}: evaluation_metric meteor needs NLTK's WordNet data, which is not "
                    f"installed here ({problem}); install it with `python -m nltk.downloader wordnet` on a machine "
                    "that can reach NLTK's data server (or copy an nltk_data/corpora/wordnet folder and point "
                    "NLTK_DATA at it), or use another metric"
                )
            self.similarity = _meteor_similarity()
        elif metric.startswith("rouge_"):
            self.similarity = _rouge_similarity("rougeL" if metric == "rouge_l" else "rouge" + metric[-1])
        else:
            self.similarity = {"fuzzy_match": _fuzzy_similarity, "bleu": _bleu_similarity,
                               "gleu": _gleu_similarity}[metric]()

    def _grade(self, items, samples):
        results = []
        for rendered in _render_pairs(self.templates, items, samples):
            if isinstance(rendered, str):
                results.append(_failed(rendered))
                continue
            value = min(1.0, max(0.0, float(self.similarity(*rendered))))
            results.append(GradeResult(score=value, passed=None if self.threshold is None else value >= self.threshold))
        return results


# ---------------------------------------------------------------------------------------------- judges


class _ModelRunner(GraderRunner):
    def __init__(self, spec: ScoreModelGrader | LabelModelGrader, judge: Judge):
        self.name, self.judge = spec.name, judge
        self.roles = [_judge_role(m) for m in spec.input]
        self.templates = [Template(m.content, grader=spec.name, where=f"input[{i}].content")
                          for i, m in enumerate(spec.input)]
        params = spec.sampling_params
        if params is not None and params.top_p is not None and params.top_p != 1.0:
            raise GraderError(f"grader {spec.name!r}: sampling_params.top_p is not supported by tuneforge judges "
                              "(they sample with temperature only); leave it out")
        self.temperature = 0.0 if params is None or params.temperature is None else params.temperature
        self.seed = None if params is None else params.seed
        self.max_tokens = DEFAULT_JUDGE_MAX_TOKENS if params is None else params.judge_max_tokens()

    def instruction(self) -> str:
        raise NotImplementedError

    def _ask(self, items, samples) -> list[tuple[str | None, str | None]]:
        """Per item (judge reply, None), or (None, why it was not asked)."""
        rendered = _render_pairs(self.templates, items, samples)
        conversations = [_with_instruction(list(zip(self.roles, r)), self.instruction())
                         for r in rendered if not isinstance(r, str)]
        replies = self.judge.complete(conversations, max_tokens=self.max_tokens, temperature=self.temperature,
                                      seed=self.seed) if conversations else []
        if len(replies) != len(conversations):
            raise RuntimeError(f"grader {self.name!r}: the judge answered {len(replies)} of {len(conversations)} "
                               "conversations")
        answers = iter(replies)
        return [(None, r) if isinstance(r, str) else (next(answers), None) for r in rendered]


def _judge_role(message: Message) -> str:
    # OpenAI's developer role is its system role; local chat templates know only system.
    return "system" if message.role == "developer" else message.role


def _with_instruction(messages: list[tuple[str, str]], instruction: str) -> list[dict[str, str]]:
    """The grader's messages, with the answer-format instruction added to the system message (one is made)."""
    conversation = [{"role": role, "content": content} for role, content in messages]
    if conversation and conversation[0]["role"] == "system":
        conversation[0] = {"role": "system", "content": conversation[0]["content"].rstrip() + "\n\n" + instruction}
    else:
        conversation.insert(0, {"role": "system", "content": instruction})
    return conversation


_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_score(reply: str, low: float, high: float) -> float | None:
    """The judge's score: "result" (or "score") of a JSON reply, else the first number in the text, clamped
    to [low, high]; None when the reply holds no number."""
    value: Any = None
    ok, parsed = parse_json(reply, allow_code_fence=True)
    if ok and isinstance(parsed, dict):
        value = next((parsed[k] for k in ("result", "score") if isinstance(parsed.get(k), (int, float))
                      and not isinstance(parsed.get(k), bool)), None)
    elif ok and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        value = parsed
    if value is None:
        found = _NUMBER.search(reply)
        if found is None:
            return None
        value = float(found.group(0))
    value = float(value)
    if not math.isfinite(value):
        return None
    return min(high, max(low, value))


def parse_label(reply: str, labels: Sequence[str]) -> str | None:
    """The label the judge chose: the reply itself (ignoring case, quotes and a final period), else the label
    named earliest in the reply as a whole word (the longest at a tie); None when it names none."""
    cleaned = reply.strip().strip("\"'`*").rstrip(".").strip().casefold()
    for label in labels:
        if cleaned == label.casefold():
            return label
    best: tuple[int, int, str] | None = None
    for label in labels:
        found = re.search(r"(?<!\w)" + re.escape(label.casefold()) + r"(?!\w)", reply.casefold())
        if found and (best is None or (found.start(), -len(label)) < best[:2]):
            best = (found.start(), -len(label), label)
    return None if best is None else best[2]


class ScoreModelRunner(_ModelRunner):
    """The judge gives a number in `range`; it passes at or above pass_threshold."""

    def __init__(self, spec: ScoreModelGrader, judge: Judge):
        super().__init__(spec, judge)
        self.low, self.high = spec.range
        self.threshold = spec.pass_threshold

    def instruction(self) -> str:
        return (f"Grade the response. Reply with only a number from {_show(self.low)} to {_show(self.high)} "
                "(higher is better), and nothing else.")

    def _grade(self, items, samples):
        results = []
        for reply, failure in self._ask(items, samples):
            if failure is not None:
                results.append(_failed(failure))
                continue
            value = parse_score(reply, self.low, self.high)
            if value is None:
                results.append(_failed(f"the judge gave no number in [{_show(self.low)}, {_show(self.high)}]",
                                       judge_output=reply))
            else:
                passed = None if self.threshold is None else value >= self.threshold
                results.append(GradeResult(score=value, passed=passed, judge_output=reply))
        return results


class LabelModelRunner(_ModelRunner):
    """The judge picks one of `labels`; score 1 and passed when it is one of passing_labels, else 0."""

    def __init__(self, spec: LabelModelGrader, judge: Judge):
        super().__init__(spec, judge)
        self.labels, self.passing = list(spec.labels), set(spec.passing_labels)

    def instruction(self) -> str:
        return "Reply with exactly one of these labels and nothing else: " + ", ".join(self.labels) + "."

    def _grade(self, items, samples):
        results = []
        for reply, failure in self._ask(items, samples):
            if failure is not None:
                results.append(_failed(failure))
                continue
            label = parse_label(reply, self.labels)
            if label is None:
                results.append(_failed(f"the judge named none of the labels {self.labels}", judge_output=reply))
            else:
                passed = label in self.passing
                results.append(GradeResult(score=float(passed), passed=passed, judge_output=reply, label=label))
        return results


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


# ----------------------------------------------------------------------------------------------- multi


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS: dict[str, tuple[Callable[..., float], int | None]] = {
    "min": (lambda *xs: min(xs), None), "max": (lambda *xs: max(xs), None), "abs": (abs, 1),
    "floor": (math.floor, 1), "ceil": (math.ceil, 1), "exp": (math.exp, 1), "sqrt": (math.sqrt, 1),
    "log": (math.log, 1),
}
assert set(_FUNCTIONS) == set(FORMULA_FUNCTIONS)
MAX_FORMULA_DEPTH = 200  # well inside the interpreter's recursion limit, far above any real formula


def compile_formula(text: str, names: Sequence[str]) -> Callable[[dict[str, float]], float]:
    """calculate_output as a function of the graders' scores, allowing only numbers, the grader names,
    + - * /, unary minus, parentheses and min max abs floor ceil exp sqrt log: parsed with ast and walked
    here, never given to eval()."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        why = exc.msg if isinstance(exc, SyntaxError) else "nested too deeply"
        raise GraderError(f"calculate_output {text!r} is not a formula ({why})") from None
    known = set(names)

    def build(node: ast.AST, depth: int = 0) -> Callable[[dict[str, float]], float]:
        if depth > MAX_FORMULA_DEPTH:
            raise GraderError(f"calculate_output {text!r} is nested more than {MAX_FORMULA_DEPTH} levels deep")
        depth += 1
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            number = float(node.value)
            return lambda scores: number
        if isinstance(node, ast.Name) and node.id in known:
            name = node.id
            return lambda scores: scores[name]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op, left, right = _BINARY[type(node.op)], build(node.left, depth), build(node.right, depth)
            return lambda scores: op(left(scores), right(scores))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            op, operand = _UNARY[type(node.op)], build(node.operand, depth)
            return lambda scores: op(operand(scores))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            function, arity = _FUNCTIONS[node.func.id]
            if node.keywords or not node.args or (arity is not None and len(node.args) != arity):
                raise GraderError(f"calculate_output {text!r}: {node.func.id}() takes "
                                  f"{'one number' if arity == 1 else 'one or more numbers'}")
            args = [build(a, depth) for a in node.args]
            return lambda scores: float(function(*(a(scores) for a in args)))
        if isinstance(node, ast.Name):
            raise GraderError(f"calculate_output {text!r} names {node.id!r}, which is neither a grader "
                              f"({', '.join(sorted(known))}) nor a function ({', '.join(_FUNCTIONS)})")
        shown = ast.get_source_segment(text.strip(), node) or type(node).__name__
        raise GraderError(f"calculate_output {text!r}: {shown!r} is not allowed; a formula holds numbers, grader "
                          f"names, + - * / ( ) and {', '.join(_FUNCTIONS)}")

    return build(tree.body)


class MultiRunner(GraderRunner):
    """Each named grader scores the batch; calculate_output combines their scores per item."""

    def __init__(self, spec: MultiGrader, runners: dict[str, GraderRunner]):
        self.name, self.runners, self.threshold = spec.name, runners, spec.pass_threshold
        self.formula = compile_formula(spec.calculate_output, list(runners))
        self.text = spec.calculate_output

    def _grade(self, items, samples):
        graded = {name: runner.grade(items, samples) for name, runner in self.runners.items()}
        results = []
        for index in range(len(items)):
            subs = {name: graded[name][index] for name in self.runners}
            sub_scores = {name: r.score for name, r in subs.items()}
            failed = [f"{name}: {r.error}" for name, r in subs.items() if r.score is None]
            if failed:
                results.append(GradeResult(score=None, passed=None, sub_scores=sub_scores, error="; ".join(failed)))
                continue
            try:
                value = self.formula(sub_scores)
            except (ZeroDivisionError, ValueError, OverflowError) as exc:
                value, why = None, f"calculate_output {self.text!r}: {exc}"
            else:
                why = None if math.isfinite(value) else f"calculate_output {self.text!r} gave {value}"
            if why is not None:
                results.append(GradeResult(score=None, passed=None, sub_scores=sub_scores, error=why))
                continue
            passed = None if self.threshold is None else value >= self.threshold
            results.append(GradeResult(score=value, passed=passed, sub_scores=sub_scores))
        return results
