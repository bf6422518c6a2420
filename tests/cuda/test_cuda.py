"""Every stage on a GPU. Skipped without CUDA; run with
`pytest tests/cuda -q` on a machine with one (the CPU suite checks the same code paths on the CPU).

Each test is a few seconds on a tiny random model: device placement and dtypes, not speed
(bench/gpu_bench.py measures that).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")


def _ppo_cfg(policy, reward, out, *extra):
    from align.config import load_config
    from ppo.config import PPOConfig

    return load_config(PPOConfig, None, [
        f"policy_model={policy}", f"reward_model={reward}", f"output_dir={out}", "num_prompts=32",
        "num_eval_prompts=8", "num_iterations=2", "batch_size=8", "num_mini_batches=2",
        "gradient_accumulation_steps=2", "num_ppo_epochs=2", "save_every=1", "progress=false", *extra])


def test_reward_training_runs_on_the_gpu_in_bf16(tiny_random_model, tmp_path):
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_random_model}", f"output_dir={tmp_path / 'rm'}", "model.dtype=bfloat16",
        "data.num_rankings=64", "data.num_eval_rankings=16", "train.batch_size=16", "eval.normalize_prompts=8",
        "eval.normalize_response_length=8", "train.gradient_checkpointing=true"])
    summary = train_reward_model(cfg, echo=lambda s: None)
    assert summary["memory/peak_gpu_mb"] > 0 and summary["eval/accuracy"] == summary["eval/accuracy"]


def test_reward_model_scores_on_the_gpu_by_default(random_reward_model):
    from reward.model import load_reward_model

    rm = load_reward_model(random_reward_model)
    assert rm.device.type == "cuda"
    scores = rm.score(["Hi", "Tell me about tea."], ["Hello!", "Tea is a drink."])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    bf16 = load_reward_model(random_reward_model, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16.score(["Hi"], ["Hello!"]), rm.score(["Hi"], ["Hello!"]), rtol=0.05, atol=0.1)


def test_generation_moves_the_model_to_the_gpu(tiny_random_model):
    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_random_model)
    model = load_causal_lm(tiny_random_model, tokenizer=tokenizer)
    state = torch.cuda.get_rng_state()
    out = generate_responses(model, tokenizer, ["Hi", "Why?"], max_new_tokens=4)
    assert next(model.parameters()).device.type == "cuda" and len(out) == 2
    assert torch.equal(torch.cuda.get_rng_state(), state)  # seeded sampling left the GPU's generator alone


def test_attention_is_sdpa_or_flash_by_default_on_the_gpu(tiny_random_model):
    from align.modeling import load_causal_lm

    model = load_causal_lm(tiny_random_model)
    assert model.config._attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3")


@pytest.mark.parametrize("value_model,response_length,cuda_graphs,checkpointing", [
    ("policy_trunk", 32, False, True), ("policy_trunk", 32, True, True), ("policy_trunk", 32, None, False),
    ("reward_model", 128, True, True), ("reward_model", 128, None, False), ("reward_model", 256, False, True)])
def test_ppo_runs_on_the_gpu_in_bf16(tiny_random_model, random_reward_model, tmp_path, value_model, response_length,
                                     cuda_graphs, checkpointing):
    # None: the GPU defaults (the decoding step graphed, the layers compiled for training)
    from ppo.trainer import run_ppo

    cfg = _ppo_cfg(tiny_random_model, random_reward_model, tmp_path / "run", "dtype=bfloat16",
                   f"value_model={value_model}", f"response_length={response_length}",
                   f"gradient_checkpointing={str(checkpointing).lower()}", "logprob_chunk_tokens=64",
                   *([f"cuda_graphs={str(cuda_graphs).lower()}"] if cuda_graphs is not None else []))
    summary = run_ppo(cfg)
    assert summary["iteration"] == 2 and torch.isfinite(torch.tensor(summary["objective/kl"]))
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "policy").is_dir()


def test_ppo_resumes_on_the_gpu(tiny_random_model, random_reward_model, tmp_path):
    # (bit-identical resumption is tested on the CPU; GPU kernels need not be deterministic)
    from ppo.trainer import run_ppo

    def cfg(iterations):
        return _ppo_cfg(tiny_random_model, random_reward_model, tmp_path / "run", f"num_iterations={iterations}",
                        "num_eval_prompts=0", "response_length=8", "overwrite=true")

    run_ppo(cfg(1))
    summary = run_ppo(cfg(2), resume=True)
    assert summary["iteration"] == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cuda_graph_decoding_step_samples_what_the_eager_full_forward_samples(tiny_random_model, tmp_path, dtype):
    # tests/ppo's exactness check (trained adapter and value head, left padding, a row ending early) with the
    # step captured as a CUDA graph, in two rollouts: the second replays the graph the first captured.
    from ppo.sampling import CUDAGraphStep, DecodeBufferPool, sample_responses
    from tests.ppo.decoding import TOLERANCE, discrepancy_on_prompts, left_padded_prompts, trained_trainer

    trainer = trained_trainer(tiny_random_model, tmp_path, dtype)
    pool = DecodeBufferPool(cuda_graph=True)
    graphs = []
    for _ in range(2):
        found = discrepancy_on_prompts(trainer, device="cuda", pool=pool)
        assert found.rows_ended_early >= 1
        assert found.logprobs <= TOLERANCE[dtype] and found.values <= TOLERANCE[dtype], found
        assert found.same_tokens or dtype == "bfloat16", found  # bf16 rounding may flip a rare draw
        (buffers,) = pool.sets.values()
        assert isinstance(buffers.step, CUDAGraphStep) and buffers.step.graph is not None
        graphs.append(buffers.step.graph)
    assert graphs[0] is graphs[1]  # captured once, replayed across rollouts (a failed capture raises)
    # the graph replays the eager step's kernels: with the same seed, the same tokens and log-probs
    ids, mask = left_padded_prompts(trainer.tokenizer, device="cuda")
    runs = []
    for step_pool in (None, pool):
        torch.manual_seed(0)
        runs.append(sample_responses(trainer.model, ids, mask, max_new_tokens=40, temperature=1.0, eos_token_id=-1,
                                     pad_token_id=trainer.tokenizer.pad_token_id, pool=step_pool))
    (eager, graphed) = runs
    assert torch.equal(graphed[0], eager[0])
    torch.testing.assert_close(graphed[1], eager[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(graphed[2], eager[2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,rtol,atol,grad_rel", [("float32", 1e-4, 1e-5, 1e-3), ("bfloat16", 2e-2, 1e-3, 3e-2)])
def test_compiled_training_step_matches_the_eager_one_on_the_gpu(tiny_random_model, random_reward_model, tmp_path,
                                                                 dtype, rtol, atol, grad_rel):
    # the GPU defaults compile the layers with inductor's Triton kernels; tests/ppo checks the CPU's C++ ones
    from tests.ppo.test_compilation import check_compiled_step_matches_eager, trainer_with_trained_adapter

    trainer = trainer_with_trained_adapter([
        f"policy_model={tiny_random_model}", f"reward_model={random_reward_model}", f"output_dir={tmp_path / 'run'}",
        "num_prompts=32", "num_eval_prompts=0", "batch_size=8", "num_mini_batches=2", "gradient_accumulation_steps=2",
        "num_ppo_epochs=1", "save_every=0", "progress=false", f"dtype={dtype}"])
    assert trainer.compiler.enabled and trainer.decode_pool.cuda_graph  # the defaults on one GPU
    check_compiled_step_matches_eager(trainer, rtol=rtol, atol=atol, grad_rel=grad_rel)
