"""Vision projectors (`--mmproj`): what llama-server's multimodal encoder (mtmd's CLIP) allocates.

Two buffers, on the first GPU when the projector is offloaded (the default) and on the host otherwise:
the projector's weights (its tensors), and the compute buffer it reserves for one image of the warmup
size (`clip.vision.image_size`). The compute buffer is the largest of three phases of the ViT graph,
read off llama-server's logs on generated SigLIP projectors (tests/e2e/test_projector.py):

- the input: the image in f32 and its im2col patches (in the patch kernel's type);
- attention: six f32 rows of the embedding per patch, plus, without flash attention, the f32 scores of
  every head (patches² × heads);
- the FFN: its width plus three embedding rows per patch, f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llamactl.model import quants

from llamactl.errors import UnsupportedModelError
from llamactl.model.gguf import GGUFHeader, read_header

F32 = 4
ALIGNMENT = 32
CHECKED_TYPES = frozenset({"gemma3"})  # projector types whose compute buffer was checked against llama-server


@dataclass(frozen=True)
class ProjectorParams:
    path: str
    proj_type: str
    n_embd: int
    n_ff: int
    n_head: int
    n_layer: int
    image_size: int
    patch_size: int
    weights_bytes: int
    patch_type_bytes: float  # bytes per element of the patch kernel (im2col's type)

    @property
    def n_patches(self) -> int:
        side = self.image_size // self.patch_size
        return side * side


def projector_params(path: str | Path) -> ProjectorParams:
    header = read_header(path)
    return projector_from_header(header)


def projector_from_header(header: GGUFHeader) -> ProjectorParams:
    if not header.get("clip.has_vision_encoder"):
        raise UnsupportedModelError(f"{header.path}: not a vision projector (no clip.has_vision_encoder)")

    def num(key: str) -> int:
        value = header.get(f"clip.vision.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**24:
            raise UnsupportedModelError(f"{header.path}: projector key clip.vision.{key} missing or implausible ({value!r})")
        return value

    proj_type = header.get("clip.projector_type") or header.get("clip.vision.projector_type") or "mlp"
    patch = next((t for t in header.tensors if t.name == "v.patch_embd.weight"), None)
    patch_bytes = 2.0
    if patch is not None:
        block, size = quants.sizes(patch.ggml_type)
        patch_bytes = max(size / block, 2.0)  # quantized kernels convolve in f16
    weights = sum(-(-t.n_bytes // ALIGNMENT) * ALIGNMENT for t in header.tensors)
    return ProjectorParams(path=str(header.path), proj_type=str(proj_type), n_embd=num("embedding_length"),
                           n_ff=num("feed_forward_length"), n_head=num("attention.head_count"),
                           n_layer=num("block_count"), image_size=num("image_size"), patch_size=num("patch_size"),
                           weights_bytes=weights, patch_type_bytes=patch_bytes)


def compute_bytes(p: ProjectorParams, flash_attn: bool) -> int:
    """The encoder's reserved compute buffer for one warmup-size image (see the module's docstring)."""
    pixels = 3 * p.image_size * p.image_size
    n = p.n_patches
    phases = [
        F32 * pixels + int(p.patch_type_bytes * pixels),
        F32 * n * 6 * p.n_embd + (0 if flash_attn else F32 * n * n * p.n_head),
        F32 * n * (p.n_ff + 3 * p.n_embd),
    ]
    return max(phases)
