"""The schema of a run folder's ``model.json``, checked on every load.

A hand-edited or half-written description must not give silent wrong answers (a negative
temperature flips labels, ``std`` 0 gives NaN, a string for ``classes`` gives one-letter labels)
nor tracebacks: every violation is one :class:`~transferlab.errors.TransferlabError` that names
the field. Nothing in the file may name a path outside the run folder that loading would open or
predicting would write to (``body.recipe`` file arguments, ``config.cache_dir``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from transferlab.errors import TransferlabError
from transferlab.storage import tensor_shapes

__all__ = ["MAX_INPUT_SIDE", "validate_model_meta"]

# Larger inputs than any timm model uses; 20000x20000 would take tens of GB per image.
MAX_INPUT_SIDE = 4096
_FILE_KEYS = frozenset(
    {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "file", "cache_dir", "url",
     "hf_hub_id", "pretrained_path", "state_dict_path", "weights"}
)  # fmt: skip
_MAX_LISTED = 8

Side = Annotated[int, Field(strict=True, ge=1, le=MAX_INPUT_SIDE)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class PreprocessSchema(_Model):
    input_size: tuple[Side, Side]
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
    crop_pct: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    crop_mode: Literal["center", "squash", "border"] = "center"
    mean: tuple[Finite, Finite, Finite]
    std: tuple[Positive, Positive, Positive]


class HeadSchema(_Model):
    kind: StrictStr
    in_features: Annotated[int, Field(strict=True, ge=1, le=1_000_000)]
    num_classes: Annotated[int, Field(strict=True, ge=2, le=1_000_000)]


class MemberRecipeSchema(_Model):
    kind: Literal["timm", "scratch"]

    @model_validator(mode="before")
    @classmethod
    def _no_files(cls, value: Any) -> Any:
        _check_no_files(value)
        return value


class MemberSchema(_Model):
    """One network of an ensemble: its body, its head, the preprocessing it was trained with."""

    body: MemberRecipeSchema
    head: HeadSchema
    preprocess: PreprocessSchema


class RecipeSchema(MemberRecipeSchema):
    kind: Literal["timm", "scratch", "ensemble"]  # type: ignore[assignment]
    members: Annotated[list[MemberSchema], Field(min_length=2, max_length=16)] | None = None

    @model_validator(mode="after")
    def _members_of_ensembles(self) -> RecipeSchema:
        if (self.kind == "ensemble") != (self.members is not None):
            raise ValueError("an ensemble recipe (and only one) lists its members")
        return self


class BodySchema(_Model):
    spec: StrictStr
    recipe: RecipeSchema
    weights_hash: StrictStr
    trained: bool = False
    arch: StrictStr | None = None  # Backbone.arch: the feature cache's key without a build


class ConfigSchema(_Model):
    cache_dir: StrictStr | None = None


class ModelMeta(_Model):
    format_version: int
    classes: Annotated[list[StrictStr], Field(min_length=2)]
    preprocess: PreprocessSchema
    body: BodySchema
    head: HeadSchema
    strategy: StrictStr
    temperature: Positive = 1.0
    config: ConfigSchema = Field(default_factory=ConfigSchema)
    versions: dict[str, Any] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({c for c in value if value.count(c) > 1})
        if dupes:
            raise ValueError(f"class names must be unique; repeated: {', '.join(dupes)}")
        if any(not c.strip() for c in value):
            raise ValueError("class names must not be empty")
        return value


def _check_no_files(value: Any, key: str = "") -> None:
    """Recipes describe an architecture; a key that names a file would make timm open it."""
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k) in _FILE_KEYS and v not in (None, "", {}, False):
                raise ValueError(f"{k!r} names a file outside the run folder; remove it")
            _check_no_files(v, str(k))
    elif isinstance(value, list):
        for v in value:
            _check_no_files(v, key)
    elif isinstance(value, str) and ("/" in value or "\\" in value or value.startswith("~")):
        raise ValueError(f"{value!r} looks like a path; recipes may not name files")


def validate_model_meta(meta: Any, meta_path: Path) -> dict[str, Any]:
    """``meta`` (parsed ``model.json``) if it fits the schema, else one error naming the fields."""
    try:
        checked = ModelMeta.model_validate(meta)
    except ValidationError as exc:
        raise TransferlabError(
            f"{meta_path}: invalid model description: {_describe(exc)}"
        ) from None
    problems = []
    if checked.head.num_classes != len(checked.classes):
        problems.append(
            f"classes has {len(checked.classes)} names but head.num_classes is "
            f"{checked.head.num_classes}"
        )
    for i, member in enumerate(checked.body.recipe.members or []):
        if member.head.num_classes != len(checked.classes):
            problems.append(
                f"body.recipe.members.{i}.head.num_classes is {member.head.num_classes}, not "
                f"the {len(checked.classes)} classes"
            )
    problems += _cache_dir_problem(checked.config.cache_dir)
    if problems:
        raise TransferlabError(f"{meta_path}: invalid model description: {'; '.join(problems)}")
    return meta


def check_head_shapes(head: Any, head_file: Path) -> None:
    """The tensors in ``head_file`` have the shapes the head spec builds (read from the header)."""
    try:
        stored = tensor_shapes(head_file)
    except TransferlabError:  # a corrupt file is reported by load_tensors later
        return
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    if stored != expected:
        diff = [
            f"{k}: file {list(stored[k]) if k in stored else 'none'}, "
            f"spec {list(expected[k]) if k in expected else 'none'}"
            for k in sorted(set(stored) | set(expected))
            if stored.get(k) != expected.get(k)
        ]
        raise TransferlabError(
            f"{head_file}: weights do not match model.json's head spec (kind, in_features, "
            f"num_classes): {'; '.join(diff[:_MAX_LISTED])}"
        )


def _cache_dir_problem(cache_dir: str | None) -> list[str]:
    """``config.cache_dir`` is where predict writes; only a feature cache (or nothing) may be
    there. A folder that does not exist is fine: it is then not used."""
    if not cache_dir:
        return []
    folder = Path(cache_dir).expanduser()
    if not os.path.lexists(folder):
        return []
    if folder.is_dir() and any((folder / sub).is_dir() for sub in ("features", "exports", "scans")):
        return []
    if folder.is_dir() and not any(folder.iterdir()):
        return []
    return [
        f"config.cache_dir {cache_dir!r} is not a transferlab feature cache; set it to null "
        "(predict would write there)"
    ]


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:_MAX_LISTED]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(top level)"
        msg = err.get("msg", "invalid")
        got = err.get("input")
        shown = (
            ""
            if err.get("type") == "missing" or isinstance(got, dict | list)
            else f" (got {_short(got)})"
        )
        parts.append(f"{loc}: {msg}{shown}")
    more = exc.error_count() - _MAX_LISTED
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
