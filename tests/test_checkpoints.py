"""A PVM checkpoint loads with PVM wherever a model id is used (issue 23).

save_pretrained of a PVM model writes modeling_pvm_qwen3_vl.py and an auto_map, so the Auto
classes and pipeline() with trust_remote_code=True build PVMQwen3VLForConditionalGeneration
(this package's class) and load every PVM weight; the class itself loads without remote
code; a checkpoint without PVM layers stays stock; without the package the file names it.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from pvm_kernels.integrations import (apply_pvm_to_qwen3_vl, load_pvm_qwen3_vl,  # noqa: E402
                                      set_pvm_backend, set_pvm_gate)
from pvm_kernels.integrations.qwen3_vl_model import (REMOTE_CODE_FILE,  # noqa: E402
                                                     PVMQwen3VLForConditionalGeneration,
                                                     PVMQwen3VLModel)
from pvm_kernels.integrations.tiny_qwen3_vl import tiny_batch, tiny_qwen3_vl  # noqa: E402

GRIDS = [(4, 4), None, (8, 4)]


@pytest.fixture(scope="module")
def base():
    return tiny_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def pvm(base):
    torch.manual_seed(0)
    model = apply_pvm_to_qwen3_vl(copy.deepcopy(base), layers=[1, 3], pvm_hidden_size=32,
                                  backend="reference")
    set_pvm_gate(model, 1.5)
    return model


@pytest.fixture(scope="module")
def saved(pvm, tmp_path_factory):
    path = tmp_path_factory.mktemp("pvm-checkpoint")
    pvm.save_pretrained(path)
    return str(path)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_apply_makes_the_pvm_class_and_save_writes_the_loading_file(pvm, saved):
    assert type(pvm) is PVMQwen3VLForConditionalGeneration
    with open(os.path.join(saved, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]  # the published name
    assert config["auto_map"]["AutoModelForImageTextToText"] == \
        "modeling_pvm_qwen3_vl.PVMQwen3VLForConditionalGeneration"
    assert config["text_config"]["pvm_layers"] == [1, 3]
    assert os.path.isfile(os.path.join(saved, REMOTE_CODE_FILE))


def test_every_way_to_load_by_path_gives_identical_logits(pvm, saved):
    from transformers import AutoModel, AutoModelForImageTextToText
    batch = tiny_batch(GRIDS)
    want = logits(pvm, batch)
    loaders = {
        "AutoModelForImageTextToText": lambda: AutoModelForImageTextToText.from_pretrained(
            saved, trust_remote_code=True),
        "PVMQwen3VLForConditionalGeneration": lambda: PVMQwen3VLForConditionalGeneration
        .from_pretrained(saved),
        "load_pvm_qwen3_vl": lambda: load_pvm_qwen3_vl(saved),
    }
    for name, load in loaders.items():
        model = load().eval()
        assert type(model) is PVMQwen3VLForConditionalGeneration, name
        set_pvm_backend(model, "reference")
        assert torch.equal(logits(model, batch), want), name
    # AutoModel: the body without the head, from the same checkpoint
    from transformers import Qwen3VLModel
    _, stock_info = Qwen3VLModel.from_pretrained(saved, output_loading_info=True)
    if [k for k in stock_info["missing_keys"] if ".pvm_block." not in k]:
        # transformers 4.57's Qwen3VLModel cannot read a ...ForConditionalGeneration
        # checkpoint (every language-model weight is missing: the stock class silently runs
        # random weights); the PVM class refuses it instead
        with pytest.raises(ValueError, match="PVM weights are missing"):
            AutoModel.from_pretrained(saved, trust_remote_code=True)
        return
    body = AutoModel.from_pretrained(saved, trust_remote_code=True).eval()
    assert type(body) is PVMQwen3VLModel and sorted(body.language_model._pvm_layers) == [1, 3]
    set_pvm_backend(body, "reference")
    with torch.no_grad():
        torch.testing.assert_close(body(**batch).last_hidden_state,
                                   pvm.model(**batch).last_hidden_state, rtol=0, atol=0)


def test_the_pipeline_generates_the_models_tokens(pvm, saved, tmp_path):
    pytest.importorskip("torchvision", reason="Qwen3-VL's video processor needs torchvision")
    from transformers import pipeline

    from pvm_kernels.integrations.qwen3_vl_inputs import synthetic_image
    from pvm_kernels.integrations.tiny_qwen3_vl import tiny_processor
    processor = tiny_processor(pvm.config)
    path = tmp_path / "with-processor"
    pvm.save_pretrained(path)
    processor.save_pretrained(path)
    prompt = "w11 w12 <|vision_start|> <|image_pad|> <|vision_end|> w13 w14"
    image = synthetic_image(64, 64)
    pipe = pipeline("image-text-to-text", model=str(path), trust_remote_code=True)
    assert type(pipe.model) is PVMQwen3VLForConditionalGeneration
    set_pvm_backend(pipe.model, "reference")
    got = pipe(images=image, text=prompt, max_new_tokens=6,
               generate_kwargs=dict(do_sample=False), return_full_text=False)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        tokens = pvm.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.batch_decode(tokens[:, inputs["input_ids"].shape[1]:],
                                  skip_special_tokens=True)[0]
    assert got[0]["generated_text"].split() == want.split()
    stock = copy.deepcopy(pvm)
    set_pvm_gate(stock, 0.0)  # the same model without PVM says something else
    with torch.no_grad():
        assert not torch.equal(stock.generate(**inputs, max_new_tokens=6, do_sample=False), tokens)


def test_a_checkpoint_without_pvm_layers_loads_as_stock(base, saved, tmp_path):
    from transformers import AutoModelForImageTextToText, Qwen3VLForConditionalGeneration
    base.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / REMOTE_CODE_FILE)
    batch = tiny_batch(GRIDS)
    want = logits(base, batch)
    # after a trust_remote_code load, transformers maps Qwen3VLConfig to the PVM class
    # process-wide: a stock checkpoint through the Auto class must still be the stock model
    AutoModelForImageTextToText.from_pretrained(saved, trust_remote_code=True)
    for model in (AutoModelForImageTextToText.from_pretrained(tmp_path),
                  AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True),
                  PVMQwen3VLForConditionalGeneration.from_pretrained(tmp_path)):
        assert isinstance(model, Qwen3VLForConditionalGeneration)
        assert not getattr(model.model.language_model, "_pvm_layers", None)
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).logits, want)


def test_missing_pvm_weights_are_an_error(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    state = load_file(os.path.join(saved, "model.safetensors"))
    dropped = "model.language_model.layers.3.pvm_block.gate_alpha"
    del state[dropped]
    for name in os.listdir(saved):
        if name != "model.safetensors":
            with open(os.path.join(saved, name), "rb") as src:
                (tmp_path / name).write_bytes(src.read())
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="PVM weights are missing.*layers.3.pvm_block.gate_alpha"):
        PVMQwen3VLForConditionalGeneration.from_pretrained(tmp_path)


def test_a_published_layout_checkpoint_still_loads(pvm, saved, tmp_path):
    """The published checkpoints have no loading file and no auto_map: both loaders still
    read them (the PVM keys, config fields and architecture are the same)."""
    for name in os.listdir(saved):
        if name != REMOTE_CODE_FILE:
            with open(os.path.join(saved, name), "rb") as src:
                (tmp_path / name).write_bytes(src.read())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    batch = tiny_batch(GRIDS)
    for model in (load_pvm_qwen3_vl(str(tmp_path)),
                  PVMQwen3VLForConditionalGeneration.from_pretrained(tmp_path)):
        set_pvm_backend(model, "reference")
        assert torch.equal(logits(model.eval(), batch), logits(pvm, batch))


def test_without_the_package_the_checkpoint_names_it(saved, tmp_path):
    """A user without pvm-kernels gets an error naming it, not a model without PVM."""
    code = (
        "import sys\n"
        "sys.modules['pvm_kernels'] = None  # the package is not installed\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"AutoModelForImageTextToText.from_pretrained({saved!r}, trust_remote_code=True)\n")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=300)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and "pip install pvm-kernels" in last, res.stderr[-2000:]
