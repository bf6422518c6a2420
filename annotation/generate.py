"""Fill a project's prompts with K sampled candidates from an SFT checkpoint."""

from __future__ import annotations

from sqlalchemy.orm import Session

from annotation import services


def generate_candidates(
    db: Session, project_name: str, model_spec: str = "demo", *, k: int | None = None, max_new_tokens: int = 48,
    temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64, seed: int = 0, progress: bool = False,
    notes: list[str] | None = None,
) -> int:
    """Sample K responses (the project's K; `k`, if given, must equal it) for each prompt
    without candidates; returns how many prompts were filled. The prompts are read once,
    before sampling (minutes): one that got candidates meanwhile (another generate run, an
    import) keeps them, and `notes` gets a line saying how many did."""
    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer, resolve_model_path

    project = services.get_project(db, project_name)
    if k is not None and k != project.k:
        raise services.Invalid(f"project {project_name!r} ranks K={project.k} candidates per prompt; --k {k} differs")
    k = project.k
    todo = services.prompts_without_candidates(db, project)
    if not todo:
        return 0
    path = resolve_model_path(model_spec)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    model.eval()
    sampling = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
    outs = generate_responses(
        model, tokenizer, [p.content for p in todo], num_return_sequences=k, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, batch_size=batch_size, seed=seed, progress=progress,
    )
    filled = taken = with_nul = 0
    for prompt, sampled in zip(todo, outs):
        # a byte-level tokenizer can sample the NUL byte (Llama's <0x00>), which no database text holds:
        # it shows as U+FFFD, as any byte a text cannot carry, rather than stop the project's generation
        texts = [text.replace("\x00", "\ufffd") for text in sampled]
        try:
            services.add_candidates(db, prompt, texts, model=str(model_spec), sampling=sampling)
            filled += 1
            with_nul += sum("\x00" in text for text in sampled)
        except services.Conflict:
            taken += 1
    if with_nul and notes is not None:
        notes.append(f"{with_nul} candidate{'s' * (with_nul != 1)} of {project_name!r} held a NUL character, stored as "
                     "U+FFFD (the replacement character)")
    if taken and notes is not None:
        notes.append(f"{taken} prompt{'s' * (taken != 1)} of {project_name!r} got candidates from another generate run "
                     "or an import while these were sampled; they keep those")
    return filled
