"""Tiny random-init checkpoints of the causal-LM families users bring (hidden 32, 2 layers), built in
seconds with the demo tokenizer, and a tiny BERT encoder: what the family matrix runs every stage on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HIDDEN, LAYERS, HEADS, FFN = 32, 2, 2, 64

# family -> (config class name in transformers, the family's own size arguments)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "opt": ("OPTConfig", {"ffn_dim": FFN, "word_embed_proj_dim": HIDDEN, "do_layer_norm_before": True}),
    "olmo": ("OlmoConfig", {}),
    "smollm3": ("SmolLM3Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
}

COMMON = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
          "intermediate_size": FFN, "max_position_embeddings": 512, "tie_word_embeddings": False}


def build_family_model(family: str, out: str | Path, *, pad: bool = True, chat_template: bool = True,
                       seed: int = 0, positions: int = 512) -> Path:
    """A random-init `family` causal LM with the demo tokenizer. `pad=False`: a tokenizer with no pad
    token (as GPT-2, Llama-3 and Mistral base ship); `chat_template=False`: none (a base model);
    `positions`: its max_position_embeddings (GPT-2's n_positions)."""
    import torch
    import transformers

    from align.demo_model import build_tokenizer

    class_name, extra = FAMILIES[family]
    tokenizer = build_tokenizer(384, seed)
    if not pad:
        tokenizer.pad_token = None
    if not chat_template:
        tokenizer.chat_template = None
    config_class = getattr(transformers, class_name)
    kwargs = {**COMMON, **extra, "max_position_embeddings": positions} if family != "gpt2" \
        else {**extra, "n_positions": positions}
    config = config_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **kwargs)
    config.pad_token_id = tokenizer.pad_token_id  # some families default to an id of their own vocabulary
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not pad:  # the demo vocabulary has a <pad> token: rename it, so the tokenizer has truly none to reuse
        for name in ("tokenizer.json", "tokenizer_config.json"):
            path = out / name
            path.write_text(path.read_text(encoding="utf-8").replace('"<pad>"', '"<unused0>"'), encoding="utf-8")
    return out


ENCODERS = {"bert": "BertConfig", "roberta": "RobertaConfig", "deberta-v2": "DebertaV2Config",
            "modernbert": "ModernBertConfig", "electra": "ElectraConfig"}


def build_tiny_bert(out: str | Path, seed: int = 0, family: str = "bert", positions: int = 520) -> Path:
    """A random-init 2-layer encoder (`family`: bert, roberta, deberta-v2, modernbert, electra) with a WordPiece
    tokenizer ([CLS]/[SEP]/[PAD], no eos, no chat template), saved as a bare encoder, as
    all-MiniLM-L6-v2 ships (the classification head is new). `positions`: its max_position_embeddings."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoModel, PreTrainedTokenizerFast

    from align.demo_model import tokenizer_corpus

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(tokenizer_corpus(seed, n=1000),
                            trainer=trainers.WordPieceTrainer(vocab_size=400, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",  # BERT's: the second text is segment 1
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
                                   model_input_names=(["input_ids", "token_type_ids", "attention_mask"]  # as these
                                                      if family in ("bert", "deberta-v2", "electra")  # families' own
                                                      else ["input_ids", "attention_mask"]))
    config = getattr(transformers, ENCODERS[family])(
        vocab_size=len(fast), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=positions, pad_token_id=fast.pad_token_id,
        bos_token_id=fast.cls_token_id, eos_token_id=fast.sep_token_id, cls_token_id=fast.cls_token_id,
        sep_token_id=fast.sep_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    out = Path(out)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
