"""The Evals API's shapes: what OpenAI's client sends validates, what tuneforge cannot honour is refused by
name (python graders, sampling, stored completions, remote schemas), items are checked against the item
schema field by field, templates name the item and field they miss, and a run's job section is consistent."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tuneforge.data.eval_items import load_eval_rows
from tuneforge.data.problems import DataError
from tuneforge.spec.evals import (
    EvalCreateRequest,
    EvalRunSpec,
    OutputItemRecord,
    RunCreateRequest,
    TemplateDataError,
    eval_run_spec,
    item_problems,
    read_output_items,
    referenced_messages,
    render_item_template,
    write_output_items,
)
from tuneforge.spec.job import JobSpec

SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "string"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["q", "a"]}
CHECK = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
         "operation": "eq"}
SIMILAR = {"type": "text_similarity", "name": "similar", "input": "{{sample.output_text}}", "reference": "{{item.a}}",
           "evaluation_metric": "bleu", "pass_threshold": 0.5}


def create(**changes) -> EvalCreateRequest:
    body = {"name": "e", "data_source_config": {"type": "custom", "item_schema": SCHEMA}, "testing_criteria": [CHECK]}
    return EvalCreateRequest.model_validate({**body, **changes})


def completions(**changes) -> dict:
    return {"data_source": {"type": "completions", "model": "tiny-llama",
                            "source": {"type": "file_content", "content": [{"item": {"q": "x", "a": "y"}}]},
                            "input_messages": {"type": "template", "template": [
                                {"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "input_text", "text": "{{item.q}}"}]}]},
                            **changes}}


def test_what_openais_client_sends_validates():
    request = create(testing_criteria=[CHECK, SIMILAR], metadata={"team": "qa"})
    assert [g.name for g in request.testing_criteria] == ["exact", "similar"]
    schema = request.data_source_config.schema_object()
    assert schema["properties"]["item"] == SCHEMA and schema["required"] == ["item"]
    run = RunCreateRequest.model_validate(completions(sampling_params={"max_completion_tokens": 16, "seed": 1,
                                                                       "temperature": 0.0, "top_p": 1.0}))
    assert run.data_source.input_messages.template[1].content == "{{item.q}}"  # text parts joined
    jsonl = RunCreateRequest.model_validate({"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "file-1"}}})
    assert jsonl.data_source.source.id == "file-1"


@pytest.mark.parametrize(("changes", "message"), [
    ({"testing_criteria": [{"type": "python", "name": "p", "source": "import os"}]}, "python grader runs arbitrary code"),
    ({"testing_criteria": [{**SIMILAR, "pass_threshold": None}]}, "needs pass_threshold"),
    ({"testing_criteria": [CHECK, CHECK]}, "must be unique"),
    ({"testing_criteria": []}, "at least 1"),
    ({"data_source_config": {"type": "logs"}}, "does not keep"),
    ({"data_source_config": {"type": "custom"}}, "item_schema: required"),
    ({"data_source_config": {"type": "custom", "item_schema": {"$ref": "https://example.com/s.json"}}},
     "only references inside the schema"),
    ({"data_source_config": {"type": "custom", "item_schema": {"type": "objekt"}}}, "not a JSON Schema"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "at most 16"),
])
def test_evals_that_cannot_work_are_refused_by_name(changes, message):
    with pytest.raises(ValidationError, match=message):
        create(**changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"sampling_params": {"temperature": 0.7}}, "greedy decoding"),
    ({"sampling_params": {"top_p": 0.9}}, "greedy decoding"),
    ({"sampling_params": {"tools": [{"type": "function"}]}}, "tools is not supported"),
    ({"model": None}, "model: required"),
    ({"input_messages": None}, "input_messages: required"),
    ({"input_messages": {"type": "template", "template": [{"role": "user", "content": "{{sample.output_text}}"}]}},
     "item.<field> only"),
    ({"source": {"type": "stored_completions", "model": "gpt-4o"}}, "does not keep"),
])
def test_runs_that_cannot_work_are_refused_by_name(changes, message):
    with pytest.raises(ValidationError, match=message):
        RunCreateRequest.model_validate(completions(**changes))
    with pytest.raises(ValidationError, match="Responses API"):
        RunCreateRequest.model_validate({"data_source": {"type": "responses", "source": {"type": "file_id", "id": "f"}}})


def test_items_are_checked_field_by_field():
    assert item_problems(SCHEMA, {"q": "x", "a": "y"}) == []
    problems = item_problems(SCHEMA, {"q": 1, "tags": ["ok", 2]})
    assert problems == ["item: 'a' is a required property", "item.q: 1 is not of type 'string'",
                        "item.tags[1]: 2 is not of type 'string'"]


def test_templates_name_the_item_and_the_field_they_miss():
    item = {"q": "Capital?", "meta": {"n": 2}, "choices": ["A", "B"]}
    assert render_item_template("{{item.q}} {{ item.meta }} {{item.choices.1}}", item, 0) == 'Capital? {"n": 2} B'
    with pytest.raises(TemplateDataError, match="item 3 has no field 'meta.x'"):
        render_item_template("{{item.meta.x}}", item, 3)
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert referenced_messages(conversation, "item.messages", 0)[1] == {"role": "assistant", "content": "yo"}
    with pytest.raises(TemplateDataError, match="item 1: item.messages\\[0\\] is not a message"):
        referenced_messages({"messages": [{"role": "robot", "content": "x"}]}, "item.messages", 1)


def test_a_runs_job_section_is_consistent():
    request = RunCreateRequest.model_validate(completions(sampling_params={"max_completion_tokens": 9, "seed": 4}))
    section = eval_run_spec(eval_id="eval_1", data_source=request.data_source, testing_criteria=[CHECK],
                            item_schema=SCHEMA)
    assert section.model == "tiny-llama" and section.max_completion_tokens == 9 and section.seed == 4
    spec = JobSpec.model_validate({"method": "eval", "dataset": {"path": "file-1"}, "eval_run": section.model_dump()})
    assert spec.eval_run.generates() and spec.eval_run.item_schema == SCHEMA
    jsonl = eval_run_spec(eval_id="eval_1", testing_criteria=[CHECK], item_schema=SCHEMA,
                          data_source=RunCreateRequest.model_validate(
                              {"data_source": {"type": "jsonl", "source": {"type": "file_id", "id": "f"}}}).data_source)
    assert not jsonl.generates() and jsonl.input_messages is None
    with pytest.raises(ValidationError, match="needs eval_run.testing_criteria"):
        JobSpec.model_validate({"method": "eval", "dataset": {"path": "f"}})
    with pytest.raises(ValidationError, match="applies to method eval only"):
        JobSpec.model_validate({"dataset": {"path": "f"}, "eval_run": {"testing_criteria": [CHECK]}})
    with pytest.raises(ValidationError, match="one process"):
        JobSpec.model_validate({"method": "eval", "dataset": {"path": "f"}, "resources": {"num_gpus": 2},
                                "eval_run": {"testing_criteria": [CHECK]}})
    with pytest.raises(ValidationError, match="exactly one of input_messages"):
        EvalRunSpec(model="tiny-llama", testing_criteria=[CHECK])
    with pytest.raises(ValidationError, match="need a model"):
        EvalRunSpec(input_reference="item.messages", testing_criteria=[CHECK])


def test_eval_files_read_both_shapes_and_name_bad_lines(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"item": {"q": "a"}, "sample": {"output_text": "b"}}\n{"q": "bare"}\n')
    rows = load_eval_rows(path)
    assert [(r.line, r.item, r.sample) for r in rows] == [(1, {"q": "a"}, {"output_text": "b"}), (2, {"q": "bare"}, None)]
    path.write_text('{"item": {"q": "a"}}\n{"item": "text"}\nnot json\n')
    with pytest.raises(DataError) as bad:
        load_eval_rows(path, display_name="items.jsonl")
    assert [(p.line, p.kind, p.field) for p in bad.value.problems] == [(2, "wrong_type", "item"), (3, "not_json", "")]


def test_output_items_round_trip(tmp_path):
    records = [OutputItemRecord(index=0, status="pass", item={"q": "a"}, sample={"output_text": "b"},
                                results=[{"name": "exact", "score": 1.0, "passed": True}])]
    write_output_items(tmp_path, records)
    assert read_output_items(tmp_path) == records


def test_the_evaluated_model_travels_as_a_registered_id_and_the_worker_swaps_it():
    from pathlib import Path

    from tuneforge.scheduler.launch import materialize_spec
    from tuneforge.spec.openai_jobs import registered_models

    spec = JobSpec.model_validate({"method": "eval", "model": {"base_model": "tiny-llama"}, "dataset": {"path": "file-1"},
                                   "eval_run": {"model": "ft:tiny-llama:t::abc", "input_reference": "item.messages",
                                                "testing_criteria": [CHECK]}})
    assert registered_models(spec) == [("eval_run.model", "ft:tiny-llama:t::abc")]
    local = materialize_spec(spec, {"file-1": Path("/blobs/1")}, {"ft:tiny-llama:t::abc": Path("/home/jobs/j/adapter")})
    assert local.eval_run.model == "/home/jobs/j/adapter" and spec.eval_run.model == "ft:tiny-llama:t::abc"
