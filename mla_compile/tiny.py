"""Tiny, fast, valid configs and random-weight models for every Multi-head Latent Attention (MLA)
family in the installed transformers.

    MLA_FAMILIES      model types whose config class has ``kv_lora_rank`` (discovered at import time
                      from the installed transformers)
    DSA_FAMILIES      families with a DeepSeek-Sparse-Attention top-k indexer (index mask built by
                      ``scatter(-1, topk_indices ...)`` / ``scatter_add_``)
    HYBRID_FAMILIES   families with linear-attention layers beside MLA layers
    SINK_FAMILIES     families whose softmax has per-head attention sinks
    tiny_config(family, ...)  -> config accepted by the model ``tiny_model`` builds
    tiny_model(family, ...)   -> eval-mode nn.Module (``*ForCausalLM`` if it exists, else the text model)
    has_causal_lm(family)     -> bool

Nothing here downloads anything: every model is built from a config with random weights.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import torch

__all__ = [
    "MLA_FAMILIES",
    "DSA_FAMILIES",
    "HYBRID_FAMILIES",
    "SINK_FAMILIES",
    "tiny_config",
    "tiny_model",
    "has_causal_lm",
    "text_model_type",
    "mla_attention_modules",
    "KNOWN_LIMITATIONS",
]


# Composite (vision-language) wrappers whose only MLA part is a sub-config of another family
# already in the list (kimi_k25 wraps deepseek_v3); *_text types are folded into their parent.
_SKIP_TYPES = {"kimi_k25"}


# --------------------------------------------------------------------------------------------- #
# discovery
# --------------------------------------------------------------------------------------------- #
def _quiet():
    """Context that silences transformers' config-validation chatter."""

    class _Q:
        def __enter__(self):
            self._lg = logging.getLogger("transformers")
            self._lvl = self._lg.level
            self._lg.setLevel(logging.ERROR)
            try:
                from transformers.utils import logging as hf_logging

                self._hf = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()
            except Exception:  # pragma: no cover
                self._hf = None
            self._w = warnings.catch_warnings()
            self._w.__enter__()
            warnings.simplefilter("ignore")
            return self

        def __exit__(self, *exc):
            self._w.__exit__(*exc)
            self._lg.setLevel(self._lvl)
            if self._hf is not None:
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity(self._hf)
            return False

    return _Q()


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def _declares(config, name: str) -> bool:
    """Whether a config instance has the field `name`. Heterogeneous configs (per-layer fields, e.g.
    dots3_note) refuse a global read of a per-layer field with an error: the field is there."""
    try:
        return hasattr(config, name)
    except Exception as e:
        return "PerLayer" in type(e).__name__


def _class_has_kv_lora_rank(cls) -> bool:
    for klass in getattr(cls, "__mro__", (cls,)):
        if "kv_lora_rank" in getattr(klass, "__annotations__", {}) or "kv_lora_rank" in vars(klass):
            return True
    try:
        if "kv_lora_rank" in inspect.signature(cls.__init__).parameters:
            return True
    except (TypeError, ValueError):
        pass
    try:
        return _declares(cls(), "kv_lora_rank")
    except Exception:
        return False


def _discover():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    found = []
    with _quiet():
        for mt in list(CONFIG_MAPPING.keys()):
            if mt in _SKIP_TYPES:
                continue
            try:
                cls = CONFIG_MAPPING[mt]
            except Exception:
                continue
            if not _class_has_kv_lora_rank(cls):
                # composite config whose text sub-config is MLA (glm5_next, mistral_large4, dots3_note)
                try:
                    tc = cls().get_text_config()
                except Exception:
                    continue
                if not _declares(tc, "kv_lora_rank"):
                    continue
            found.append(mt)
    # fold "<family>_text" into "<family>" when both exist
    fams = [f for f in found if not (f.endswith("_text") and f[: -len("_text")] in found)]
    # a "<x>_text" type whose parent was not found still counts as the family "<x>" if the parent exists
    out = []
    for f in fams:
        if f.endswith("_text"):
            parent = f[: -len("_text")]
            try:
                CONFIG_MAPPING[parent]
                f = parent
            except Exception:
                pass
        if f not in out:
            out.append(f)
    if not out:
        raise RuntimeError("no model type of the installed transformers has kv_lora_rank: the config "
                           "discovery in mla_compile/tiny.py no longer reads this release's configs")
    return sorted(out)


def _modeling_source(family: str) -> str:
    import importlib

    for mt in (family, text_model_type(family)):
        try:
            mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
            return inspect.getsource(mod)
        except Exception:
            continue
    return ""


def _is_dsa(family: str) -> bool:
    src = _modeling_source(family)
    # DSA: an indexer yields top-k key indices that are scattered into a per-query key mask
    return ("topk_indices" in src and ("scatter(-1, topk_indices" in src or "scatter_add_(-1" in src)
            and "Indexer" in src)


def _is_hybrid(family: str) -> bool:
    src = _modeling_source(family)
    return '"linear_attention"' in src or "'linear_attention'" in src




# Measured with transformers 5.23 / torch 2.13 CPU (tiny configs, 2 layers, T=7, left padding).
KNOWN_LIMITATIONS: dict[str, list[str]] = {
    # q_lora_rank=None is rejected by the config (field typed int, or a validator)
    "q_lora_none_rejected": ["axk1", "axk2", "deepseek_v32", "dots3_note", "glm5_next", "glm_moe_dsa",
                             "hy_v4", "longcat_flash"],
    # qk_rope_head_dim=0 builds but the forward fails (head_dim=0 makes the rotary embedding fall back
    # to hidden_size // heads); NoPE works for dots3_note, glm5_next (always NoPE), kimi_linear,
    # mistral4, mistral_large4
    "rope0_fails": ["axk1", "axk2", "bailing_hybrid", "deepseek_v2", "deepseek_v3", "deepseek_v32",
                    "glm4_moe_lite", "glm_moe_dsa", "hy_v4", "longcat_flash", "minicpm3", "youtu"],
    "sdpa_unsupported": ["hy_v4"],
    # Dynamo graph breaks in one forward: longcat_flash (MoE `.item()` / nonzero loop, 11 graphs),
    # glm5_next (indexer `pool_valid.any(0)` boolean indexing -> nonzero, 11 graphs; 1 graph with
    # torch._dynamo.config.capture_dynamic_output_shape_ops=True)
    "graph_breaks": ["longcat_flash", "glm5_next"],
    # no question of q LoRA: the config has no q_lora_rank (q_proj is a plain projection)
    "no_q_lora": ["mistral_large4"],
}


# --------------------------------------------------------------------------------------------- #
# class resolution
# --------------------------------------------------------------------------------------------- #
def _causal_lm_name(model_type: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as C

    return C.get(model_type)


def _causal_lm_class(model_type: str):
    """The ``*ForCausalLM`` class taking this config: from the auto mapping, else (e.g. mistral4,
    whose class exists but is not registered) the modeling module's ``*ForCausalLM`` class whose
    ``config_class`` is the config class."""
    import importlib

    import transformers

    name = _causal_lm_name(model_type)
    if name is not None:
        return getattr(transformers, name)
    cfg_cls = _config_class(model_type)
    for mt in (model_type, model_type[: -len("_text")] if model_type.endswith("_text") else None):
        if not mt:
            continue
        try:
            mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        except Exception:
            continue
        for attr in dir(mod):
            obj = getattr(mod, attr)
            if (
                attr.endswith("ForCausalLM")
                and isinstance(obj, type)
                and getattr(obj, "config_class", None) is cfg_cls
            ):
                return obj
    return None


def has_causal_lm(family: str) -> bool:
    """True when transformers has a ``*ForCausalLM`` class taking the family's (text) config."""
    try:
        return _causal_lm_class(text_model_type(family)) is not None
    except Exception:
        return _causal_lm_name(family) is not None


def text_model_type(family: str) -> str:
    """The model_type of the config that the built model takes (``glm5_next`` -> ``glm5_next_text``)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[family]
    if _class_has_kv_lora_rank(cls):
        return family
    sub = getattr(cls, "sub_configs", None) or {}
    tc = sub.get("text_config")
    mt = getattr(tc, "model_type", None)
    if mt and mt in CONFIG_MAPPING:
        return mt
    cand = family + "_text"
    if cand in CONFIG_MAPPING:
        return cand
    with _quiet():
        return cls().get_text_config().model_type


# --------------------------------------------------------------------------------------------- #
# tiny config
# --------------------------------------------------------------------------------------------- #
# No fallback list: a transformers release whose configs this discovery cannot read must fail loudly
# (tests/test_families.py::test_discovery_finds_every_family), not shrink the family table silently.
MLA_FAMILIES: list[str] = _discover()
DSA_FAMILIES: set[str] = {f for f in MLA_FAMILIES if _is_dsa(f)}
HYBRID_FAMILIES: set[str] = {f for f in MLA_FAMILIES if _is_hybrid(f)}
# softmax over [scores, per-head sink logits] (an `nn.Parameter` named sinks): no form models it yet
SINK_FAMILIES: set[str] = {f for f in MLA_FAMILIES if "self.sinks = " in _modeling_source(f)}


def _defaults(model_type: str):
    with _quiet():
        return _config_class(model_type)()


def _known(default_cfg, cls, key: str) -> bool:
    if key in default_cfg.to_dict() or hasattr(default_cfg, key):
        return True
    for klass in cls.__mro__:
        if key in getattr(klass, "__annotations__", {}):
            return True
    return False


def _hybrid_layer_types(n: int, linear: str, full: str) -> list[str]:
    # at least one of each; linear first, full last (as in the released models: e.g. 3 KDA : 1 MLA)
    if n == 1:
        return [full]
    return [full if (i % 2 == 1 or i == n - 1) else linear for i in range(n)]


def _scaled_sections(sections: list[int], total: int) -> list[int]:
    """`sections` rescaled to whole numbers >= 0 that sum to `total` (floors, the rest from the first)."""
    scaled = [x * total // sum(sections) for x in sections]
    for i in range(total - sum(scaled)):
        scaled[i % len(scaled)] += 1
    return scaled


def tiny_config(
    family: str,
    *,
    heads: int = 4,
    kv_lora_rank: int = 32,
    q_lora_rank: int | None = 16,
    qk_rope_head_dim: int = 8,
    qk_nope_head_dim: int = 16,
    v_head_dim: int = 16,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 128,
    index_topk: int = 4,
    attn_implementation: str = "eager",
    **overrides,
):
    """A tiny config for ``family``; it is the config the model built by ``tiny_model`` takes
    (the text config for families with a composite top-level config). ``overrides`` win over
    everything (they are passed to the config constructor)."""
    mt = text_model_type(family)
    cls = _config_class(mt)
    d = _defaults(mt)
    dn, dr, dv = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    if getattr(d, "qk_rope_head_dim", None) == 0:
        # NoPE-only family (glm5_next: its validator requires qk_rope_head_dim == 0 for DSA layers)
        dr = 0
    inter = 2 * hidden_size
    moe_inter = max(hidden_size // 2, 8)

    kw: dict = {}

    def put(key, value):
        if _known(d, cls, key):
            kw[key] = value

    put("vocab_size", vocab_size)
    put("hidden_size", hidden_size)
    put("intermediate_size", inter)
    put("moe_intermediate_size", moe_inter)
    put("num_attention_heads", heads)
    put("num_key_value_heads", heads)
    put("kv_lora_rank", kv_lora_rank)
    put("q_lora_rank", q_lora_rank)
    put("qk_rope_head_dim", dr)
    put("qk_nope_head_dim", dn)
    put("v_head_dim", dv)
    put("qk_head_dim", dn + dr)
    put("max_position_embeddings", 512)
    put("initializer_range", 0.1)
    put("attention_dropout", 0.0)
    # head_dim: DeepSeek convention (head_dim == RoPE dim) unless the family uses dn + dr
    if _known(d, cls, "head_dim") and getattr(d, "head_dim", None) is not None:
        d_dr = getattr(d, "qk_rope_head_dim", None)
        if getattr(d, "head_dim") == d_dr:
            kw["head_dim"] = dr
        else:
            kw["head_dim"] = dn + dr
    # layers
    if mt == "longcat_flash" or (_known(d, cls, "num_layers") and not _known(d, cls, "num_hidden_layers")):
        kw["num_layers"] = max(1, layers // 2)  # num_hidden_layers = 2 * num_layers
        n_layers = 2 * kw["num_layers"]
    else:
        kw["num_hidden_layers"] = layers
        n_layers = layers
    # MoE: tiny, ungrouped, first layer dense
    for k, v in (
        ("n_routed_experts", 4), ("num_experts", 4), ("n_shared_experts", 1), ("num_shared_experts", 1),
        ("num_experts_per_tok", 2), ("num_experts_per_token", 2), ("moe_topk", 2),
        ("n_group", 1), ("num_expert_group", 1), ("topk_group", 1),
        ("first_k_dense_replace", 1), ("shared_experts_intermediate_size", moe_inter),
        ("ffn_hidden_size", inter), ("expert_ffn_hidden_size", moe_inter), ("zero_expert_num", 2),
    ):
        put(k, v)
    if mt.startswith("dots3_note"):
        kw["first_k_dense_replace"] = 1  # consumed by __post_init__, not a field
    if _known(d, cls, "mlp_layer_types"):
        kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (n_layers - 1) if n_layers > 1 else ["dense"]
    # token ids inside the vocabulary
    put("pad_token_id", 0)
    put("bos_token_id", 1)
    put("eos_token_id", 2)
    # DSA indexer
    put("index_topk", index_topk)
    put("index_n_heads", 2)
    put("index_head_dim", max(16, dr))
    if _known(d, cls, "index_kpool"):
        kpool = 2 if index_topk % 2 == 0 else 1
        kw["index_kpool"] = kpool
    # linear attention (hybrids)
    put("linear_head_dim", 16)
    put("linear_num_heads", heads)
    # hyper-connections / sinks etc.: keep family defaults (they are cheap)
    if family in HYBRID_FAMILIES or mt in HYBRID_FAMILIES:
        full = "indexed_attention" if mt.startswith("glm5_next") else "full_attention"
        kw["layer_types"] = _hybrid_layer_types(n_layers, "linear_attention", full)
    if _known(d, cls, "indexer_types"):
        kw["indexer_types"] = ["full"] * n_layers
    # dots3_note: sliding-window MLA layers carry their own per-layer dims
    if mt.startswith("dots3_note"):
        kw.update(
            swa_num_attention_heads=heads, swa_num_key_value_heads=heads,
            swa_q_lora_rank=q_lora_rank, swa_kv_lora_rank=kv_lora_rank, swa_head_dim=dn + dr,
            swa_qk_nope_head_dim=dn, swa_v_head_dim=dv, swa_qk_rope_head_dim=dr,
        )
        kw["sliding_window"] = 4
    # multimodal RoPE (hy_v4_vl): its (time, height, width) sections must sum to the rotary pairs
    rope = getattr(d, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("mrope_section") and dr:
        kw["rope_parameters"] = {**rope, "mrope_section": _scaled_sections(rope["mrope_section"], dr // 2)}
    kw.update(overrides)
    with _quiet():
        cfg = cls(**kw)
    try:
        cfg._attn_implementation = attn_implementation
    except Exception:  # pragma: no cover
        cfg.__dict__["_attn_implementation"] = attn_implementation
    return cfg


# --------------------------------------------------------------------------------------------- #
# tiny model
# --------------------------------------------------------------------------------------------- #
_ATTN_HINTS = ("attn", "attention", "indexer")


def mla_attention_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every attention module holding a ``kv_b_proj``."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "kv_b_proj")]


@torch.no_grad()
def _fix_zero_attention_weights(model: torch.nn.Module, std: float) -> None:
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.dim() < 2:
            continue
        low = name.lower()
        if not any(h in low for h in _ATTN_HINTS) and "kv_b_proj" not in low:
            continue
        if not torch.any(p != 0):
            p.normal_(0.0, std)


def tiny_model(
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "eager",
    **config_kwargs,
) -> torch.nn.Module:
    """Random-weight tiny model (deterministic for a given seed), eval mode.

    ``AutoModelForCausalLM`` when the family has a CausalLM class, else the text model
    (``AutoModel`` on the text config). ``config_kwargs`` go to ``tiny_config``."""
    from transformers import AutoModel, AutoModelForCausalLM

    cfg = tiny_config(family, attn_implementation=attn_implementation, **config_kwargs)
    torch.manual_seed(seed)
    with _quiet():
        if _causal_lm_name(cfg.model_type) is not None:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
        elif (lm_cls := _causal_lm_class(cfg.model_type)) is not None:
            model = lm_cls._from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
        else:
            model = AutoModel.from_config(cfg, attn_implementation=attn_implementation, dtype=torch.float32)
    _fix_zero_attention_weights(model, float(getattr(cfg, "initializer_range", 0.02) or 0.02))
    if dtype != torch.float32:
        model = model.to(dtype)
    model.eval()
    return model


def tiny_deepseek_v4(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> torch.nn.Module:
    """A tiny DeepSeek-V4 (`deepseek_v4`; random weights, eval mode) with one layer of each attention
    type: sliding window, sliding + CSA (compressed entries picked by the indexer's top-k), sliding +
    HCA (heavily compressed). V4 is not MLA by transformers' definition (no kv_lora_rank): its
    attention is latent MQA, one key/value head shared by all heads (passes/shared_kv.py). The sinks,
    which HF initialises to zeros, get random values, so that they matter. index_topk covers every
    compressed entry of short prompts: the indexer's ReLU scores tie at zero, and top-k among ties
    picks arbitrarily."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    kw = dict(vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=3,
              layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
              mlp_layer_types=["moe"] * 3, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
              partial_rotary_factor=0.25, q_lora_rank=32, n_routed_experts=4, num_experts_per_tok=2,
              n_shared_experts=1, sliding_window=8,
              compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
              o_groups=2, o_lora_rank=16, index_n_heads=2, index_head_dim=16, index_topk=16, hc_mult=2,
              hc_sinkhorn_iters=3, max_position_embeddings=512)
    kw.update(config_kwargs)
    torch.manual_seed(seed)
    with _quiet():
        model = DeepseekV4ForCausalLM(DeepseekV4Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks") or name.endswith("position_bias"):
                p.normal_(0.0, 0.5)
    return model.to(dtype).eval()
