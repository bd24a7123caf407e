"""The benchmark protocol: which request every benchmark item gets.

:class:`BenchSettings` is derived from :class:`~brushnet.methods.InpaintRequest`: every field but those the
benchmark sets itself (:data:`BENCH_EXCLUDED_FIELDS`), with the paper's defaults, plus per-method options and
extra scorers. Light (pydantic only), so ``brushnet bench --help`` builds its flags from it instantly.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..methods.base import InpaintRequest

__all__ = ["BENCH_EXCLUDED_FIELDS", "BENCH_DEFAULTS", "PAPER_SCHEDULER", "BenchSettings"]

BENCH_EXCLUDED_FIELDS = {
    "prompt": "each item's prompt",
    "num_images": "one generation per item",
    "blend": "both variants are scored: raw, and blended with blend_kernel_size",
    "invert_mask": "the mask kind (inside/outside) decides the hole",
    "options": "per method: BenchSettings.options",
}
"""Request fields the benchmark protocol sets itself, and why; every other field is a protocol setting."""

BENCH_DEFAULTS = {"steps": 50, "guidance_scale": 7.5, "seed": 1234}
"""The BrushNet paper's protocol (reference §6): 50 steps, guidance 7.5, seed 1234 for every image."""

PAPER_SCHEDULER = "unipc-original"
"""The paper's scheduler: UniPC ending at sigma_min (diffusers ≤ 0.27), used for every method that takes any
scheduler when the protocol names none; a method with its own schedule (RePaint) keeps its default."""


def _protocol_fields() -> dict[str, Any]:
    from pydantic.fields import FieldInfo

    fields: dict[str, Any] = {}
    for name, info in InpaintRequest.model_fields.items():
        if name not in BENCH_EXCLUDED_FIELDS:
            merged = FieldInfo.merge_field_infos(info, default=BENCH_DEFAULTS.get(name, info.default))
            fields[name] = (info.annotation, merged)
    return fields


class _SettingsBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Method name -> options.")
    scorers: list[str] = Field(
        default_factory=list, description="Extra per-image scorers (brushnet.bench.scorers), e.g. 'shapes'."
    )

    @model_validator(mode="after")
    def _valid_request(self):
        InpaintRequest.build(self.model_dump(exclude={"options", "scorers"}))  # the request's own checks
        from .scorers import get_scorer

        for name in self.scorers:
            get_scorer(name)
        return self

    def request_for(self, method_cls, prompt: str) -> InpaintRequest:
        """The request one item gets under this protocol with method ``method_cls`` (scheduler resolved)."""
        # the kernel is the blended variant's, pasted back by the runner: the generation itself is unblended
        fields = self.model_dump(exclude={"options", "scorers", "blend_kernel_size"})
        if fields["scheduler"] is None and method_cls.schedulers is None:
            fields["scheduler"] = PAPER_SCHEDULER
        request = InpaintRequest.build(
            fields, prompt=prompt, blend=False, options=self.options.get(method_cls.name, {})
        )
        return method_cls.check(request, method_cls.parse_options(request.options))


BenchSettings = create_model("BenchSettings", __base__=_SettingsBase, **_protocol_fields())
BenchSettings.__doc__ = """The generation protocol: every :class:`~brushnet.methods.InpaintRequest` field but
those in :data:`BENCH_EXCLUDED_FIELDS`, with the paper's defaults (:data:`BENCH_DEFAULTS`, :data:`PAPER_SCHEDULER`),
plus per-method options and extra scorers."""
