"""The real SmolLM2-135M-Instruct (bundled GGUF, converted once): greedy and DoLa token-identical to transformers."""

import pytest
import torch
from test_models import first_diff

import lcdfast
from lcdfast.api import dola_candidates
from lcdfast.generate import DecodeConfig, generate_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoModelForCausalLM

    from lcdfast.convert import default_model_dir

    path = default_model_dir()
    engine = lcdfast.load(path)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return engine, hf


def hf_generate(hf, ids: list[int], n: int, **kwargs) -> list[int]:
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          eos_token_id=None, pad_token_id=2, **kwargs)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(smollm):
    engine, hf = smollm
    for text in PROMPTS:
        ids = engine.tokenizer.encode(text)
        ours, _, _, _ = generate_ids(engine.model, [ids], DecodeConfig(), 32, [])
        ref = hf_generate(hf, ids, 32, do_sample=False)
        assert ours[0] == ref, f"{text!r}: " + first_diff(ours[0], ref)


@pytest.mark.parametrize("layers", ["low", "high", [4, 10, 16, 22]])
def test_dola_matches_transformers(smollm, layers):
    engine, hf = smollm
    candidates = dola_candidates(layers, 30, True)
    dc = DecodeConfig(method="dola", exit_layers=candidates, exit_norm=False, repetition_penalty=1.2,
                      dola_batch_mode=True)
    for text in PROMPTS[:2]:
        ids = engine.tokenizer.encode(text)
        ours, _, _, _ = generate_ids(engine.model, [ids], dc, 24, [])
        ref = hf_generate(hf, ids, 24, do_sample=False, dola_layers=layers, repetition_penalty=1.2)
        assert ours[0] == ref, f"{layers} {text!r}: " + first_diff(ours[0], ref)


def test_batched_matches_one_by_one_and_masked_acd_is_exact(smollm):
    engine, _ = smollm
    batched = engine.generate(PROMPTS, max_new_tokens=16, method="acd", amateur_layer=15)
    for prompt, row in zip(PROMPTS, batched):
        alone = engine.generate(prompt, max_new_tokens=16, method="acd", amateur_layer=15)[0]
        assert row.token_ids == alone.token_ids, prompt
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    masked, _, _, _ = generate_ids(engine.model, ids, DecodeConfig(method="acd", exit_layers=(15,)), 16, [])
    full, _, _, _ = generate_ids(engine.model, ids, DecodeConfig(method="acd", exit_layers=(15,), head_candidates=0),
                                 16, [])
    assert masked == full


def test_no_bos_and_chat_template(smollm):
    engine, _ = smollm
    assert engine.tokenizer.encode("Hello")[0] != 1  # the GGUF says add_bos_token = False
    ids = engine.encode_prompt("Hi", chat=True)
    assert engine.tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
