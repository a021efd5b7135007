"""Architecture options shared by the two transformers families (wav2vec 2.0 and HuBERT): conv feature encoder +
transformer encoder, as fields of ``Wav2Vec2Config`` / ``HubertConfig``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerOptions:
    """The recipe's ``model`` section common to wav2vec 2.0 and HuBERT. Defaults: the bundled size (~316k exported
    parameters). Base: ``hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    conv_dim=(512,)*7, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16``, dropouts 0.1,
    ``layerdrop=0.05``."""

    hidden_size: int = 96
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 192
    conv_dim: tuple[int, ...] = (64, 64, 64, 64, 64, 64, 64)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)  # 320x: 50 frames per second
    conv_bias: bool = False
    feat_extract_norm: str = "group"  # "group" (Base: GroupNorm on the first conv) | "layer" (LayerNorm everywhere)
    do_stable_layer_norm: bool = False  # pre-LN transformer (Large); False = post-LN (Base)
    num_conv_pos_embeddings: int = 32  # positional conv kernel
    num_conv_pos_embedding_groups: int = 16
    normalize: bool = True  # zero-mean unit-variance waveform (saved as preprocessor_config do_normalize)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    feat_proj_dropout: float = 0.0
    layerdrop: float = 0.0


def config_kwargs(options: TransformerOptions) -> dict:
    """Keyword arguments of ``Wav2Vec2Config`` / ``HubertConfig`` for the shared architecture fields.

    Their ``mask_time_*`` fields stay at HF's defaults: they are the SpecAugment of HF fine-tuning; pretraining
    masks are passed to the forward (HF only needs ``mask_time_prob > 0`` to create ``masked_spec_embed``).
    """
    return dict(
        hidden_size=options.hidden_size, num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=options.num_attention_heads, intermediate_size=options.intermediate_size,
        conv_dim=tuple(options.conv_dim), conv_kernel=tuple(options.conv_kernel),
        conv_stride=tuple(options.conv_stride), conv_bias=options.conv_bias,
        feat_extract_norm=options.feat_extract_norm, do_stable_layer_norm=options.do_stable_layer_norm,
        num_conv_pos_embeddings=options.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=options.num_conv_pos_embedding_groups, hidden_dropout=options.hidden_dropout,
        attention_dropout=options.attention_dropout, activation_dropout=options.activation_dropout,
        feat_proj_dropout=options.feat_proj_dropout, final_dropout=0.0, layerdrop=options.layerdrop,
        apply_spec_augment=True)
