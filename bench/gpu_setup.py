"""What every row of bench/gpu_bench.py shares: the model shapes it builds and the LoRA targets both
trainers train, steps 1-2 (the tokenizer and the random-init Qwen2), and the peak memory each worker
reports."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# hidden, MLP, layers, query heads, key-value heads, tokenizer size (Qwen2.5 config.json bodies)
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab": 512},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab": 32000},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab": 32000},
}


# ============================================================================ 1-2. tokenizer and model


def corpus(data: Path) -> list[str]:
    """The HH-RLHF transcripts and every OpenAssistant message and prompt."""
    texts = []
    with gzip.open(data / "hh-rlhf" / "harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]

    def walk(node: dict) -> None:
        texts.append(node.get("text", ""))
        for child in node.get("replies", []):
            walk(child)

    for line in (data / "oasst" / "en_100_tree.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            walk(json.loads(line)["prompt"])
    texts += prompts(data)
    return texts


def prompts(data: Path) -> list[str]:
    lines = (data / "oasst" / "prompt_lottery_en_250_text.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def build_tokenizer(data: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from align.chat import DEMO_CHAT_TEMPLATE
    from align.demo_model import SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(data), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=32768)
    fast.chat_template = DEMO_CHAT_TEMPLATE
    return fast


def reused_as_built(built: object, wanted: object, what: str, record: Path) -> None:
    """--reuse takes an earlier run's model or reward model only where it was built as this run asks."""
    if built != wanted:
        raise SystemExit(f"--reuse: the {what} in {record.parent} was built with {built}, this run asks for "
                         f"{wanted}; leave out --reuse (or match those settings)")


def build_model(out: Path, shape: str, data: Path, device: str, seed: int) -> dict:
    """Tokenizer + random-init Qwen2 saved at `out` (bf16 on a GPU, fp32 on the CPU); returns its sizes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = dict(SHAPES[shape])
    tokenizer = build_tokenizer(data, spec.pop("vocab"))
    config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=32768, rope_theta=1_000_000.0,
                         tie_word_embeddings=True, use_sliding_window=False, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    del model
    if device != "cpu":  # the workers that follow measure a card this process holds no cached blocks of
        torch.cuda.empty_cache()
    return {"parameters": params, "non_embedding": params - embed, "vocab": len(tokenizer)}


# ============================================================================ peak memory (every worker reports it)


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    from align.run import peak_memory_mb  # VmHWM: ru_maxrss would count the parent's memory too

    return peak_memory_mb() / 1024


def peak_reserved_gib() -> float | None:
    """The caching allocator's peak reserve (what the GPU must hold: allocations plus the allocator's
    cached and fragmented blocks), None on the CPU."""
    import torch

    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
