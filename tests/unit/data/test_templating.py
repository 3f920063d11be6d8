import torch

from tuneforge.data.batching import StepSchedule, collate, micro_batches
from tuneforge.data.formats import Example
from tuneforge.data.templating import IGNORE_INDEX, PromptRenderer, resolve_template, tokenize_examples


def trained_text(tokenizer, item) -> str:
    """The decoded tokens that carry loss, in order."""
    return tokenizer.decode([int(t) for t, label in zip(item.input_ids, item.labels) if label != IGNORE_INDEX])


def chat_example(messages, line=1):
    return Example(line, "chat", {"messages": messages})


def test_loss_covers_exactly_the_assistant_reply_and_its_end_of_turn(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    item = renderer.tokenize(chat_example([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]))
    assert trained_text(byte_tokenizer, item) == "Paris.<|im_end|>"
    # The end-of-turn token is trained although pad and EOS share its id.
    assert byte_tokenizer.pad_token_id == byte_tokenizer.eos_token_id
    eot = len(item.input_ids) - 2  # the template ends "<|im_end|>\n"
    assert item.input_ids[eot] == byte_tokenizer.eos_token_id and item.labels[eot] == byte_tokenizer.eos_token_id
    # Nothing after the end-of-turn token (the template's newline) is trained.
    assert item.labels[-1] == IGNORE_INDEX


def test_multi_turn_and_weight_zero(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    item = renderer.tokenize(chat_example([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "third"},
    ]))
    assert trained_text(byte_tokenizer, item) == "second<|im_end|>third<|im_end|>"


def test_instruction_and_completion_templates(byte_tokenizer):
    instruction = Example(1, "instruction", {"instruction": "Add", "input": "2+2", "output": "4"})
    completion = Example(2, "completion", {"prompt": "The sky is", "completion": " blue"})
    chat_item = PromptRenderer(byte_tokenizer, "chat").tokenize(instruction)
    assert trained_text(byte_tokenizer, chat_item) == "4<|im_end|>"
    alpaca = PromptRenderer(byte_tokenizer, "alpaca")
    text, _ = alpaca.render(instruction)
    assert "### Instruction:\nAdd\n\n### Input:\n2+2\n\n### Response:\n4" in text
    assert trained_text(byte_tokenizer, alpaca.tokenize(instruction)) == "4<|im_end|>"
    plain = PromptRenderer(byte_tokenizer, resolve_template("auto", "completion", byte_tokenizer))
    assert plain.template == "plain"
    assert trained_text(byte_tokenizer, plain.tokenize(completion)) == " blue<|im_end|>"


def test_generation_prompt_stops_before_the_last_answer(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    prompt, reference = renderer.generation_prompt(chat_example([
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))
    assert prompt.endswith("<|im_start|>assistant\n") and reference == "hello"


def test_too_long_policies(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    examples = [chat_example([{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "ok"}], line=n)
                for n in (5, 200)]
    kept, stats = tokenize_examples(examples, renderer, max_seq_length=100, too_long="drop")
    assert len(kept) == 1 and stats.dropped_too_long == 1
    # Truncating the long one cuts off its only answer, so it has nothing left to train on.
    kept, stats = tokenize_examples(examples, renderer, max_seq_length=100, too_long="truncate")
    assert len(kept) == 1 and stats.truncated == 1 and stats.dropped_no_labels == 1
    try:
        tokenize_examples(examples, renderer, max_seq_length=100, too_long="error", file="d.jsonl")
    except ValueError as exc:
        assert "d.jsonl:200" in str(exc)
    else:
        raise AssertionError("too_long=error did not raise")


def test_collate_pads_without_loss(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    items = [renderer.tokenize(chat_example([{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "y"}]))
             for n in (1, 9)]
    batch = collate(items, byte_tokenizer.pad_token_id)
    short = len(items[0].input_ids)
    assert batch["input_ids"].shape == (2, len(items[1].input_ids))
    assert batch["attention_mask"][0, short:].sum() == 0
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][1], torch.tensor(items[1].labels, dtype=torch.long))


def test_step_schedule_is_a_pure_function_of_the_step():
    schedule = StepSchedule(10, examples_per_step=6, seed=5, num_epochs=2)
    assert schedule.steps_per_epoch == 2 and schedule.total_steps == 4
    epoch0 = schedule.plan(0).example_ids + schedule.plan(1).example_ids
    assert sorted(epoch0) == list(range(10))  # every example once per epoch
    assert [len(b) for b in micro_batches(schedule.plan(1).example_ids, 3)] == [3, 1]
    fresh = StepSchedule(10, examples_per_step=6, seed=5, num_epochs=2)
    assert fresh.plan(3) == schedule.plan(3)
    assert schedule.plan(2).example_ids != schedule.plan(0).example_ids  # epochs reshuffle
    assert StepSchedule(10, examples_per_step=6, seed=5, max_steps=7).total_steps == 7


def test_marked_render_agrees_with_prefix_renders(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    conversations = [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 0},
         {"role": "user", "content": "e"}, {"role": "assistant", "content": "f\n"}],
    ]
    for messages in conversations:
        text = renderer._apply(messages, generation_prompt=False)
        assert renderer._marked_spans(messages, text) == renderer._prefix_spans(messages, text)


def test_a_template_that_rewrites_content_falls_back_to_prefix_renders(byte_tokenizer):
    from transformers import PreTrainedTokenizerFast

    stripping = PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|im_end|>",
        chat_template="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    renderer = PromptRenderer(stripping, "chat")
    example = chat_example([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  padded answer  "}])
    text = renderer._apply(example.as_messages(), generation_prompt=False)
    assert renderer._marked_spans(example.as_messages(), text) is None
    assert trained_text(stripping, renderer.tokenize(example)) == "padded answer<|im_end|>"


def test_batched_backend_tokenization_equals_the_tokenizer_call(byte_tokenizer):
    renderer = PromptRenderer(byte_tokenizer, "chat")
    examples = [chat_example([{"role": "user", "content": f"q{i} é"}, {"role": "assistant", "content": "ü" * i}])
                for i in range(5)]
    for example, item in zip(examples, renderer.tokenize_many(examples)):
        text, _ = renderer.render(example)
        assert list(item.input_ids) == byte_tokenizer(text, add_special_tokens=False).input_ids
