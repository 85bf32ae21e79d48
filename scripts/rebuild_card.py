"""Model cards for a from-scratch rebuild (scripts/rebuild-default-model.sh): the commands each stage ran, its
time, and the evaluations' tables, read from the run directory, so that a card states what that run measured.

    python scripts/rebuild_card.py RUN_DIR student|teacher|vq OUT.md
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from engine.atomic import write_text

STAGES = {  # which stages made each shipped directory, and which evaluations describe it
    "student": (["vae1", "vae2", "vae3", "teacher1", "teacher2", "ode", "dmd", "switch", "fastdec"],
                ["eval-short", "eval-teacher", "eval-switches", "eval-long"]),
    "teacher": (["vae1", "vae2", "vae3", "teacher1", "teacher2"], ["eval-teacher", "eval-short"]),
    "vq": (["vae1", "vae2", "vae3", "teacher1", "teacher2", "ode", "dmd", "switch", "vq"], ["eval-vq"]),
}
TITLES = {
    "student": "shapes-sf: the default model (4-step Self-Forcing causal student), rebuilt from scratch",
    "teacher": "shapes-teacher: the default model's bidirectional teacher, rebuilt from scratch",
    "vq": "shapes-sf-vq: the default model's quantized variant, rebuilt from scratch",
}
ABOUT = {
    "student": "The student of `shapes-teacher`: ODE init on the teacher's trajectories, Self-Forcing DMD with a "
               "regression term on the ODE bank, then switch-aware DMD (30% of the rollouts switch prompt at a "
               "block, with the live stream's KV re-cache); the EMA weights are shipped, with the fast streaming "
               "decoder distilled from the VAE's decoder (`fast_decoder/`, selected with `decoder=\"fast\"`).",
    "teacher": "A bidirectional flow-matching Wan transformer (32 Euler steps, CFG 3 when sampled) on the rebuilt "
               "VAE's latents: trained from scratch with its text encoder on one-prompt clips, then fine-tuned "
               "on clips of which 30% switch prompt at a latent block (timeline conditioning).",
    "vq": "The student with a VQ head on its x0 prediction (256 codes), distilled again by DMD against the same "
          "teacher (`configs/shapes-vq-dmd.yaml`).",
}


def stage_times(run_dir: Path) -> dict[str, str]:
    """{stage: 'N min'} from RUN_DIR/times.txt (the last entry of a stage that ran more than once is its resume;
    the times of all its runs are summed)."""
    minutes: dict[str, int] = {}
    path = run_dir / "times.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()  # "STAGE: HH:MM:SS end, N min"
        if len(parts) >= 5 and parts[-1] == "min":
            minutes[parts[0].rstrip(":")] = minutes.get(parts[0].rstrip(":"), 0) + int(parts[-2])
    return {k: f"{v} min" for k, v in minutes.items()}


def stage_command(run_dir: Path, stage: str) -> str:
    """The first command line the stage's log records ('+ ...', written by the rebuild script's run())."""
    log = run_dir / f"{stage}.log"
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("+ "):
            return line[2:]
    return f"the script's {stage} stage" if log.exists() else "(not run)"


def report(run_dir: Path, stage: str) -> str:
    """An evaluation's printed report: its log after the last command line, without progress lines."""
    log = run_dir / f"{stage}.log"
    if not log.exists():
        return "(not run)"
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    starts = [i for i, s in enumerate(lines) if s.startswith("+ ")]
    body = lines[starts[-1] + 1:] if starts else lines
    return "\n".join(s for s in body if not s.startswith("[") and "it/s]" not in s and "s/it]" not in s).strip()


def card(run_dir: Path, kind: str) -> str:
    stages, evals = STAGES[kind]
    times = stage_times(run_dir)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    total = sum(int(times[s].split()[0]) for s in stages if s in times)
    out = [f"# {TITLES[kind]}", "", ABOUT[kind], "",
           "Architecture, data and sampler settings: `configs/_shapes-common.yaml` and docs/default-model.md (the "
           "classes real Wan2.1 weights use; 64x64, 33 frames, 4 steps, 3 latent frames per block, live window 9 / "
           "3). Only the shapes caption grammar is understood (`prompt_grammar: shapes`).", "",
           "## How it was made", "",
           f"`bash scripts/rebuild-default-model.sh {run_dir}` (commit {commit or 'unknown'}), from nothing: no file "
           "of `checkpoints/` is read. Each stage resumes from its newest checkpoint when the script is run again. "
           f"Stage times on a 2-core CPU, one torch thread per process ({total} min for the stages below; stages "
           "marked in the script as side by side shared the two cores):", "",
           "| stage | command | time |", "|---|---|---:|"]
    out += [f"| {s} | `{stage_command(run_dir, s)}` | {times.get(s, '')} |".replace("`the script's", "the script's")
            .replace(" stage` |", " stage |") for s in stages]
    out += ["", "## Figures (the shapes evaluator; docs/default-model.md explains the measures)", ""]
    for e in evals:
        out += [f"`{stage_command(run_dir, e)}`", "", report(run_dir, e), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("kind", choices=sorted(STAGES))
    p.add_argument("out", type=Path)
    a = p.parse_args(argv)
    if not a.run_dir.is_dir():
        p.error(f"run directory {a.run_dir} does not exist")
    write_text(a.out, card(a.run_dir, a.kind))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
