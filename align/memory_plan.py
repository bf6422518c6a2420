"""Memory plan of align's training stages: bytes per device (or per FSDP rank), term by term.

Every term follows the dtype choices the code makes:

* frozen base weights in the stage's `dtype` (PPOConfig/DPOConfig `dtype`, RewardConfig `model.dtype`);
* everything trained in fp32 with an fp32 gradient and two fp32 AdamW moments, 16 bytes a parameter
  (`align.precision.upcast_trainable`; peft keeps a LoRA adapter fp32 on a bf16 base);
* PPO's reference is the policy with its adapter disabled (no second copy, `ppo.model.Reference`);
  the value head is an fp32 linear on the policy's last hidden state; the critic
  (`value_model=reward_model`) is a full copy of the reward model, all of it trained in fp32
  (`ppo.model.build_critic`) and run under bf16 autocast, which caches a bf16 copy of its weights;
* the reward model PPO scores with is a merged sequence classifier in `reward_dtype`;
* the rollout's KV cache (`ppo.kv_cache`) holds rollout batch x layers x 2 x kv heads x head dim x
  cache slots (prompt + response rounded up to 64 by `ppo.sampling.cache_slots`, which the command
  passes in as `kv_cache_slots`: align's ground imports no stage) in the model dtype, and
  stays allocated through the optimisation (`ppo.sampling.DecodeBufferPool` keeps it for the next rollout);
* log-probs come from (chunk, vocabulary) fp32 logits, `logprob_chunk_tokens` positions at a time.

The activation terms count the tensors autograd saves in one decoder block, the method of Korthikanti
et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4.1) applied to a
Llama/Qwen block with SwiGLU, grouped-query attention through a fused SDPA kernel (no s x s matrix, one
fp32 log-sum-exp per head) and LoRA on a frozen base. See `block_activation_bytes`.

FSDP2 terms follow align.distributed: frozen weights sharded in the model dtype, trained parameters
and their optimiser state sharded in fp32, one decoder block (plus `prefetch` more) gathered at a
time, and the root unit (embedding, final norm, output layer, value head; a critic's in fp32) gathered
from a forward to its backward; PPO's reward model is sharded too (its root unit gathered while it
scores), and so is the SFT model the reward stage's normalisation samples; `align dpo` under FSDP2 (or gradient checkpointing) reads each response whole
after its prompt.
With `fsdp_ranks=1` the plan is a single device (or a DDP replica).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from align.errors import UserError

FP32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTENTION + MLP
STAGES = ("reward", "ppo", "ppo-critic", "rloo", "grpo", "dpo")
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # decoder blocks of q/k/v/o + gate/up/down, RMSNorm


@dataclass(frozen=True)
class ModelShape:
    """The shape of a Llama-style causal LM, as its config.json states it."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    o_bias: bool = False  # Llama's attention_bias puts one on o_proj too
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's queries and keys

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _preset(name, hidden, inter, layers, heads, kv, vocab, tied, qkv_bias) -> ModelShape:
    return ModelShape(name, hidden, inter, layers, heads, kv, hidden // heads, vocab, tied, qkv_bias)


# The published config.json of each checkpoint (Hugging Face hub, Qwen/Qwen2.5-* and meta-llama/Llama-3.1-*).
PRESETS: dict[str, ModelShape] = {s.name.lower(): s for s in (
    _preset("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, True),
    _preset("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, True),
    _preset("Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, True),
    _preset("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, False, False),
    _preset("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, False, False),
)}


def shape_from_config(config: dict, name: str = "model") -> ModelShape:
    """A ModelShape from a transformers config dict (llama, qwen2, qwen3, mistral)."""
    if not isinstance(config, dict):
        raise UserError(f"{name}: the model's config is not an object of settings")
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{name}: model_type {family!r} is not planned; the memory plan knows {', '.join(FAMILIES)}")
    sizes = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size",
             "num_key_value_heads", "head_dim")
    for key in sizes:  # before any division: whole numbers from 1 to 2**31 (JSON also allows 1e300, -3, Infinity)
        value = config.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 1 <= value <= 2**31 and float(value).is_integer()):
            raise UserError(f"{name}: {key} must be a whole number from 1 to 2**31, got {value!r}")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = ModelShape(
            name=name, hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads), vocab_size=int(config["vocab_size"]),
            # absent from config.json: transformers' default, untied for all four families
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)), qk_norm=family == "qwen3")
    except KeyError as missing:
        raise UserError(f"{name}: the config has no {missing.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise UserError(f"{name}: a size in the config is not a number ({err})") from None
    if min(shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_heads, shape.vocab_size) < 1:
        raise UserError(f"{name}: the config has a size below 1")
    return shape


def load_shape(spec: str) -> ModelShape:
    """A preset name (case-insensitive), a config.json file or a checkpoint directory holding one."""
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"model {spec!r} is neither a preset ({', '.join(s.name for s in PRESETS.values())}) "
                        "nor a config.json or checkpoint directory holding one")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable JSON config ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a config object")
    return shape_from_config(config.get("text_config", config), name=path.parent.name or str(spec))  # the checkpoint's


# ----------------------------------------------------------------------------------- parameters


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int, bool]]:
    """(in features, out features, has bias) of each linear layer of one block."""
    h, i = shape.hidden_size, shape.intermediate_size
    return {"q_proj": (h, shape.q_dim, shape.qkv_bias), "k_proj": (h, shape.kv_dim, shape.qkv_bias),
            "v_proj": (h, shape.kv_dim, shape.qkv_bias), "o_proj": (shape.q_dim, h, shape.o_bias),
            "gate_proj": (h, i, shape.mlp_bias), "up_proj": (h, i, shape.mlp_bias), "down_proj": (i, h, shape.mlp_bias)}


def block_parameters(shape: ModelShape) -> int:
    """One decoder block: its seven linear layers, two RMSNorms (and Qwen3's per-head q/k norms)."""
    linear = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in linear_shapes(shape).values())
    return linear + 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_norm else 0)


def embedding_parameters(shape: ModelShape) -> int:
    return shape.vocab_size * shape.hidden_size


def fsdp_gathered_parameters(shape: ModelShape, prefetch: int, head: int) -> int:
    """FSDP2 as align.distributed.shard wraps a model: the decoder block computing and `prefetch` more
    gathered, and the root unit (embedding, final norm and the `head` parameters of the output layer,
    value head or score head), gathered whole from a forward to its backward."""
    return (1 + prefetch) * block_parameters(shape) + embedding_parameters(shape) + shape.hidden_size + head


def causal_lm_parameters(shape: ModelShape) -> int:
    """AutoModelForCausalLM: embedding, blocks, final norm, and an output layer unless tied."""
    head = 0 if shape.tie_embeddings else embedding_parameters(shape)
    return embedding_parameters(shape) + shape.num_layers * block_parameters(shape) + shape.hidden_size + head


def reward_model_parameters(shape: ModelShape) -> int:
    """AutoModelForSequenceClassification(num_labels=1): the trunk and a bias-free (hidden, 1) `score`."""
    return embedding_parameters(shape) + shape.num_layers * block_parameters(shape) + 2 * shape.hidden_size


def lora_targets(targets: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """['all-linear'] or short names -> the adapted linear layers of each block (every block)."""
    if list(targets) == ["all-linear"]:
        return LINEARS
    unknown = [t for t in targets if t not in LINEARS]
    if unknown or not targets:
        raise UserError(f"LoRA targets {unknown or '[]'} are not linear layers of a block; use all-linear or "
                        f"some of {', '.join(LINEARS)}")
    return tuple(t for t in LINEARS if t in targets)


def lora_parameters(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA (Hu et al. 2021): A (r x in) and B (out x r) for every adapted linear layer of every block."""
    per_block = sum(rank * (n_in + n_out) for name, (n_in, n_out, _) in linear_shapes(shape).items() if name in targets)
    return shape.num_layers * per_block


# ----------------------------------------------------------------------------------- activations


def block_activation_bytes(shape: ModelShape, *, stream_bytes: int, input_copy_bytes: int | None, trained: tuple[str, ...],
                           lora_rank: int) -> int:
    """Bytes autograd keeps per token for one decoder block's backward (Korthikanti et al. 2022, sec. 4.1,
    counted for a Llama/Qwen block instead of GPT's): h hidden, q and kv the query and key/value widths,
    i the MLP width, w = `stream_bytes` (the model dtype).

    * each RMSNorm: its fp32 input (it upcasts) and the fp32 rsqrt per token: 2 x (4h + 4);
    * fused attention (SDPA flash/efficient kernels): q, k, v and the output, w(2q + 2kv), and the fp32
      log-sum-exp per head; no s x s matrix (the eager/math kernel would add heads x s x s per sequence);
    * SwiGLU: SiLU's input and output and the up projection, 3wi;
    * a frozen linear layer keeps nothing (its input is needed only for its own weight's gradient);
      a trained one keeps its input: peft casts it to the fp32 adapter's dtype (a copy of 4 bytes per
      element for each adapted layer, `input_copy_bytes`), or under bf16 autocast to bf16 (2); with
      `input_copy_bytes=None` (fp32 throughout) no copy is made and q/k/v (gate/up) share the norm's output,
      o_proj its attention output; plus the (tokens, r) fp32 output of each LoRA A for the B gradient.

    Checked against torch's saved-tensor hooks on a random-init Qwen2 block (tests/test_memory_plan.py).
    """
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    w, c = stream_bytes, input_copy_bytes
    total = 2 * (4 * h + 4) + w * (2 * q + 2 * kv) + 4 * shape.num_heads + 3 * w * i
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h, "down_proj": i}
    if c is None:  # no copies: a layer keeps the tensor it was given, shared with its siblings
        total += w * h * (any(t in trained for t in ("q_proj", "k_proj", "v_proj")) +
                          any(t in trained for t in ("gate_proj", "up_proj")))
        total += w * i * ("down_proj" in trained)  # o_proj's input is the attention output, kept already
    else:
        total += sum(c * inputs[t] for t in trained)
    return total + (FP32 * lora_rank * len(trained) if lora_rank else 0)


def stack_activation_bytes(shape: ModelShape, tokens: int, per_block: int, stream_bytes: int, checkpointing: bool) -> int:
    """All blocks' saved tensors, or with gradient checkpointing (transformers' per-block, Chen et al.
    2016) each block's input only plus one block's tensors recomputed in the backward; plus the final
    norm (4h + 4 per token)."""
    blocks = (shape.num_layers * stream_bytes * shape.hidden_size + per_block) if checkpointing \
        else shape.num_layers * per_block
    return tokens * (blocks + 4 * shape.hidden_size + 4)


def logits_training_bytes(tokens: int, vocab: int, chunk_tokens: int) -> int:
    """Peak of the log-prob head under autograd (`ppo.core.logprobs_from_hidden`): a chunk of
    min(chunk, tokens) positions (all of them when chunk is 0), four fp32 (chunk, V) buffers at the
    backward's peak: the recomputed log-softmax, the gradient scattered from the gather, exp of the
    log-softmax and the input gradient. An approximation of the allocator's peak."""
    chunk = tokens if chunk_tokens <= 0 else min(chunk_tokens, tokens)
    return 4 * FP32 * chunk * vocab


def logits_inference_bytes(tokens: int, vocab: int, chunk_tokens: int, stream_bytes: int) -> int:
    """No-grad log-probs: the chunk's logits in the model dtype, their fp32 copy and the log-softmax."""
    chunk = tokens if chunk_tokens <= 0 else min(chunk_tokens, tokens)
    return chunk * vocab * (stream_bytes + 2 * FP32)


def kv_cache_bytes(shape: ModelShape, batch: int, slots: int, stream_bytes: int) -> int:
    """The rollout's KV cache: batch x layers x 2 x kv heads x head dim x cache slots, in the model dtype."""
    return batch * shape.num_layers * 2 * shape.kv_dim * slots * stream_bytes


def forward_working_bytes(shape: ModelShape, tokens: int, stream_bytes: int) -> int:
    """A no-grad forward's largest transient (a prefill, a scoring batch): one block's MLP, gate, up,
    SiLU and product (4i), and q, k, v, the attention output and the residual stream (2q + 2kv + 2h),
    in the model dtype. An approximation; the caching allocator's peak may differ by a tensor or two."""
    s = shape
    return tokens * stream_bytes * (4 * s.intermediate_size + 2 * s.q_dim + 2 * s.kv_dim + 2 * s.hidden_size)


# ----------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanSettings:
    """What a stage runs with; the names follow the stage configs."""

    stage: str = "ppo"  # reward | ppo (value head) | ppo-critic (value_model=reward_model) | rloo | grpo | dpo
    dtype: str = "bfloat16"  # storage dtype of the frozen weights (`dtype`, reward's `model.dtype`)
    reward_dtype: str | None = None  # PPO's reward model and critic compute dtype; None: `dtype`
    lora_rank: int = 16  # lora.r
    lora_targets: tuple[str, ...] = ("all-linear",)  # lora.target_modules
    reward_lora: bool = True  # reward stage: LoRA (lora.enabled) or full fine-tuning
    prompt_length: int = 512  # prompt tokens (max_prompt_length)
    response_length: int = 512  # response tokens (response_length)
    micro_batch: int = 4  # PPO: sequences per training forward; DPO, reward: rankings per training forward
    forward_batch: int | None = None  # PPO: rows per no-grad forward (the minibatch); None: micro_batch
    rollout_batch: int = 64  # PPO: episodes sampled per rollout on each rank (batch_size / processes)
    responses_per_prompt: int = 4  # reward, DPO: responses per ranking (K)
    gradient_checkpointing: bool = False
    fsdp_ranks: int = 1
    prefetch_blocks: int = 1  # FSDP2: blocks gathered ahead of the one computing
    logprob_chunk_tokens: int = 4096
    sample_gathered: bool = True  # FSDP2: sample with the whole policy gathered (PPOConfig.sample_gathered)
    kv_cache_slots: int | None = None  # the rollout cache's length (ppo.sampling.cache_slots); None: prompt + response

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"stage {self.stage!r} is not one of {', '.join(STAGES)}")
        for key in ("dtype", "reward_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPE_BYTES:
                raise UserError(f"{key} {value!r} is not one of {', '.join(DTYPE_BYTES)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < (0 if f.name in (
                    "logprob_chunk_tokens", "prefetch_blocks") else 1):
                raise UserError(f"{f.name.replace('_', '-')} must be at least "
                                f"{0 if f.name in ('logprob_chunk_tokens', 'prefetch_blocks') else 1}, got {value}")
        lora_targets(self.lora_targets)


@dataclass(frozen=True)
class Term:
    """One line of the plan: `phase` is `held` (all run long) or the phase whose peak it adds to."""

    name: str
    phase: str
    bytes: int


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    settings: PlanSettings
    parameters: int  # the stage's main model
    trainable: int
    terms: tuple[Term, ...]

    @property
    def held(self) -> int:
        return sum(t.bytes for t in self.terms if t.phase == "held")

    def phase_bytes(self, phase: str) -> int:
        return sum(t.bytes for t in self.terms if t.phase == phase)

    @property
    def peak_phase(self) -> str | None:
        phases = sorted({t.phase for t in self.terms} - {"held"})
        return max(phases, key=self.phase_bytes) if phases else None

    @property
    def total(self) -> int:
        """Per device (per rank): what is held all run long plus the largest phase's transients."""
        return self.held + (self.phase_bytes(self.peak_phase) if self.peak_phase else 0)

    def term(self, name: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == name)


def trained_state(n: int, ranks: int) -> int:
    """fp32 parameter, fp32 gradient and AdamW's two fp32 moments: 16 bytes, sharded over the ranks."""
    return 4 * FP32 * n // ranks


def plan(shape: ModelShape, settings: PlanSettings, reward_shape: ModelShape | None = None) -> Plan:
    """The memory plan of `settings.stage` on a model of `shape` (the reward model's: `reward_shape`,
    default the same shape, as when the reward model is trained on the SFT checkpoint)."""
    s, rshape = settings, reward_shape or shape
    n, w = s.fsdp_ranks, DTYPE_BYTES[s.dtype]
    rw = DTYPE_BYTES[s.reward_dtype or s.dtype]
    targets = lora_targets(s.lora_targets)
    Q, T, K = s.prompt_length, s.response_length, s.responses_per_prompt
    terms: list[Term] = []
    add = lambda name, phase, value: terms.append(Term(name, phase, int(value)))  # noqa: E731

    if s.stage == "reward":
        params = reward_model_parameters(rshape)
        full = not s.reward_lora
        trainable = params if full else lora_parameters(rshape, s.lora_rank, targets) + rshape.hidden_size
        if not full:
            add("base weights (frozen)", "held", params * w // n)
        add("trained parameters + grads + AdamW (fp32)", "held", trained_state(trainable, n))
        if n > 1:  # FSDP2 shards the reward model as the policy (reward/train.py): its gathered units
            add("FSDP gathered blocks + root unit", "held",
                fsdp_gathered_parameters(rshape, s.prefetch_blocks, rshape.hidden_size) * (FP32 if full else w))
        autocast = w == 2
        if full and autocast:  # the bf16 copies autocast makes of the fp32 weights, kept for the backward
            add("bf16 weight copies (autocast)", "training", 2 * (params - embedding_parameters(rshape)) // n)
        per_block = block_activation_bytes(rshape, stream_bytes=w, input_copy_bytes=2 if autocast else None,
                                           trained=LINEARS if full else targets, lora_rank=0 if full else s.lora_rank)
        tokens = s.micro_batch * K * (Q + T) if s.gradient_checkpointing else s.micro_batch * (Q + K * T)
        add("activations", "training", stack_activation_bytes(rshape, tokens, per_block, w, s.gradient_checkpointing))
        if not s.gradient_checkpointing:  # each continuation's copy of its prompt's keys and values
            add("prompt KV copies", "training", s.micro_batch * K * Q * rshape.num_layers * 2 * rshape.kv_dim * w)
        # the normalisation samples the SFT model (loaded beside the reward model and its optimiser)
        add("SFT model for the normalisation", "normalisation", causal_lm_parameters(shape) * w // n)
        return Plan(shape, s, params, trainable, tuple(terms))

    params = causal_lm_parameters(shape)
    value_head = shape.hidden_size + 1 if s.stage == "ppo" else 0
    trainable = lora_parameters(shape, s.lora_rank, targets) + value_head
    add("base weights (frozen)", "held", params * w // n)
    add("LoRA" + (" + value head" if value_head else "") + ": weights + grads + AdamW (fp32)", "held",
        trained_state(trainable, n))
    if n > 1:  # FSDP2: the blocks being gathered, and the root unit (an untied output layer included)
        head = (0 if shape.tie_embeddings else embedding_parameters(shape)) + value_head
        gathered = fsdp_gathered_parameters(shape, s.prefetch_blocks, head) * w
        if s.stage == "ppo-critic":  # the critic's embedding, norm and score head join the policy's root unit, in fp32
            gathered += (embedding_parameters(rshape) + 2 * rshape.hidden_size) * FP32
        add("FSDP gathered blocks + root unit", "held", gathered)
    per_block = block_activation_bytes(shape, stream_bytes=w, input_copy_bytes=FP32 if w != FP32 else None, trained=targets,
                                       lora_rank=s.lora_rank)
    if s.stage == "dpo":
        scored = s.micro_batch * K * T
        if n > 1 or s.gradient_checkpointing:  # each response read whole after its prompt (dpo.model.PolicyLogprobs)
            tokens = s.micro_batch * K * (Q + T)
            add("activations", "training", stack_activation_bytes(shape, tokens, per_block, w, s.gradient_checkpointing))
        else:  # each ranking's prompt once, its K responses continuing the prompt's cache
            tokens = s.micro_batch * (Q + K * T)
            add("activations", "training", stack_activation_bytes(shape, tokens, per_block, w, False)
                + s.micro_batch * K * Q * shape.num_layers * 2 * shape.kv_dim * w)
        add("log-prob logits", "training", logits_training_bytes(scored, shape.vocab_size, s.logprob_chunk_tokens))
        add("reference forward (cached log-probs)", "reference", forward_working_bytes(shape, tokens, w)
            + logits_inference_bytes(scored, shape.vocab_size, s.logprob_chunk_tokens, w))
        return Plan(shape, s, params, trainable, tuple(terms))

    rparams = reward_model_parameters(rshape)
    add("reward model", "held", rparams * rw // n)
    if s.stage == "ppo-critic":
        add("critic: weights + grads + AdamW (fp32)", "held", trained_state(rparams, n))
        if rw == 2:
            add("critic bf16 weight copies (autocast)", "training",
                2 * (rparams - embedding_parameters(rshape)) // n)
    add("KV cache (kept between rollouts)", "held", kv_cache_bytes(shape, s.rollout_batch, s.kv_cache_slots or Q + T, w))
    tokens, scored = s.micro_batch * (Q + T), s.micro_batch * T
    act = stack_activation_bytes(shape, tokens, per_block, w, s.gradient_checkpointing) + scored * shape.hidden_size * (
        w + (FP32 if value_head else 0))  # the response states (contiguous copy) and the value head's fp32 input
    add("activations", "training", act)
    add("log-prob logits", "training", logits_training_bytes(scored, shape.vocab_size, s.logprob_chunk_tokens))
    if s.stage == "ppo-critic":
        if n > 1:  # its fp32 blocks gathered while it computes, in place of the policy's (counted as held)
            add("critic's gathered blocks beyond the policy's", "training", (1 + s.prefetch_blocks) * max(
                0, block_parameters(rshape) * FP32 - block_parameters(shape) * w))
        critic_block = block_activation_bytes(rshape, stream_bytes=rw, input_copy_bytes=2 if rw == 2 else None,
                                              trained=LINEARS, lora_rank=0)
        add("critic activations", "training",
            stack_activation_bytes(rshape, tokens, critic_block, rw, s.gradient_checkpointing))
    sampling = forward_working_bytes(shape, s.rollout_batch * Q, w) \
        + s.rollout_batch * shape.vocab_size * (w + 3 * FP32)  # prefill's block, the step's logits, softmax, cdf
    add("prefill + sampling logits", "rollout", sampling)
    if n > 1 and s.sample_gathered:
        add("whole policy summoned for sampling", "rollout", params * w * (n - 1) // n)
    rows = s.forward_batch or s.micro_batch
    # the sharded reward model gathers its blocks and root unit while it scores (freed after:
    # align.distributed.release_gathered)
    reward_gathered = fsdp_gathered_parameters(rshape, s.prefetch_blocks, rshape.hidden_size) * rw if n > 1 else 0
    add("no-grad forwards (pi_old, pi_ref, scores)", "forwards", max(  # the reward model scores `rows` at a time too
        forward_working_bytes(shape, rows * (Q + T), w)
        + logits_inference_bytes(rows * T, shape.vocab_size, s.logprob_chunk_tokens, w),
        forward_working_bytes(rshape, rows * (Q + T), rw) + reward_gathered))
    return Plan(shape, s, params, trainable, tuple(terms))
