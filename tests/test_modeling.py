"""load_base_model merges earlier stages' adapters, into a bare body and into a ...ForCausalLM alike."""

from __future__ import annotations

import torch
from conftest import build_tiny_model


def test_body_adapter_merges_into_causal_lm_and_bare_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoModelForCausalLM

    from llm2vec_fast.training.modeling import load_base_model

    base = build_tiny_model("llama", causal_lm=True)
    base.save_pretrained(tmp_path / "base")
    body = AutoModel.from_pretrained(tmp_path / "base")
    adapter = get_peft_model(body, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()

    kwargs = dict(dtype="float32", merge_adapters=[str(tmp_path / "adapter")], bidirectional=False)
    bare = load_base_model(str(tmp_path / "base"), **kwargs)
    causal_lm = load_base_model(str(tmp_path / "base"), model_class=AutoModelForCausalLM, **kwargs)
    merged_bare = bare.layers[0].self_attn.q_proj.weight
    merged_lm = causal_lm.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(merged_bare, original)
    torch.testing.assert_close(merged_lm, merged_bare)
