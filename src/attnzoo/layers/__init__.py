"""``nn.Module`` layers built on `attnzoo.attention`, the token-mixer registry, and `TinyLM`.

    from attnzoo.layers import TinyLM, register_mixer
    model = TinyLM(vocab_size=8192, d_model=64, n_layers=2, mixer="sliding_window:8")
    model.state_size(seq_len=64)     # recurrent-state floats per sequence, all layers
"""
from .attention import Attention, KVCache, RotaryEmbedding, kv_cache_len
from .mixers import (LinearMixer, MixerEntry, MixerSpec, build_mixer, describe_mixers, get_mixer, layers_label,
                     mixer_names, mixer_state_size, parse_layers, parse_mixer, register_mixer, split_layers,
                     unregister_mixer)
from .linear import GLA, KDA, Based, DeltaNet, GatedDeltaNet, LinearAttention, LinearCache, Lightning, ShortConv
from .tinylm import IGNORE_INDEX, TinyLM
from .gated import GatedAttention
from .moh import MoH
from .mla import MLA, MLACache, to_mla, to_mla_error_curve
from .cca import CCA, CCACache, CCGQA

# the linear-attention layers as token mixers (e.g. TinyLM(..., mixer="gla+attention"))
for _name, _cls in (("linear_attention", LinearAttention), ("lightning", Lightning), ("gla", GLA),
                    ("deltanet", DeltaNet), ("gated_deltanet", GatedDeltaNet), ("kda", KDA), ("based", Based),
                    # latent and head-structured attention (causal, RoPE)
                    ("mla", MLA), ("cca", CCA), ("ccgqa", CCGQA), ("gated_attention", GatedAttention), ("moh", MoH)):
    register_mixer(_name, _cls)
del _name, _cls

__all__ = ["Attention", "KVCache", "RotaryEmbedding", "kv_cache_len", "LinearMixer", "MixerEntry", "MixerSpec", "split_layers",
           "build_mixer", "describe_mixers", "get_mixer", "layers_label", "mixer_names", "mixer_state_size",
           "parse_layers", "parse_mixer", "register_mixer", "unregister_mixer", "IGNORE_INDEX", "TinyLM",
           "LinearAttention", "Lightning", "GLA", "DeltaNet", "GatedDeltaNet", "KDA", "Based", "LinearCache",
           "ShortConv", "GatedAttention", "MoH", "MLA", "MLACache", "to_mla", "to_mla_error_curve", "CCA",
           "CCACache", "CCGQA"]
