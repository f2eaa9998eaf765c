"""SciceVPR and its teacher Super-CricaVPR on a frozen DINOv2 (Wan et al., 2025; Lu et al., CVPR 2024).

Wan et al., "SciceVPR: Stable Cross-Image Correlation Enhanced Model for Visual Place Recognition"
(Neurocomputing 2025), building on Lu et al., "CricaVPR: Cross-image Correlation-aware Representation
Learning for Visual Place Recognition" (CVPR 2024). One image batch (B, 3, H, W) goes through:

1. **DINOv2** (timm ``vit_{small,base,large}_patch14_dinov2``, frozen): the outputs of the last ``layers``
   (M) blocks, each through the final LayerNorm as DINOv2's ``get_intermediate_layers(norm=True)``:
   patch tokens (B, C, h, w) and class token (B, C), h = H/14, w = W/14.
2. **Multi-layer feature fusion** (SciceVPR §3.2): the M patch maps concatenated on channels (B, M·C, h, w),
   a 1x1 convolution back to C channels + ReLU (``fusion``), then ``mixer_layers`` token-mixer layers
   (MLP-Mixer token mixing: LayerNorm over channels, an MLP across the h·w tokens, residual).
3. **Regional features** (SciceVPR Fig. 4b, multi-level GeM): GeM pooling of the whole fused map and of its
   2x2 and 3x3 regions, each L2-normalised as the authors' GeM layer does: 1 + 4 + 9 = 14 features
   (B, 14, C). ``global_token="cls"`` is the CricaVPR-like layout: the fused class token (the M class tokens
   through the same 1x1 fusion) in place of the whole-map GeM, the region GeMs not normalised.
4. **Encoder** on the 14 features, the only difference of the two models:

   * :class:`CricaTeacher` (Super-CricaVPR): the *cross-image* encoder, ``encoder_layers`` transformer
     layers attending across the images of the batch, separately for each of the 14 feature indices.
     A descriptor depends on the other images of its batch: a training-time device.
   * :class:`SciceStudent` (SciceVPR): the *self-enhanced* encoder, transformer layers (1 in the authors'
     code) applied to every regional feature of every image on its own (a sequence of one token: no
     attention across images, nor across an image's regions); descriptors do not depend on the batch.
     Trained to match the teacher's descriptors (``vpr_ros.training.methods.scicevpr``). The deployable model.

5. **Descriptor**: the 14 encoded features concatenated and L2-normalised (14·C: 10752-d for ViT-B/14),
   optionally projected to ``reduce_dim`` by a PCA fitted after training (:meth:`SciceStudent.fit_reduction`)
   and L2-normalised again; the projection lives in the state dict, so in the same checkpoint.

The token mixer mixes a fixed number of tokens, so a model is built for one ``image_size`` (H, W, multiples
of 14); inputs of another size are resized to it (bilinear) before the backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpr_ros.core.errors import ModelError
from vpr_ros.core.models.heads import GeM
from vpr_ros.core.models.registry import Preprocess, VprModel, register_model

PATCH = 14
#: arch -> (timm model name, token width C)
DINOV2_ARCHS = {
    "vits14": ("vit_small_patch14_dinov2", 384),
    "vitb14": ("vit_base_patch14_dinov2", 768),
    "vitl14": ("vit_large_patch14_dinov2", 1024),
}
#: CricaVPR's regional grid: the whole image (the class token), 2x2 and 3x3 regions.
REGION_LEVELS = (2, 3)
NUM_REGIONS = 1 + sum(n * n for n in REGION_LEVELS)  # 14
GLOBAL_TOKENS = ("cls", "gem")


# --------------------------------------------------------------------------- backbone


def dinov2_backbone(arch: str, pretrained: bool = False, weights: str = "") -> nn.Module:
    """A timm DINOv2 ViT with dynamic image size (positional embeddings interpolated to the input grid).

    With ``pretrained``, the weights come from ``weights``: a local file (a timm state dict or the official
    hub checkpoint, e.g. ``dinov2_vitb14_pretrain.pth``, whose key names timm's filter maps), ``"hub"``
    (the official checkpoint URL through ``torch.hub``, cached in ``$TORCH_HOME/hub/checkpoints``), or
    ``""`` (timm's pretrained tag ``lvd142m`` from the Hugging Face hub).
    """
    import timm  # optional extra "train": only the DINOv2 models
    from timm.models.vision_transformer import checkpoint_filter_fn

    if arch not in DINOV2_ARCHS:
        raise ModelError(f"unknown DINOv2 arch {arch!r}; choose one of {', '.join(DINOV2_ARCHS)}")
    name = DINOV2_ARCHS[arch][0]
    kw: dict[str, Any] = {"dynamic_img_size": True, "num_classes": 0}
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kw)
    if weights and weights != "hub":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"DINOv2 weights file {path} not found (backbone_weights); give a timm state "
                             f"dict or the official {arch} hub checkpoint")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw)
        except Exception as exc:  # wrong keys/shapes, not a torch file
            raise ModelError(f"{path}: not DINOv2 {arch} weights ({type(exc).__name__}: {exc})") from None
    if weights == "hub":
        model = timm.create_model(name, pretrained=False, **kw)
        url = model.pretrained_cfg["url"]
        try:
            state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
        except Exception as exc:
            raise ModelError(f"could not load the official DINOv2 {arch} weights from {url} (looked in "
                             f"$TORCH_HOME/hub/checkpoints first): {type(exc).__name__}: {exc}. Seed that "
                             "folder with the file or set backbone_weights to a local file.") from None
        return model
    try:
        return timm.create_model(name, pretrained=True, **kw)
    except Exception as exc:  # offline, no cached Hugging Face copy
        raise ModelError(f"could not fetch DINOv2 {arch} weights through timm ({name}.lvd142m from the "
                         f"Hugging Face hub): {type(exc).__name__}: {exc}. Offline, set backbone_weights to "
                         "a local file (timm state dict or the official hub checkpoint), or build with "
                         "pretrained=False.") from None


def region_edges(n: int, parts: int) -> list[int]:
    """Boundaries splitting ``n`` cells into ``parts`` near-equal runs (16 -> 0, 5, 11, 16 as CricaVPR)."""
    return [(2 * i * n + parts) // (2 * parts) for i in range(parts + 1)]


class TokenMixer(nn.Module):
    """One MLP-Mixer token-mixing layer on (B, N, C): x + MLP_N(LayerNorm_C(x)) mixing across the N tokens."""

    def __init__(self, tokens: int, channels: int, ratio: float = 1.0) -> None:
        super().__init__()
        hidden = max(1, int(round(tokens * ratio)))
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(tokens, hidden), nn.ReLU(), nn.Linear(hidden, tokens))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x).transpose(1, 2)).transpose(1, 2)


def transformer_encoder(dim: int, layers: int, heads: int, ffn: int, dropout: float) -> nn.TransformerEncoder:
    """CricaVPR's encoder: post-norm transformer layers (GELU), batch-first (B, S, C) tensors."""
    if dim % heads:
        raise ModelError(f"encoder heads ({heads}) must divide the token width {dim}")
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ffn, dropout=dropout, activation="gelu",
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


# --------------------------------------------------------------------------- the shared trunk


class RegionalDinoV2(VprModel):
    """DINOv2 (frozen) -> multi-layer fusion -> 14 regional features -> encoder -> descriptor.

    Subclasses define :meth:`encode` (B, 14, C) -> (B, 14, C).
    """

    def __init__(self, *, arch: str, layers: int, image_size: list[int], mixer_layers: int,
                 mixer_ratio: float, encoder_layers: int, heads: int, ffn: int, dropout: float,
                 global_token: str, pretrained: bool, backbone_weights: str) -> None:
        super().__init__()
        if arch not in DINOV2_ARCHS:
            raise ModelError(f"unknown DINOv2 arch {arch!r}; choose one of {', '.join(DINOV2_ARCHS)}")
        if global_token not in GLOBAL_TOKENS:
            raise ModelError(f"global_token must be one of {GLOBAL_TOKENS}, got {global_token!r}")
        h, w = (int(s) for s in image_size)
        n = max(REGION_LEVELS)
        if h % PATCH or w % PATCH or min(h, w) < PATCH * n:
            raise ModelError(f"image_size {list(image_size)} must be multiples of {PATCH} and at least "
                             f"{PATCH * n} (a {n}x{n} region grid)")
        self.backbone = dinov2_backbone(arch, pretrained, backbone_weights)
        depth = len(self.backbone.blocks)
        if not 1 <= layers <= depth:
            raise ModelError(f"layers must be in 1..{depth} for {arch}, got {layers}")
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        c = DINOV2_ARCHS[arch][1]
        self.image_size = (h, w)
        self.grid = (h // PATCH, w // PATCH)
        self.layers = layers
        self.global_token = global_token
        self.fusion = nn.Conv2d(layers * c, c, kernel_size=1)
        self.mixer = nn.Sequential(*(TokenMixer(self.grid[0] * self.grid[1], c, mixer_ratio)
                                     for _ in range(mixer_layers)))
        self.gem = GeM(p=3.0)
        self.encoder = transformer_encoder(c, encoder_layers, heads, ffn, dropout)
        self.width = c
        self.full_dim = NUM_REGIONS * c
        self.descriptor_dim = self.full_dim
        self.preprocess = Preprocess(input_size=self.image_size)

    def train(self, mode: bool = True) -> RegionalDinoV2:
        super().train(mode)
        self.backbone.eval()  # frozen
        return self

    # -- stages of the paper, each callable on its own (tests, shared-backbone training)

    @torch.no_grad()
    def backbone_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-M patch tokens concatenated on channels (B, M·C, h, w) and class tokens (B, M·C)."""
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
        outs = self.backbone.forward_intermediates(x, indices=self.layers, return_prefix_tokens=True,
                                                   norm=True, intermediates_only=True)
        maps = torch.cat([o[0] for o in outs], dim=1)
        cls = torch.cat([o[1][:, 0] for o in outs], dim=1)
        return maps, cls

    def fuse(self, maps: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-layer fusion: 1x1 conv + ReLU, token mixing -> (B, C, h, w); fused class token (B, C)."""
        f = F.relu(self.fusion(maps))
        b, c, h, w = f.shape
        f = self.mixer(f.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)
        g = F.relu(F.linear(cls, self.fusion.weight.flatten(1), self.fusion.bias))
        return f, g

    def regions(self, fmap: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """(B, 14, C): multi-level GeM of the whole map, its 2x2 and 3x3 regions, each L2-normalised
        (``global_token="gem"``); or the class token + the region GeMs unnormalised (``"cls"``)."""
        feats = [cls if self.global_token == "cls" else self.gem(fmap)]
        h, w = fmap.shape[-2:]
        for n in REGION_LEVELS:
            rows, cols = region_edges(h, n), region_edges(w, n)
            for i in range(n):
                for j in range(n):
                    feats.append(self.gem(fmap[:, :, rows[i]:rows[i + 1], cols[j]:cols[j + 1]]))
        r = torch.stack(feats, dim=1)
        return r if self.global_token == "cls" else F.normalize(r, dim=2)

    def encode(self, r: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, maps: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Backbone tokens -> full L2-normalised descriptor (B, 14·C)."""
        fmap, g = self.fuse(maps, cls)
        return F.normalize(self.encode(self.regions(fmap, g)).flatten(1), dim=1)

    def full_descriptor(self, x: torch.Tensor) -> torch.Tensor:
        """The unreduced descriptor (B, 14·C) of an image batch."""
        return self.head(*self.backbone_tokens(x))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The fused, token-mixed patch map (B, C, h, w)."""
        return [self.fuse(*self.backbone_tokens(x))[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.full_descriptor(x)


class CricaTeacher(RegionalDinoV2):
    """Super-CricaVPR: the cross-image encoder attends across the batch, per regional feature index."""

    def encode(self, r: torch.Tensor) -> torch.Tensor:
        # (B, 14, C) -> (14, B, C): batch = feature index, sequence = the images of the batch.
        return self.encoder(r.transpose(0, 1)).transpose(0, 1)


class SciceStudent(RegionalDinoV2):
    """SciceVPR: the self-enhanced encoder attends among each image's own 14 features (batch-independent)."""

    def __init__(self, *, reduce_dim: int = 0, **kw: Any) -> None:
        super().__init__(**kw)
        if reduce_dim < 0 or reduce_dim > self.full_dim:
            raise ModelError(f"reduce_dim must be in 0..{self.full_dim} (0: no reduction), got {reduce_dim}")
        self.reduce: nn.Linear | None = None
        if reduce_dim:
            self.reduce = nn.Linear(self.full_dim, reduce_dim)
            with torch.no_grad():  # until fitted: a random orthonormal projection (distances roughly kept)
                q, _ = torch.linalg.qr(torch.randn(self.full_dim, reduce_dim))
                self.reduce.weight.copy_(q.T)
                self.reduce.bias.zero_()
            self.reduce.requires_grad_(False)
            self.register_buffer("reduce_fitted", torch.zeros((), dtype=torch.bool))
            self.descriptor_dim = reduce_dim

    def encode(self, r: torch.Tensor) -> torch.Tensor:
        # every regional feature of every image alone: (B*14, 1, C), a sequence of one token
        b, n, c = r.shape
        return self.encoder(r.reshape(b * n, 1, c)).reshape(b, n, c)

    @torch.no_grad()
    def fit_reduction(self, descriptors: torch.Tensor) -> None:
        """PCA of full descriptors (N, 14·C), N >= reduce_dim, as the projection to ``reduce_dim``."""
        if self.reduce is None:
            raise ModelError("this model has no reduction (reduce_dim 0)")
        d = self.reduce.out_features
        if descriptors.ndim != 2 or descriptors.shape[1] != self.full_dim or descriptors.shape[0] < d:
            raise ModelError(f"PCA to {d} dims needs at least {d} descriptors of {self.full_dim} dims, got "
                             f"{tuple(descriptors.shape)}")
        x = descriptors.double()
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        w = vh[:d]
        self.reduce.weight.copy_(w.to(self.reduce.weight.dtype))
        self.reduce.bias.copy_((-w @ mean).to(self.reduce.bias.dtype))
        self.reduce_fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.full_descriptor(x)
        return d if self.reduce is None else F.normalize(self.reduce(d), dim=1)


# --------------------------------------------------------------------------- registration

_COMMON: dict[str, Any] = dict(arch="vitb14", layers=4, image_size=[224, 224], mixer_layers=2,
                               mixer_ratio=1.0, heads=16, ffn=2048, dropout=0.1, global_token="gem",
                               backbone_weights="")
_DINOV2_PRE = Preprocess(input_size=(224, 224))  # DINOv2 uses the ImageNet mean/std


@register_model(
    "scicevpr_dinov2",
    description="SciceVPR student: frozen DINOv2 (last 4 blocks) + multi-layer fusion + 14 regional features "
                "+ self-enhanced encoder -> 14*C (10752-d ViT-B/14) or reduce_dim (PCA)",
    preprocess=_DINOV2_PRE,
    encoder_layers=1,
    reduce_dim=0,
    **_COMMON,
)
def scicevpr_dinov2(pretrained: bool = False, **config: Any) -> SciceStudent:
    return SciceStudent(pretrained=pretrained, **config)


@register_model(
    "cricavpr_teacher_dinov2",
    description="Super-CricaVPR teacher (training only; descriptors depend on the batch): frozen DINOv2 + "
                "multi-layer fusion + 14 regional features + cross-image encoder -> 14*C",
    preprocess=_DINOV2_PRE,
    encoder_layers=2,
    **_COMMON,
)
def cricavpr_teacher_dinov2(pretrained: bool = False, **config: Any) -> CricaTeacher:
    return CricaTeacher(pretrained=pretrained, **config)
