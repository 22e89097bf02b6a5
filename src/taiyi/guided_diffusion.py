"""OpenAI guided-diffusion (ADM) UNets: a reference implementation and a converter to diffusers.

Taiyi-Diffusion-532M-Nature and Disco Diffusion's unconditional models are guided-diffusion
checkpoints (``512x512_diffusion_uncond_finetune_008100.pt`` and its fine-tunes). This module holds

- :class:`ADMUNet`, a direct implementation of that architecture whose state dict has exactly the
  guided-diffusion key layout, so a published checkpoint loads into it with a strict
  ``load_state_dict`` (it is the reference the converter is tested against);
- :func:`convert_guided_diffusion`, which writes a diffusers model folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``) computing the same function;
- :class:`ADMUNet2DModel`, a ``UNet2DModel`` whose sinusoidal time embedding may be wider than
  ``block_out_channels[0]``: ADM-512 feeds a 256-d sinusoid into a UNet whose first level has 128
  channels, which stock ``UNet2DModel`` cannot express. Converted folders whose sinusoid width equals
  ``block_out_channels[0]`` are written as stock ``UNet2DModel``; :func:`load_unet` loads either.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .errors import InvalidInputError, OutputError
from .io import FILE_MODE, atomic_folder

__all__ = [
    "ADMConfig",
    "ADMUNet",
    "ADMUNet2DModel",
    "config_for_512_uncond",
    "convert_guided_diffusion",
    "diffusers_config",
    "infer_config",
    "load_guided_diffusion_state_dict",
    "load_unet",
]

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

# guided-diffusion's default channel_mult for each image size (script_util.create_model): used to
# guess image_size from the weights, which do not record it.
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ADMConfig:
    """Architecture of a guided-diffusion ``UNetModel`` (the arguments of its constructor).

    ``attention_resolutions`` are downsample rates (1 = full resolution), as ``UNetModel`` takes them;
    the command-line scripts (and Disco's ``model_config``) give resolutions instead, which
    :func:`config_from_script_args` turns into rates.
    """

    image_size: int | None = 512
    in_channels: int = 3
    model_channels: int = 256
    out_channels: int = 6
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 32, 64)
    channel_mult: tuple[float, ...] = (0.5, 1, 1, 2, 2, 4, 4)
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False

    def channels(self, level: int) -> int:
        return int(self.channel_mult[level] * self.model_channels)


def config_for_512_uncond() -> ADMConfig:
    """The published 512×512 unconditional model (Disco Diffusion, Taiyi-Diffusion-532M-Nature)."""
    return ADMConfig()


# Keys of guided-diffusion's model_and_diffusion_defaults() that do not change the UNet's weights.
_NON_ARCHITECTURE_KEYS = {
    "diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart", "rescale_timesteps",
    "rescale_learned_sigmas", "sigma_small", "use_fp16", "use_checkpoint", "dropout", "num_heads",
    "num_heads_upsample", "class_cond",
}  # fmt: skip
_ARCHITECTURE_KEYS = {
    "image_size", "num_channels", "model_channels", "in_channels", "out_channels", "learn_sigma", "num_res_blocks",
    "channel_mult", "attention_resolutions", "num_head_channels", "use_scale_shift_norm", "resblock_updown",
    "use_new_attention_order",
}  # fmt: skip


def _int_list(value: Any, name: str) -> tuple[float, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        raise InvalidInputError(f"config {name} must be a list or a comma-separated string, not {value!r}")
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"config {name} must hold numbers, not {value!r}") from exc
    return tuple(int(n) if n == int(n) else n for n in numbers)


def config_from_script_args(args: dict, base: ADMConfig) -> ADMConfig:
    """Override ``base`` with guided-diffusion script settings (the keys of Disco's ``model_config``).

    Settings of the diffusion rather than the network (``diffusion_steps``, ``noise_schedule``,
    ``use_fp16`` ...) are accepted and ignored; unknown keys are refused, so a typo does not pass silently.
    """
    unknown = sorted(set(args) - _ARCHITECTURE_KEYS - _NON_ARCHITECTURE_KEYS)
    if unknown:
        raise InvalidInputError(f"unknown guided-diffusion config key(s) {', '.join(unknown)}")
    if args.get("class_cond"):
        raise InvalidInputError(
            "class-conditional guided-diffusion models are not supported; use an unconditional one"
        )
    changes: dict[str, Any] = {}
    for key in ("image_size", "in_channels", "out_channels", "num_res_blocks", "num_head_channels"):
        if key in args:
            changes[key] = args[key]
    if "num_channels" in args or "model_channels" in args:
        changes["model_channels"] = args.get("num_channels", args.get("model_channels"))
    for key, value in changes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidInputError(f"config {key} must be a positive integer, not {value!r}")
    for key in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        if key in args:
            changes[key] = bool(args[key])
    if "learn_sigma" in args and "out_channels" not in args:
        in_channels = changes.get("in_channels", base.in_channels)
        changes["out_channels"] = in_channels * 2 if args["learn_sigma"] else in_channels
    if args.get("channel_mult"):  # "" means "the default for the image size" in guided-diffusion
        changes["channel_mult"] = _int_list(args["channel_mult"], "channel_mult")
    if "attention_resolutions" in args:
        image_size = changes.get("image_size", base.image_size)
        if not image_size:
            raise InvalidInputError("config attention_resolutions needs image_size to turn resolutions into rates")
        resolutions = _int_list(args["attention_resolutions"], "attention_resolutions")
        if any(not isinstance(r, int) or r <= 0 or image_size % r for r in resolutions):
            raise InvalidInputError(
                f"config attention_resolutions {args['attention_resolutions']!r} must divide image_size {image_size}"
            )
        changes["attention_resolutions"] = tuple(sorted(image_size // r for r in resolutions))
    return replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# The reference network, with guided-diffusion's module names
# ---------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (guided-diffusion's ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid laid out cat[cos, sin], frequencies exp(-ln(max_period)·i/half): (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Downsample(nn.Module):
    """3×3 stride-2 convolution (``resblock_updown=False``); the parameter is named ``op``."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest 2× upsampling then a 3×3 convolution named ``conv`` (``resblock_updown=False``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding, optionally resampling (up/down) without parameters."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        *,
        use_scale_shift_norm: bool,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.up, self.down = up, down
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        # Scale-shift needs a scale and a shift per channel, hence twice the width.
        emb_out = 2 * out_channels if use_scale_shift_norm else out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            _norm(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
        # Resampling sits between the activation and the convolution, on both paths.
        h = conv(self._resample(norm_act(x)))  # (B, C_out, H', W')
        x = self._resample(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C_out or 2·C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention; ``qkv`` is a 1×1 Conv1d to 3·C channels.

    Legacy order (guided-diffusion's default) lays the qkv channels out (heads, 3, ch): each head's
    q, k and v are adjacent. The new order lays them out (3, heads, ch).
    """

    def __init__(self, channels: int, num_head_channels: int, *, use_new_attention_order: bool):
        super().__init__()
        if channels % num_head_channels:
            raise InvalidInputError(
                f"attention width {channels} is not a multiple of num_head_channels {num_head_channels}; "
                "set num_head_channels in the config"
            )
        self.heads = channels // num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x_flat = x.reshape(b, c, -1)  # (B, C, T)
        qkv = self.qkv(self.norm(x_flat))  # (B, 3C, T)
        ch = c // self.heads
        if self.use_new_attention_order:
            q, k, v = (t.reshape(b * self.heads, ch, -1) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)  # each (B·heads, ch, T)
        scale = 1 / math.sqrt(math.sqrt(ch))  # on q and k each: 1/sqrt(ch) on their product
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)  # (B·heads, T, T)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        attended = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)  # (B, C, T)
        return (x_flat + self.proj_out(attended)).reshape(b, c, *spatial)


class EmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks also receive the time embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """guided-diffusion's unconditional ``UNetModel`` (dropout 0), with its exact state-dict key layout.

    Weights come from a checkpoint; the initialisation here is PyTorch's default (guided-diffusion
    zero-initialises the last convolutions, which would make tests of the function trivial).

    Args:
        config: the architecture; :func:`config_for_512_uncond` gives the published 512 model.
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = 4 * mc
        kw = {"use_scale_shift_norm": config.use_scale_shift_norm}

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(
                channels, config.num_head_channels, use_new_attention_order=config.use_new_attention_order
            )

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = config.channels(0)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))])
        skip_channels, ds, last = [ch], 1, len(config.channel_mult) - 1
        for level in range(len(config.channel_mult)):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, config.channels(level), **kw)]
                ch = config.channels(level)
                if ds in config.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                down = ResBlock(ch, emb_dim, ch, down=True, **kw) if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(
            ResBlock(ch, emb_dim, ch, **kw), attention(ch), ResBlock(ch, emb_dim, ch, **kw)
        )
        self.output_blocks = nn.ModuleList([])
        for level in reversed(range(len(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, config.channels(level), **kw)]
                ch = config.channels(level)
                if ds in config.attention_resolutions:
                    layers.append(attention(ch))
                if level and i == config.num_res_blocks:
                    layers.append(ResBlock(ch, emb_dim, ch, up=True, **kw) if config.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, config.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) noisy images and (B,) timesteps → (B, out, H, W) (eps, then variance if learn_sigma)."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))  # (B, 4·mc)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# The diffusers side
# ---------------------------------------------------------------------------------------------


class ADMUNet2DModel(UNet2DModel):
    """``UNet2DModel`` with one more config field, ``time_proj_dim``: the width of the timestep sinusoid.

    Stock ``UNet2DModel`` ties it to ``block_out_channels[0]``; guided-diffusion ties it to
    ``model_channels``, which differs when ``channel_mult[0] != 1`` (ADM-512: 256 vs 128).
    ``None`` means stock behaviour, so this class also loads any stock ``UNet2DModel`` folder.
    The whole signature is repeated because diffusers reads the config fields off ``__init__``.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
        time_proj_dim: int | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type=class_embed_type,
            num_class_embeds=num_class_embeds,
            num_train_timesteps=num_train_timesteps,
        )
        if time_proj_dim is not None and time_proj_dim != block_out_channels[0]:
            if time_embedding_type != "positional" or class_embed_type is not None:
                raise ValueError(
                    "time_proj_dim is only supported with positional time embeddings and no class embedding"
                )
            self.time_proj = Timesteps(time_proj_dim, flip_sin_to_cos, freq_shift)
            self.time_embedding = TimestepEmbedding(time_proj_dim, time_embedding_dim or block_out_channels[0] * 4)


def load_unet(folder: str | os.PathLike, **kwargs: Any) -> UNet2DModel:
    """Load a converted (or any unconditional ``UNet2DModel``) folder with the class it was saved as.

    Args:
        folder: a diffusers model folder.
        kwargs: passed to ``from_pretrained`` (``torch_dtype``, ...).
    """
    return ADMUNet2DModel.from_pretrained(folder, **kwargs)


def diffusers_config(config: ADMConfig) -> dict[str, Any]:
    """The ``UNet2DModel`` / :class:`ADMUNet2DModel` config computing the same function as ``ADMUNet(config)``."""
    levels = len(config.channel_mult)
    attention_levels = [2**level in config.attention_resolutions for level in range(levels)]
    if config.resblock_updown:  # resampling by parameter-free up/down ResBlocks
        plain_down, plain_up = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D"
    else:  # resampling by a strided / post-upsample 3×3 conv
        plain_down, plain_up = "DownBlock2D", "UpBlock2D"
    block_out_channels = [config.channels(level) for level in range(levels)]
    result: dict[str, Any] = {
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * config.model_channels,
        "flip_sin_to_cos": True,  # cat[cos, sin]
        "freq_shift": 0,  # frequencies exp(-ln(10000)·i/half)
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attention_levels],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attention_levels)],
        "block_out_channels": block_out_channels,
        "layers_per_block": config.num_res_blocks,
        "downsample_padding": 1,
        "downsample_type": "resnet" if config.resblock_updown else "conv",
        "upsample_type": "resnet" if config.resblock_updown else "conv",
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": config.num_head_channels,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # else the mid-block attention has no norm under scale-shift
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "add_attention": True,
    }
    if config.model_channels != block_out_channels[0]:
        result["time_proj_dim"] = config.model_channels
    return result


def _resblock_keys(src: str, dst: str, state: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip
    for old, new in names.items():
        for param in ("weight", "bias"):
            if f"{src}.{old}.{param}" in state:
                out[f"{dst}.{new}.{param}"] = state[f"{src}.{old}.{param}"]


def _attention_keys(
    src: str, dst: str, state: dict[str, torch.Tensor], out: dict[str, torch.Tensor], config: ADMConfig
) -> None:
    for param in ("weight", "bias"):
        out[f"{dst}.group_norm.{param}"] = state[f"{src}.norm.{param}"]
        out[f"{dst}.to_out.0.{param}"] = state[f"{src}.proj_out.{param}"].squeeze(-1)
        qkv = state[f"{src}.qkv.{param}"]  # (3C, C, 1) or (3C,)
        c = qkv.shape[0] // 3
        heads = c // config.num_head_channels
        rest = qkv.shape[1:2]  # (C,) for the weight, () for the bias
        if config.use_new_attention_order:
            q, k, v = qkv.reshape(3, c, *rest)  # (3, heads·ch, ...)
        else:
            # Legacy (heads, 3, ch): chunk(3) would mix heads; pick q, k, v inside each head.
            per_head = qkv.reshape(heads, 3, config.num_head_channels, *rest)
            q, k, v = (per_head[:, i].reshape(c, *rest) for i in range(3))
        for name, tensor in zip(("to_q", "to_k", "to_v"), (q, k, v), strict=True):
            out[f"{dst}.{name}.{param}"] = tensor.contiguous().clone()


def convert_state_dict(state: dict[str, torch.Tensor], config: ADMConfig) -> dict[str, torch.Tensor]:
    """Rename (and split qkv of) a guided-diffusion state dict into the layout of ``diffusers_config(config)``."""
    out: dict[str, torch.Tensor] = {}
    for param in ("weight", "bias"):
        out[f"time_embedding.linear_1.{param}"] = state[f"time_embed.0.{param}"]
        out[f"time_embedding.linear_2.{param}"] = state[f"time_embed.2.{param}"]
        out[f"conv_in.{param}"] = state[f"input_blocks.0.0.{param}"]
        out[f"conv_norm_out.{param}"] = state[f"out.0.{param}"]
        out[f"conv_out.{param}"] = state[f"out.2.{param}"]
    nrb, levels = config.num_res_blocks, len(config.channel_mult)
    index = 1
    for level in range(levels):
        attn = 2**level in config.attention_resolutions
        for i in range(nrb):
            _resblock_keys(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{i}", state, out)
            if attn:
                _attention_keys(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{i}", state, out, config)
            index += 1
        if level != levels - 1:
            if config.resblock_updown:
                _resblock_keys(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", state, out)
            else:
                for param in ("weight", "bias"):
                    out[f"down_blocks.{level}.downsamplers.0.conv.{param}"] = state[
                        f"input_blocks.{index}.0.op.{param}"
                    ]
            index += 1
    _resblock_keys("middle_block.0", "mid_block.resnets.0", state, out)
    _attention_keys("middle_block.1", "mid_block.attentions.0", state, out, config)
    _resblock_keys("middle_block.2", "mid_block.resnets.1", state, out)
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attn = 2**level in config.attention_resolutions
        for i in range(nrb + 1):
            _resblock_keys(f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{i}", state, out)
            if attn:
                _attention_keys(f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{i}", state, out, config)
            if level and i == nrb:
                src = f"output_blocks.{index}.{2 if attn else 1}"
                if config.resblock_updown:
                    _resblock_keys(src, f"up_blocks.{up}.upsamplers.0", state, out)
                else:
                    for param in ("weight", "bias"):
                        out[f"up_blocks.{up}.upsamplers.0.conv.{param}"] = state[f"{src}.conv.{param}"]
            index += 1
    return out


# ---------------------------------------------------------------------------------------------
# Reading checkpoints
# ---------------------------------------------------------------------------------------------


def load_guided_diffusion_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors: ``.safetensors`` always, pickled ``.pt``/``.pth`` only when allowed.

    Pickled files are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidInputError(f"checkpoint {path} is not a readable safetensors file ({reason})") from exc
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise InvalidInputError(
                f"{path} holds pickled weights, which can run code when loaded; convert it to safetensors, "
                "or pass --allow-pickle (allow_pickle=True) if you trust its source"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # torch's words advise weights_only=False, which taiyi never does
            raise InvalidInputError(
                f"checkpoint {path} is damaged or holds objects other than tensors, which taiyi does not unpickle"
            ) from exc
        except Exception as exc:  # torch's reasons for a cut-off file range from "EOFError" to "[Errno 22]" to "101"
            reason = " ".join(str(exc).split())[:100] or type(exc).__name__
            raise InvalidInputError(
                f"checkpoint {path} could not be read as a torch state dict: it is truncated, damaged or not a "
                f"PyTorch file ({reason}); download it again"
            ) from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    else:
        raise InvalidInputError(
            f"checkpoint {path} has an unknown format {suffix or '(no suffix)'}; use .safetensors, .pt or .pth"
        )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InvalidInputError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def _submodule(state: dict[str, torch.Tensor], prefix: str) -> str | None:
    """What kind of guided-diffusion layer sits at ``prefix``: resblock, attention, op, conv or None."""
    for marker, kind in (
        ("in_layers.0.weight", "resblock"), ("qkv.weight", "attention"), ("op.weight", "op"), ("conv.weight", "conv")
    ):  # fmt: skip
        if f"{prefix}.{marker}" in state:
            return kind
    return None


def infer_config(state: dict[str, torch.Tensor]) -> ADMConfig:
    """Read the architecture off a guided-diffusion state dict.

    The weights fix every setting except ``num_head_channels`` and ``use_new_attention_order``
    (guided-diffusion's defaults, 64 and legacy, are assumed) and ``image_size`` (guessed from the
    default ``channel_mult`` of each published size, else None).

    Raises:
        InvalidInputError: the keys do not follow guided-diffusion's UNet layout.
    """
    try:
        return _infer_config(state)
    except InvalidInputError:
        raise
    except KeyError as exc:  # a key the layout implies is absent: the checkpoint is truncated or foreign
        raise InvalidInputError(f"not a guided-diffusion UNet checkpoint: it has no {exc.args[0]}") from exc
    except (ValueError, IndexError) as exc:
        raise InvalidInputError(f"not a guided-diffusion UNet checkpoint: unexpected key layout ({exc})") from exc


def _infer_config(state: dict[str, torch.Tensor]) -> ADMConfig:
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight", "middle_block.0.in_layers.0.weight"):
        if key not in state:
            raise InvalidInputError(f"not a guided-diffusion UNet checkpoint: it has no {key}")
    if any(k.startswith("label_emb.") for k in state):
        raise InvalidInputError("class-conditional guided-diffusion models (label_emb) are not supported")
    mc = state["time_embed.0.weight"].shape[1]
    n_out = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks."))
    ups = [j for j in range(n_out) if any(_submodule(state, f"output_blocks.{j}.{m}") in ("resblock", "conv")
                                          for m in (1, 2))]  # fmt: skip
    nrb = ups[0] if ups else n_out - 1
    if nrb < 1 or n_out % (nrb + 1):
        raise InvalidInputError(f"checkpoint has {n_out} output blocks, which fits no guided-diffusion UNet layout")
    levels = n_out // (nrb + 1)
    channel_mult, attention = [], []
    for level in range(levels):
        first = f"input_blocks.{1 + level * (nrb + 1)}"
        if _submodule(state, f"{first}.0") != "resblock":
            raise InvalidInputError(
                f"checkpoint has no residual block at {first}.0; it is not a guided-diffusion UNet"
            )
        mult = state[f"{first}.0.in_layers.2.weight"].shape[0] / mc
        channel_mult.append(int(mult) if mult == int(mult) else mult)
        if _submodule(state, f"{first}.1") == "attention":
            attention.append(2**level)
    resblock_updown = levels == 1 or _submodule(state, f"input_blocks.{nrb + 1}.0") == "resblock"
    first_out = state["input_blocks.1.0.in_layers.2.weight"].shape[0]
    use_scale_shift_norm = state["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * first_out
    image_size = next((size for size, mult in DEFAULT_CHANNEL_MULT.items() if mult == tuple(channel_mult)), None)
    return ADMConfig(
        image_size=image_size,
        in_channels=state["input_blocks.0.0.weight"].shape[1],
        model_channels=mc,
        out_channels=state["out.2.weight"].shape[0],
        num_res_blocks=nrb,
        attention_resolutions=tuple(attention),
        channel_mult=tuple(channel_mult),
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
    )


def check_state_dict(state: dict[str, torch.Tensor], config: ADMConfig) -> None:
    """Compare the checkpoint with ``ADMUNet(config)`` key by key, without allocating weights."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ADMUNet(config).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise InvalidInputError(
            f"checkpoint lacks {len(missing)} weight(s) of the guided-diffusion UNet, e.g. {missing[0]}; "
            "it is truncated or has another architecture (pass a config)"
        )
    if unexpected:
        raise InvalidInputError(
            f"checkpoint has {len(unexpected)} weight(s) this guided-diffusion UNet does not use, e.g. "
            f"{unexpected[0]}; "
            "pass a config matching the checkpoint"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise InvalidInputError(
                f"checkpoint weight {key} has shape {list(state[key].shape)}, the architecture expects {list(shape)}; "
                "pass a config matching the checkpoint"
            )


# ---------------------------------------------------------------------------------------------
# The converter
# ---------------------------------------------------------------------------------------------


def convert_guided_diffusion(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: dict | ADMConfig | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> Path:
    """Convert a guided-diffusion UNet checkpoint into a diffusers model folder; return the folder.

    The folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` and loads with
    :func:`load_unet` (``ADMUNet2DModel.from_pretrained``); when the sinusoid width equals the first
    level's channels it is a stock ``UNet2DModel`` folder. Weights keep the checkpoint's dtype.

    Args:
        ckpt_path: ``.safetensors``, or a pickled ``.pt``/``.pth`` (needs ``allow_pickle``).
        out_dir: folder to create; an existing non-empty folder is refused unless ``overwrite``.
        config: None to read the architecture off the weights; a dict of guided-diffusion script
            settings (Disco's ``model_config``: ``num_head_channels``, ``use_new_attention_order`` ...)
            overriding what is inferred; or a full :class:`ADMConfig`.
        allow_pickle: accept pickled checkpoints (loaded with ``torch.load(weights_only=True)``).
        overwrite: replace an existing non-empty ``out_dir``.

    Raises:
        InvalidInputError: unreadable or unknown checkpoint, or weights not matching the architecture.
        OutputError: ``out_dir`` exists and is not empty, or its parent folder is missing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} is a file; give a folder for the converted model")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir} already exists and is not empty; pass --overwrite to replace it")
    if not out_dir.parent.is_dir():
        raise OutputError(f"output folder {out_dir.parent} does not exist; create it first")
    state = load_guided_diffusion_state_dict(ckpt_path, allow_pickle=allow_pickle)
    if isinstance(config, ADMConfig):
        adm_config = config
    else:
        adm_config = infer_config(state)
        if config:
            adm_config = config_from_script_args(config, adm_config)
    check_state_dict(state, adm_config)

    model_config = diffusers_config(adm_config)
    cls = ADMUNet2DModel if "time_proj_dim" in model_config else UNet2DModel
    with torch.device("meta"):
        model = cls(**model_config)
    try:
        model.load_state_dict(convert_state_dict(state, adm_config), strict=True, assign=True)
    except RuntimeError as exc:  # a mapping bug, not a user mistake: keep the details
        raise RuntimeError(f"converted weights do not fit {cls.__name__}: {exc}") from exc

    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for path in tmp.iterdir():
            os.chmod(path, FILE_MODE)
    return out_dir
