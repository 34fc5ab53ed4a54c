"""Model families: every task names one, and what depends on the kind of model asks the family."""

import pytest
import torch

from edgefed.components import adapter_spec, method_of, resolve_config
from edgefed.families import FAMILIES
from edgefed.tasks import TASKS


def test_every_task_names_a_registered_family():
    assert {TASKS.create(name).family for name in TASKS.names()} <= set(FAMILIES.names())


@pytest.mark.parametrize("name", FAMILIES.names())
def test_a_family_loads_its_model_and_evaluates_it(name, tiny_model_dir, tiny_llama_dir, small_data_dir):
    """Each family on its tiny model (a BERT; a Llama for decoders): what it loads trains its new
    modules, and its evaluation of the model on a few examples is finite, with an accuracy in [0, 1]."""
    task = next(TASKS.create(t) for t in TASKS.names() if TASKS.create(t).family == name)
    family = FAMILIES.create(name)
    model_dir = str(tiny_llama_dir if name == "causal-lm" else tiny_model_dir)
    model, new_modules = family.load(model_dir, 2)
    assert all(isinstance(module, str) for module in new_modules)
    if task.name == "multitask":
        return  # its examples carry each task's label names: tests/test_fewfedweight.py evaluates it
    from edgefed.models import load_tokenizer
    from edgefed.tasks import DataSettings

    _, evaluation = task.load_data(DataSettings(str(small_data_dir), 0, 2, "iid", eval_limit=8))
    examples = task.encode(evaluation, load_tokenizer(model_dir), 16)
    result = family.evaluate(model, examples, torch.device("cpu"))
    assert 0.0 <= result.accuracy <= 1.0 and torch.isfinite(torch.tensor(result.loss))


@pytest.mark.parametrize(
    ("method", "peft_task_type", "head"),
    [("federa", "SEQ_CLS", ("classifier",)), ("fdapt", None, ())],
)
def test_the_adapter_spec_asks_the_family(method, peft_task_type, head):
    config = resolve_config(None, {"method": method})
    spec = adapter_spec(config, method_of(config), ())
    assert (spec.peft_task_type, spec.head_modules) == (peft_task_type, head)
