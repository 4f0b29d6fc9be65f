"""The evaluation that ends a run, chosen by ``config.eval.kind``.

It judges the exported model (the diffusers-format directory a user gets), loaded
back through :class:`jaxdiff.pipeline.StableDiffusion`, so the report also
proves the export round-trips. Kinds:

* ``""``: none.
* ``"digits"``: ``samples_per_prompt`` images for each prompt
  ``prompt.format(d=d)``, d = 0..9; ``workdir/samples/final_grid.png`` (one row
  per digit, up to ``grid_columns`` images each); the quality report of
  :func:`jaxdiff.evaluation.digits_report` (conditional accuracy under a
  classifier trained on real digits, Fréchet distance to the real test digits
  in its feature space, each beside its real-data reference), printed and
  written to ``workdir/report.json`` with the sampling settings.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.evaluation import NUM_CLASSES

KINDS = ("", "digits")
CLASSIFIER_FILE = "digit_classifier.msgpack"


def eval_kind(config: Any) -> str:
    """``config.eval.kind`` ("" when the section or the key is absent)."""
    section = config.get("eval") if hasattr(config, "get") else None
    kind = str((section or {}).get("kind", "") or "")
    if kind not in KINDS:
        raise ValueError(f"unknown eval.kind {kind!r}; valid: {KINDS}")
    return kind


def check_eval_config(config: Any) -> None:
    """Raises ValueError, naming the key, for an eval section the run could not finish."""
    kind = eval_kind(config)
    if kind != "digits":
        return
    e = config.eval
    for key in ("samples_per_prompt", "steps", "grid_columns", "classifier_steps"):
        if int(e.get(key, 0) or 0) < 1:
            raise ValueError(f"eval.{key}={e.get(key)} must be >= 1")
    if NUM_CLASSES * int(e.samples_per_prompt) < 2:
        raise ValueError("eval.samples_per_prompt is too small for a Fréchet distance")
    if "{d}" not in str(e.get("prompt", "")):
        raise ValueError(f"eval.prompt={e.get('prompt')!r} must contain '{{d}}' (the digit)")


def evaluate(config: Any, workdir: Path, export_dir: Path) -> dict | None:
    """Runs the evaluation ``config.eval.kind`` names on the exported model.

    Args:
      config: the run's config.
      workdir: the run directory (outputs go here).
      export_dir: the diffusers-format model to evaluate.

    Returns:
      None for kind "", else a dict with "report" (the metrics), "report_path"
      and "grid" (paths).
    """
    kind = eval_kind(config)
    if not kind:
        return None
    return evaluate_digits(config.eval, Path(workdir), Path(export_dir))


def evaluate_digits(e: Any, workdir: Path, export_dir: Path) -> dict:
    """The "digits" evaluation (see the module docstring); ``e`` is ``config.eval``."""
    from jaxdiff import evaluation, images
    from jaxdiff.pipeline import StableDiffusion

    n = int(e.samples_per_prompt)
    prompts = [str(e.prompt).format(d=d) for d in range(NUM_CLASSES)]
    sampling = {
        "prompt": str(e.prompt),
        "samples_per_prompt": n,
        "steps": int(e.steps),
        "guidance_scale": float(e.guidance_scale),
        "sampler": str(e.sampler or "") or None,
        "seed": int(e.seed),
    }
    print(f"[eval] sampling {n} images for each of {NUM_CLASSES} digit prompts", flush=True)
    start = time.perf_counter()
    pipe = StableDiffusion.from_pretrained(export_dir)
    generated = pipe.text_to_image(
        prompts,
        num_images_per_prompt=n,
        steps=sampling["steps"],
        guidance_scale=sampling["guidance_scale"],
        sampler=sampling["sampler"],
        seed=sampling["seed"],
        progress=True,
    )
    print(f"[eval] sampled {len(generated)} images in {time.perf_counter() - start:.1f} s")
    labels = np.repeat(np.arange(NUM_CLASSES), n)

    # Prompt-major order: row d holds the first `columns` samples of digit d.
    columns = min(n, int(e.grid_columns))
    per_digit = generated.reshape(NUM_CLASSES, n, *generated.shape[1:])
    tiles = per_digit[:, :columns].reshape(-1, *generated.shape[1:])
    grid = images.save_png(
        images.make_grid(tiles, rows=NUM_CLASSES), workdir / "samples" / "final_grid.png"
    )

    start = time.perf_counter()
    path = Path(str(e.classifier_path)) if e.classifier_path else workdir / CLASSIFIER_FILE
    classifier = evaluation.load_or_train(path, steps=int(e.classifier_steps))
    report = evaluation.digits_report(generated, labels, classifier)
    report["sampling"] = sampling
    print(f"[eval] classifier and report in {time.perf_counter() - start:.1f} s")
    print(evaluation.format_report(report), flush=True)
    report_path = workdir / "report.json"
    evaluation.save_report(report, report_path)
    return {"report": report, "report_path": report_path, "grid": grid}
