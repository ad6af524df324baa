"""A backbone's stages, stem first: what partial unfreezing and Grad-CAM work on."""

from __future__ import annotations

from torch import nn

__all__ = ["stage_modules"]


def stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages, stem first, for partial unfreezing and Grad-CAM.

    Uses timm's coarse ``group_matcher()`` (the grouping timm itself uses for layer-wise LR decay).
    A stage that is one submodule is returned as that module, so forward hooks on it fire; a stage
    made of several sibling modules (e.g. MobileNet's ``conv_stem`` + ``bn1``) is returned as an
    ``nn.ModuleList`` of the real modules, named ``"a+b"`` — its parameters are the model's own, but
    hook its last element, since the list itself is never called. Parameters held directly by the
    model (a ViT's ``pos_embed``) belong to no stage. Models without a group matcher fall back to
    their top-level children that hold parameters.
    """
    matcher = getattr(model, "group_matcher", None)
    groups: dict[int, list[str]] | None = None
    if callable(matcher):
        try:
            from timm.models import group_parameters

            param_group = group_parameters(model, matcher(coarse=True), reverse=True)
            groups = _cover_groups(model, param_group)
        except (NotImplementedError, TypeError, AttributeError, KeyError):
            groups = None
    if not groups:
        return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]
    stages: list[tuple[str, nn.Module]] = []
    for gid in sorted(groups):
        names = groups[gid]
        modules = [model.get_submodule(n) for n in names]
        if len(modules) == 1:
            stages.append((names[0], modules[0]))
        else:
            stages.append(("+".join(names), nn.ModuleList(modules)))
    return stages


def _cover_groups(model: nn.Module, param_group: dict[str, int]) -> dict[int, list[str]]:
    """Map each group to the fewest, outermost submodules whose parameters all lie in that group."""
    groups_under: dict[str, set[int]] = {}
    for pname, gid in param_group.items():
        parts = pname.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            groups_under.setdefault(".".join(parts[:i]), set()).add(gid)
    chosen: dict[int, list[str]] = {}
    taken: list[str] = []
    for name, _ in model.named_modules():  # pre-order: outer modules before their children
        if not name or name not in groups_under:
            continue
        if any(name.startswith(t + ".") for t in taken):
            continue
        gids = groups_under[name]
        if len(gids) == 1:
            chosen.setdefault(next(iter(gids)), []).append(name)
            taken.append(name)
    return chosen
