"""Compiled decoder layers (align.compilation, PPO's torch_compile): the training step's numbers are
the eager ones, and nothing but the training forwards runs compiled."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


def trainer_with_trained_adapter(small_run, *extra):
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, "response_length=12", *extra]))
    trainer.setup()
    with torch.no_grad():  # a trained adapter and value head (B = 0 would leave A without a gradient)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name or name.startswith("value_head."):
                p.normal_(0, 0.1)
    return trainer


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_layer_compiler_runs_the_compiled_forward_only_while_active():
    from align.compilation import LayerCompiler

    calls = []

    def backend(graph, example_inputs):  # a backend that records each compiled call, then runs the graph
        def run(*args):
            calls.append(len(args))
            return graph(*args)

        return run

    layers = [torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU()) for _ in range(3)]
    compiler = LayerCompiler(layers, backend=backend)
    x = torch.randn(2, 4)
    eager = [layer(x) for layer in layers]
    assert calls == [] and not compiler.on
    with compiler.active():
        compiled = [layer(x) for layer in layers]
        with compiler.active():  # nested blocks leave it on until the outer one ends
            pass
        assert compiler.on
    assert not compiler.on and len(calls) == 3
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    assert not LayerCompiler().enabled and compiler.enabled


def check_compiled_step_matches_eager(trainer, rtol: float, atol: float, grad_rel: float) -> None:
    """One micro-step through the compiled layers and one eager on the same batch: the same statistics
    (within rtol, atol) and gradients (within grad_rel of each one's norm); the switch is on only for the
    training forward: decoding and the reference forward compile nothing, and pi_old's forward runs
    compiled only where the sampler's log-probs are not exact (bf16: ppo.trainer recomputes them by the
    training forward so that PPO's first ratio is 1). Also run by tests/cuda in bf16."""
    from align.compilation import LayerCompiler

    assert trainer.compiler.enabled and len(trainer.compiler.layers) == trainer.model.policy.config.num_hidden_layers
    exp, _ = trainer.rollout(["Tell me about tea.", "Hi", "Can you explain the moon to me in simple words?", "Why?"])
    exp.advantages = torch.randn_like(exp.logprobs) * exp.response_mask
    exp.returns = torch.randn_like(exp.logprobs) * exp.response_mask
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    weight = torch.tensor(1.0, device=trainer.device)
    switch = trainer.compiler
    seen = []  # the layers' switch at each call of the first layer
    switch.layers[0].register_forward_pre_hook(lambda module, args: seen.append(switch.on))

    def step(compiled: bool):
        trainer.compiler = switch if compiled else LayerCompiler()  # an empty compiler leaves the switch off
        try:
            trainer.optimizer.zero_grad(set_to_none=True)
            stats = trainer.micro_step(exp, weight)
        finally:
            trainer.compiler = switch
        return stats, [p.grad.clone() for p in params]

    torch.compiler.reset()  # compile here, not from an earlier case's cache
    torch._dynamo.utils.counters.clear()
    compiled_stats, compiled_grads = step(True)
    assert _compiled_graphs() > 0 and seen and all(seen)
    seen.clear()
    eager_stats, eager_grads = step(False)
    assert seen and not any(seen)
    for key in eager_stats:
        torch.testing.assert_close(compiled_stats[key], eager_stats[key], rtol=rtol, atol=atol)
    assert all(g.abs().sum() > 0 for g in eager_grads)
    for a, b in zip(compiled_grads, eager_grads):
        assert (a - b).norm() <= grad_rel * b.norm(), ((a - b).norm(), b.norm())
    graphs = _compiled_graphs()
    seen.clear()
    samples = trainer.generate(["Another prompt", "And one more, a longer one than the first"])
    trainer.reference_logprobs(samples)
    assert seen and not any(seen) and _compiled_graphs() == graphs
    before = len(seen)
    trainer.behaviour_logprobs_and_values(samples)
    if trainer.sampler_is_exact:  # the sampler's own log-probs: no forward of the policy's layers
        assert len(seen) == before and _compiled_graphs() == graphs
    else:  # recomputed by the training forward, through the compiled layers
        assert len(seen) > before and all(seen[before:])


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="inductor on the CPU builds C++ kernels: no C++ compiler here ($CXX or g++)")
def test_compiled_training_step_gives_the_eager_gradients_and_decoding_stays_eager(small_run):
    # inductor on the CPU: the code path a GPU takes, with C++ kernels where a GPU has Triton's
    trainer = trainer_with_trained_adapter(small_run, "torch_compile=true")
    check_compiled_step_matches_eager(trainer, rtol=1e-4, atol=1e-6, grad_rel=1e-4)


def test_compilation_and_cuda_graphs_are_off_by_default_on_the_cpu(small_run):
    trainer = trainer_with_trained_adapter(small_run)
    assert trainer.cfg.torch_compile is None and not trainer.compiler.enabled
    assert trainer.cfg.cuda_graphs is None and not trainer.decode_pool.cuda_graph


def test_compilation_with_gradient_checkpointing_is_refused_by_name(small_run):
    from align.config import load_config
    from align.errors import UserError
    from ppo.config import PPOConfig

    with pytest.raises(UserError, match="torch_compile=true does not run with gradient_checkpointing=true"):
        load_config(PPOConfig, None, [*small_run, "torch_compile=true", "gradient_checkpointing=true"])
    assert load_config(PPOConfig, None, [*small_run, "gradient_checkpointing=true"]).torch_compile is None
