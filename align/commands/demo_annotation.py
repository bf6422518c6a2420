"""The demo's annotation steps (`align demo`, steps 2-3): a project filled with candidates of the SFT
model, simulated annotators ranking through the web app's own service layer, the export of their
rankings, and `--serve`, which lets people rank instead."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Protocol

from align.errors import UserError

PROJECT = "demo"
GUIDELINES = """\
Rank the responses from best to worst. A good response **answers the question** about the
topic asked, is **polite**, is **concise**, and **ends properly**. Put equally good
responses in a tie; mark "all bad" when none is acceptable.
"""


class DemoAnnotation(Protocol):
    """The settings these steps read (align.commands.demo.DemoConfig's)."""

    model: str  # the SFT model whose candidates are ranked
    num_prompts: int
    k: int  # candidates per prompt
    annotators_per_prompt: int
    response_length: int
    num_annotators: int
    agreement: float  # two simulated annotators' agreement on the pairs the gold judge does not tie (noise_for_agreement)
    seed: int


def fill_project(db_url: str, cfg: DemoAnnotation) -> Any:
    """Step 2: the project, its synthetic prompts and k candidates of the SFT model for each; returns
    the database's sessions."""
    from align.formats import PromptRecord
    from align.synthetic import make_prompts
    from annotation import services
    from annotation.db import open_db
    from annotation.generate import generate_candidates

    sessions = open_db(db_url)
    with sessions() as db:
        project = services.get_or_create_project(db, PROJECT, k=cfg.k, annotators_per_prompt=cfg.annotators_per_prompt,
                                                 guidelines=GUIDELINES)
        if project.k != cfg.k:  # an earlier demo's project (--serve again): its K is the database's
            raise UserError(f"the demo's annotation project ranks k={project.k} candidates per prompt; k={cfg.k} "
                            "differs (keep k, or start over with --force)")
        prompts = make_prompts(cfg.num_prompts, seed=cfg.seed, split="train")
        services.add_prompts(db, project, [PromptRecord(p, f"synthetic-{i}") for i, p in enumerate(prompts)])
        filled = generate_candidates(db, PROJECT, cfg.model, k=cfg.k, max_new_tokens=cfg.response_length,
                                     seed=cfg.seed, progress=True)
    print(f"    {filled} prompts got {cfg.k} candidates each")
    return sessions


def simulate_annotators(sessions: Any, cfg: DemoAnnotation) -> dict[str, int]:
    """Step 3: each simulated annotator takes tasks and submits rankings exactly as the web app does."""
    from align.synthetic import SimulatedAnnotator, noise_for_agreement
    from annotation import services

    noise = noise_for_agreement(cfg.agreement)
    stored = 0
    with sessions() as db:
        project = services.get_project(db, PROJECT)
        team = []
        for i in range(cfg.num_annotators):
            name = f"simulated-{i}"
            try:
                user = services.get_user(db, name)
            except services.NotFound:
                user = services.create_user(db, name, None, "annotator")
            team.append((user, SimulatedAnnotator(noise, seed=cfg.seed * 100 + i, name=name)))
        active = list(team)
        while active:
            for member in list(active):
                user, annotator = member
                task = services.next_task(db, user, project)
                if task is None:
                    active.remove(member)
                    continue
                ranks = annotator.rank(task.prompt, [c.text for c in task.candidates])
                order = services.ranks_to_order([c.id for c in task.candidates], ranks)
                services.submit_ranking(db, user, task.assignment_id, order, time_spent_ms=0)
                stored += 1
    return {"rankings": stored}


def export_rankings(db_url: str, path: Path) -> list:
    from align.exports import write_kwise
    from annotation import services
    from annotation.db import open_db

    with open_db(db_url)() as db:
        rankings = services.export_rankings(db, services.get_project(db, PROJECT))
    if not rankings:
        raise UserError(f"no rankings in {db_url.removeprefix('sqlite:///')} yet: rank some in the browser first")
    write_kwise(rankings, path)
    return rankings


def serve_for_people(db_url: str, out: Path, host: str, port: int) -> None:
    """`--serve`: an admin account with a fresh random password, then the web app."""
    from annotation import services
    from annotation.cli import serve
    from annotation.db import open_db

    password = secrets.token_urlsafe(12)
    with open_db(db_url)() as db:
        try:
            services.set_password(db, services.get_user(db, "demo-admin"), password)
        except services.NotFound:
            services.create_user(db, "demo-admin", password, "admin")
    print(f"\nRank the candidates at http://{host}:{port}/ as demo-admin, password {password}\n"
          f"(invite more annotators from the admin page). Stop the server with Ctrl-C, then run\n"
          f"    align demo --continue --out {out}\n", flush=True)
    serve(db=db_url, host=host, port=port, max_body_kb=1024, secure_cookies=False, log_level="warning")
