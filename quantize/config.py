"""QuantConfig: what `--quantization` and its options ask for, and its manifest record."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# scheme -> what it stores and computes; the manifest records the name.
SCHEMES = {
    "w8a16": "int8 weights (symmetric, per output channel or grouped), activations in the model dtype",
    "w8a8": "int8 weights + dynamic per-token int8 activations, SmoothQuant folded into norms",
    "w8a8_static": "int8 weights + static per-tensor int8 activations from calibration "
                   "(msModelSlim's W8A8), SmoothQuant folded into norms",
}
# vLLM / msModelSlim spellings accepted for the same schemes.
ALIASES = {"w8a8_dynamic": "w8a8", "int8": "w8a16"}
DEFAULT_SMOOTHQUANT_ALPHA = 0.5


def resolve_scheme(name: str | None) -> str | None:
    """The canonical scheme for a user's spelling, or None for no quantization."""
    if name is None or name.lower() in ("", "none"):
        return None
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SCHEMES:
        choices = ", ".join(sorted(SCHEMES))
        raise ValueError(
            f"unknown quantization scheme {name!r}; choose one of {choices} (or none). "
            "Pre-quantized msModelSlim checkpoints need no --quantization: their "
            "quant_model_description.json says the scheme."
        )
    return key


@dataclass(frozen=True)
class QuantConfig:
    scheme: str
    # w8a16 only: input channels per scale (None: one scale per output channel).
    group_size: int | None = None
    # Module names (fnmatch patterns) kept in the model dtype besides the defaults.
    exclude: tuple[str, ...] = ()
    quantize_lm_head: bool = False
    smoothquant_alpha: float = DEFAULT_SMOOTHQUANT_ALPHA
    calibration_data: str | None = None  # text file; None: the built-in set
    calibration_tokens: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", resolve_scheme(self.scheme))
        if self.scheme is None:
            raise ValueError("QuantConfig needs a scheme; use None for no quantization")
        if self.group_size is not None:
            if self.scheme != "w8a16":
                raise ValueError(f"group_size applies to w8a16 only, not {self.scheme}")
            if self.group_size <= 0 or self.group_size % 8:
                raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if self.calibration_tokens <= 0:
            raise ValueError(f"calibration_tokens must be positive, got {self.calibration_tokens}")

    @property
    def needs_calibration(self) -> bool:
        return self.scheme in ("w8a8", "w8a8_static")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d
