"""What ``fit --strategy auto`` tried, what each scored and cost, and why it chose (from the run's
``auto.json``): the ranking of the backbones, then every strategy tried or skipped."""

from __future__ import annotations

from typing import Any

from transferlab.evaluation.report.context import RunContext


def auto_section(ctx: RunContext) -> dict[str, Any]:
    record = ctx.auto
    ranking = [
        [c["backbone"], f"{c['logme']:.4f}", f"{c['cv_accuracy']:.1%}",
         f"{c['cv_ci95'][0]:.1%} – {c['cv_ci95'][1]:.1%}", f"{c['images_per_s']:.0f}"]
        for c in (record.get("ranking") or {}).get("candidates", [])
    ]  # fmt: skip
    tried = [
        [r.get("strategy", ""), r.get("backbone", "–"), _pct(r.get("val_accuracy")),
         _num(r.get("val_log_loss")), _num(r.get("seconds"), "{:.0f} s"), r.get("skipped", "")]
        for r in record.get("tried", [])
    ]  # fmt: skip
    chosen = record.get("chosen") or {}
    return {
        "ranking": ranking,
        "tried": tried,
        "chosen": f"{chosen.get('strategy')} on {chosen.get('backbone')}",
        "why": record.get("why", ""),
        "ensemble": _ensemble_line(record.get("ensemble")),
        "budget": f"{record.get('seconds', 0):.0f} s of a {record.get('time_budget_s', 0):.0f} s "
        "budget",
    }


def _ensemble_line(ens: Any) -> str:
    """One sentence on the ensemble: its members, weights and whether it was kept, and why."""
    if not isinstance(ens, dict):  # runs from before ensembles said so in a string
        return str(ens or "")
    if not ens.get("tried"):
        return f"not tried: {ens.get('skipped', 'no reason recorded')}"
    weights = ", ".join(
        f"{m} × {w:.2f}"
        for m, w in zip(ens.get("members", []), ens.get("weights", []), strict=False)
    )
    return f"{weights}: {ens.get('reason', '')}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.2%}"


def _num(v: float | None, fmt: str = "{:.4f}") -> str:
    return "–" if v is None or v != v else fmt.format(v)
