import pytest

from tuneforge.spec import SpecError, validate_job_spec
from tuneforge.spec.hyperparameters import auto_batch_size, auto_epochs, resolve_hyperparameters


def spec(**training):
    return validate_job_spec({"dataset": {"path": "d"}, "training": training})


def test_auto_epochs_follow_openais_rule():
    assert auto_epochs(20) == 5.0  # 100 examples seen at least
    assert auto_epochs(10) == 10.0
    assert auto_epochs(1000) == 3.0
    assert auto_epochs(20_000) == 1.0  # at most 25,000 seen, at least one epoch
    assert auto_epochs(2) == 25.0  # capped


def test_auto_batch_grows_with_the_data():
    assert auto_batch_size(320) == 8 and auto_batch_size(10_000) == 16 and auto_batch_size(10**7) == 256
    assert auto_batch_size(10_000, world_size=3) == 18  # every device gets the same share


def test_learning_rate_depends_on_the_method():
    full = validate_job_spec({"dataset": {"path": "d"}, "adapter": {"type": "full"}})
    assert resolve_hyperparameters(full, 100).training.learning_rate == 2e-5
    assert resolve_hyperparameters(spec(), 100).training.learning_rate == 2e-4
    assert resolve_hyperparameters(spec(learning_rate=1e-3), 100).training.learning_rate == 1e-3


def test_batch_sizes_resolve_consistently():
    explicit = resolve_hyperparameters(spec(per_device_batch_size=4, gradient_accumulation_steps=3), 1000)
    assert explicit.training.batch_size == 12
    from_batch = resolve_hyperparameters(spec(batch_size=32, gradient_accumulation_steps=4), 1000)
    assert from_batch.training.per_device_batch_size == 8
    measured = resolve_hyperparameters(spec(batch_size=32), 1000, micro_batch=6)
    assert (measured.training.per_device_batch_size, measured.training.gradient_accumulation_steps) == (6, 6)
    with pytest.raises(SpecError, match="must equal per_device_batch_size x gradient_accumulation_steps"):
        spec(batch_size=10, per_device_batch_size=4, gradient_accumulation_steps=2)



def test_a_packed_auto_batch_holds_as_many_examples_as_an_unpacked_one():
    # 400 short chats packed ~4 to a row: the auto batch of 8 examples becomes 2 rows, not 8 rows (~33 examples).
    packed = resolve_hyperparameters(spec(), 400, num_rows=100)
    unpacked = resolve_hyperparameters(spec(), 400)
    assert unpacked.training.batch_size == 8 and packed.training.batch_size == 2
    assert packed.training.num_epochs == unpacked.training.num_epochs  # epochs follow the examples too
    two_gpus = validate_job_spec({"dataset": {"path": "d"}, "resources": {"num_gpus": 2}})
    assert resolve_hyperparameters(two_gpus, 400, num_rows=100).training.batch_size == 2  # a row per device
    assert resolve_hyperparameters(spec(), 400, num_rows=400).training.batch_size == 8  # one example per row


def test_padding_free_and_packing_are_refused_where_they_would_be_ignored():
    with pytest.raises(SpecError, match="training.padding_free applies without packing"):
        spec(packing=True, padding_free=True)
    for method, section in (("dpo", "packing"), ("reward", "padding_free"), ("grpo", "packing")):
        with pytest.raises(SpecError, match=f"training.{section}: method {method} batches its own records"):
            validate_job_spec({"method": method, "dataset": {"path": "d"}, "training": {section: True}})
    assert spec(packing=False, padding_free=True).training.padding_free is True
