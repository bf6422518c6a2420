"""bench/gpu_bench.py's table, step 6: seconds per iteration and its split, rollout tokens/s, peak
memory and the MFU (gpu_bench.py's docstring says how the model FLOPs are counted)."""

from __future__ import annotations

from bench.gpu_setup import SHAPES

# dense bf16 TFLOP/s by a piece of the device name, the more specific pieces first (the datasheets:
# H100 SXM and H200 SXM 989, H100 PCIe 756, H100 NVL and H200 NVL 835; their figures with sparsity halved)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0)]


def phase_flops(info: dict, settings: dict, prompt_tokens: float, response_tokens: float,
                critic: bool) -> dict[str, float]:
    """Model FLOPs of one PPO iteration's rollout, score and optimise phases (see bench/gpu_bench.py's
    docstring). The trunk runs on every token; the output layer (vocab x hidden, tied) only where a
    response token's log-prob is read: align computes logits for the response positions alone, and
    the reward model has a score head instead."""
    trunk, head = info["non_embedding"], info["vocab"] * SHAPES_HIDDEN[settings["shape"]]
    seq = prompt_tokens + response_tokens
    b = settings["batch_size"]
    trained = settings["epochs"] * b * seq
    # sampling (the prompt once, then each new token), pi_old (bf16: recomputed by the training forward), pi_ref
    phases = {"rollout": 2 * trunk * 3 * b * seq + 2 * head * 3 * b * response_tokens,
              "score": 2 * trunk * b * seq,
              "optimise": 6 * (trunk * trained + head * settings["epochs"] * b * response_tokens)}
    if critic:  # the critic's forward in the rollout and its training
        phases["rollout"] += 2 * info["non_embedding"] * b * seq
        phases["optimise"] += 6 * info["non_embedding"] * trained
    return phases


def flops_per_iteration(info: dict, settings: dict, prompt_tokens: float, response_tokens: float,
                        critic: bool) -> float:
    """Model FLOPs of one PPO iteration (see bench/gpu_bench.py's docstring)."""
    return sum(phase_flops(info, settings, prompt_tokens, response_tokens, critic).values())


SHAPES_HIDDEN = {k: v["hidden_size"] for k, v in SHAPES.items()}


def mean_after_first(values: list[float]) -> float:
    kept = values[1:] if len(values) > 1 else values
    return sum(kept) / len(kept)


def table(results: dict, info: dict, settings: dict, prompt_tokens: float, peak_tflops: float | None) -> str:
    head = (f"{'run':28s} {'s/iter':>7s} {'rollout':>8s} {'sample':>7s} {'score':>6s} {'optimise':>9s} {'tok/s':>8s} "
            f"{'peak GiB':>9s} {'reserved':>8s} {'MFU':>6s} {'MFU roll':>8s} {'MFU opt':>8s}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        its = r["iterations"]
        sec = mean_after_first([i["timing/iteration_s"] for i in its])

        def split(key: str, its=its) -> str:
            return f"{mean_after_first([i[key] for i in its]):.2f}" if key in its[0] else "-"

        resp = mean_after_first([i["response/length"] for i in its]) if "response/length" in its[0] else None
        if resp is None:  # TRL: take align's measured length as the same work
            resp = next((mean_after_first([i["response/length"] for i in x["iterations"]])
                         for x in results.values() if "response/length" in x["iterations"][0]), settings["response_length"])
        tok_s = (f"{settings['batch_size'] * resp / mean_after_first([i['timing/rollout_s'] for i in its]):.0f}"
                 if "timing/rollout_s" in its[0] else "-")
        phases = phase_flops(info, settings, prompt_tokens, resp, critic="critic" in name or "TRL" in name)

        def mfu(flops: float, key: str | None = None, its=its, sec=sec) -> str:
            if not peak_tflops or (key is not None and key not in its[0]):
                return "-"
            seconds = sec if key is None else mean_after_first([i[key] for i in its])
            return f"{100 * flops / (seconds * peak_tflops * 1e12):.1f}%"

        reserved = f"{r['reserved_gib']:.2f}" if r.get("reserved_gib") is not None else "-"
        lines.append(f"{name:28s} {sec:7.2f} {split('timing/rollout_s'):>8s} {split('timing/sample_s'):>7s} "
                     f"{split('timing/score_s'):>6s} {split('timing/optimise_s'):>9s} {tok_s:>8s} {r['peak_gib']:9.2f} "
                     f"{reserved:>8s} {mfu(sum(phases.values())):>6s} "
                     f"{mfu(phases['rollout'], 'timing/rollout_s'):>8s} {mfu(phases['optimise'], 'timing/optimise_s'):>8s}")
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    """The versions the README's table must state beside the card (the rollout's KV cache relies on
    transformers' cache and mask code within the range pyproject pins)."""
    import importlib.metadata

    import torch

    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "accelerate")}
    versions["cuda"] = torch.version.cuda or "-"
    return versions


def peak_tflops_of(device_name: str) -> tuple[float | None, str]:
    """The dense bf16 peak assumed for a device name, and which entry of PEAK_BF16_TFLOPS gave it."""
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece in device_name:
            return tflops, f"{piece}'s {tflops:g} TFLOP/s bf16 dense"
    return None, "unknown device: no MFU (--peak-tflops sets one)"


def device_peak_tflops() -> tuple[str, float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None, "cpu: no MFU"
    name = torch.cuda.get_device_name(0)
    return (name, *peak_tflops_of(name))
