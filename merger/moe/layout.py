"""The three MoE layouts merger writes (Mixtral; Qwen2-MoE with a shared expert; Qwen3-MoE): which input
models each composes, tensor names, the config.json each needs, and the header-only checks that the base
and experts fit them (all before any tensor is read)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from merger.engine.config import parse_config
from merger.errors import CheckpointError, RecipeError
from merger.io.checkpoint import Checkpoint
from merger.io.hf import config_int
from merger.moe.recipe import LAYOUT_NAMES, NEEDS_SHARED, MoERecipe, named_layouts

PROJS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
INPUT_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# the input model types each layout composes (as mergekit-moe's supports_config): Mixtral has no q/k/v biases
# for a Qwen2, Qwen3's per-head q/k norms exist only in Qwen3-MoE
INPUTS = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2"), "qwen3_moe": ("qwen3",)}
KEYWORDS = {"mixtral": "mixtral", "qwen2_moe": "qwen", "qwen3_moe": "qwen3"}  # the short `architecture:` for each
# families the engine runs but transformers has no MoE class for (their norms, soft-caps, fused weights)
NO_MOE = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3", "gemma3": "Gemma 3", "phi3": "Phi-3"}
# transformers' defaults for keys a Llama/Mistral config.json may omit. Written out explicitly,
# because the MoE config classes default differently (Mixtral: rope_theta 1e6, rms_norm_eps 1e-5).
INPUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "hidden_act": "silu",
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096,
                "num_key_value_heads": 8},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
              "tie_word_embeddings": False, "sliding_window": None},
    # Qwen3Config defaults head_dim to 128, Qwen3MoeConfig to hidden / heads
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "hidden_act": "silu",
              "tie_word_embeddings": False, "sliding_window": None, "head_dim": 128, "attention_bias": False},
}
DEFAULT_ROPE_THETA = 10000.0
# keys of a Llama config that mean nothing (or something else) to the MoE classes
DROPPED_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "layer_types", "use_sliding_window",
                "max_window_layers")


def mlp_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.{proj}.weight"


def expert_name(arch: str, layer: int, j: int, proj: str) -> str:
    if arch == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{j}.{MIXTRAL_NAMES[proj]}.weight"
    return f"model.layers.{layer}.mlp.experts.{j}.{proj}.weight"


def router_name(arch: str, layer: int) -> str:
    block = "block_sparse_moe" if arch == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate.weight"


def shared_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def input_type(cfg: dict[str, Any]) -> str | None:
    """'llama' / 'mistral' / 'qwen2' / 'qwen3' from config.json (model_type, else architectures), None if none."""
    mt = cfg.get("model_type")
    if isinstance(mt, str) and mt in INPUT_DEFAULTS:
        return mt
    archs = cfg.get("architectures")
    return INPUT_TYPES.get(archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


@dataclass
class Shapes:
    model_type: str
    layout: str                # 'mixtral', 'qwen2_moe' or 'qwen3_moe'
    num_layers: int
    hidden: int
    intermediate: int          # routed experts' MLP width
    shared_intermediate: int   # the shared expert's (0 without one)
    windows: list[int | None] = field(default_factory=list)  # the base's sliding window per layer


def choose_layout(recipe: MoERecipe, mt: str, label: str) -> str:
    """The first layout (mergekit's order) that `architecture` names, takes the recipe's shared_experts and
    composes `mt` models; otherwise a RecipeError saying which key to change."""
    named = named_layouts(recipe.architecture)
    takes = [k for k in named if mt in INPUTS[k]]
    fits = [k for k in takes if NEEDS_SHARED[k] == bool(recipe.shared)]
    if fits:
        return fits[0]
    what = f"architecture: {recipe.architecture!r}" if recipe.architecture else "base_model"
    if not takes:
        usable = [k for k in LAYOUT_NAMES if mt in INPUTS[k]]
        families = sorted({t for k in named for t in INPUTS[k]})
        raise RecipeError(f"{label}: {what} ({' / '.join(LAYOUT_NAMES[k] for k in named)}) composes "
                          f"{', '.join(families)} models, but base_model is a {mt} model; use architecture: "
                          f"{' or '.join(KEYWORDS[k] for k in usable)}, or leave it out")
    layout = takes[0]
    if NEEDS_SHARED[layout]:
        alternative = " or use architecture: mixtral" if mt in INPUTS["mixtral"] else ""
        raise RecipeError(f"{label}: {what}: {mt} models compose into Qwen2-MoE here, which needs exactly one entry "
                          f"in shared_experts; add one (the base model, say){alternative}")
    raise RecipeError(f"{label}: shared_experts: {mt} models compose into {LAYOUT_NAMES[layout]} here, which has no "
                      f"shared expert; remove shared_experts")


def check_inputs(recipe: MoERecipe, ckpts: dict[str, Checkpoint], label: str) -> Shapes:
    """Config and header checks (no tensor data): one architecture everywhere, a layout that composes it,
    the same layers and shapes everywhere."""
    base = ckpts[recipe.base_model]
    mt = input_type(base.config)
    if mt is None:
        found = base.config.get("model_type") or base.config.get("architectures") or "?"
        why = (f": transformers has no MoE class with {NO_MOE[found]}'s layers, so merger cannot compose one"
               if isinstance(found, str) and found in NO_MOE else "")
        raise RecipeError(f"{label}: base_model: {recipe.base_model!r} is a {found!r} model{why}; clown-car MoE "
                          f"composes Llama, Mistral, Qwen2 or Qwen3 models")
    layout = choose_layout(recipe, mt, label)
    for key in ("attention_bias", "mlp_bias"):
        # Qwen3-MoE has attention_bias too; no layout has MLP biases
        if base.config.get(key) and not (layout == "qwen3_moe" and key == "attention_bias"):
            raise RecipeError(f"{label}: base_model: {recipe.base_model!r} has {key}: true, but "
                              f"{ARCH_NAMES[layout]} has no such biases; use a base without them")
    # the gates (and the MoE) run on merger's engine, and its parse gives the base's window per layer
    windows = parse_config(base.config, str(base.path / "config.json")).sliding_windows
    if layout == "qwen3_moe" and len(set(windows)) > 1:
        raise RecipeError(f"{label}: base_model: {recipe.base_model!r} has a sliding window on some layers only, "
                          f"but Qwen3-MoE's use_sliding_window covers every layer; use a base without it")
    n_layers = base.num_layers
    hidden = config_int(base.config, "hidden_size", base.path / "config.json", minimum=1)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if not base.has(name):
            raise CheckpointError(f"model {recipe.base_model!r}: has no tensor {name!r}; is it a Llama/Mistral "
                                  f"checkpoint in Hugging Face layout?")
    widths: dict[str, int] = {}
    for group, members in (("experts", recipe.experts), ("shared_experts", recipe.shared_experts or [])):
        ref: tuple[str, dict[str, tuple[int, ...]]] | None = None
        for j, e in enumerate(members):
            where = f"{label}: {group}[{j}].source_model"
            ck = ckpts[e.source_model]
            emt = input_type(ck.config)
            if emt != mt:
                raise RecipeError(f"{where}: {e.source_model!r} is a {ck.config.get('model_type')!r} model but "
                                  f"base_model is {mt!r}; every expert must share the base's architecture")
            for key, want in (("num_hidden_layers", n_layers), ("hidden_size", hidden)):
                if config_int(ck.config, key, ck.path / "config.json", minimum=1) != want:
                    raise RecipeError(f"{where}: {e.source_model!r} has {key} {ck.config.get(key)} but base_model "
                                      f"has {want}; experts must match the base's shape")
            if ck.config.get("mlp_bias"):
                raise RecipeError(f"{where}: {e.source_model!r} has mlp_bias: true; MoE experts have no MLP biases")
            shapes = {}
            for i in range(n_layers):
                for proj in PROJS:
                    tname = mlp_name(i, proj)
                    if not ck.has(tname):
                        raise CheckpointError(f"model {e.source_model!r} ({group}[{j}]): has no tensor {tname!r}; "
                                              f"is it a Llama/Mistral checkpoint in Hugging Face layout?")
                    shapes[tname] = ck.shape(tname)
            if ref is None:
                ref = (f"{group}[{j}]", shapes)
            for tname, shape in shapes.items():
                if shape != ref[1][tname]:
                    raise RecipeError(f"{where}: {tname} is {list(shape)} in {e.source_model!r} but "
                                      f"{list(ref[1][tname])} in {ref[0]}; these experts need equal MLP shapes")
            down = shapes[mlp_name(0, "down_proj")]
            if down[0] != hidden:
                raise RecipeError(f"{where}: {mlp_name(0, 'down_proj')} is {list(down)}, not [{hidden}, ...]; "
                                  f"experts must match the base's hidden_size")
            widths[group] = down[1]
    return Shapes(model_type=mt, layout=layout, num_layers=n_layers, hidden=hidden, intermediate=widths["experts"],
                  shared_intermediate=widths.get("shared_experts", 0), windows=windows)


def effective_config(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The base config with transformers' defaults for its type written out."""
    out = dict(INPUT_DEFAULTS[model_type])
    out.update({k: v for k, v in cfg.items() if v is not None or k == "sliding_window"})
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out.get("num_attention_heads")
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {"rope_theta": DEFAULT_ROPE_THETA, **out["rope_parameters"]}
    elif "rope_theta" not in out:
        out["rope_theta"] = DEFAULT_ROPE_THETA
    return out


def moe_config(recipe: MoERecipe, base_cfg: dict[str, Any], shapes: Shapes) -> dict[str, Any]:
    """config.json for the output (dtype fields are set by write_config)."""
    arch = shapes.layout
    cfg = effective_config(base_cfg, shapes.model_type)
    attention_bias = bool(cfg.get("attention_bias"))
    window = next((w for w in shapes.windows if w is not None), None)
    for key in DROPPED_KEYS:
        cfg.pop(key, None)
    cfg.update(architectures=[ARCH_NAMES[arch]], model_type=arch, num_experts_per_tok=recipe.experts_per_token,
               router_aux_loss_coef=0.001, output_router_logits=False, intermediate_size=shapes.intermediate)
    if arch == "mixtral":
        cfg.update(num_local_experts=len(recipe.experts), sliding_window=window, router_jitter_noise=0.0)
        return cfg
    # Qwen2-MoE and Qwen3-MoE: every layer sparse, top-k renormalised like Mixtral (mergekit's choice too)
    cfg.update(num_experts=len(recipe.experts), moe_intermediate_size=shapes.intermediate, decoder_sparse_step=1,
               mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=window is not None, sliding_window=window)
    if arch == "qwen3_moe":  # no shared expert; q/k norms come with the attention tensors
        cfg["attention_bias"] = attention_bias
        return cfg
    # Qwen2-MoE: one sigmoid-gated shared expert; q/k/v biases (a Qwen2 base's own, zeros for a Llama's).
    # The base's windows go in as layer_types, since Qwen2-MoE's default rule is not Qwen2's or Mistral's.
    cfg.update(shared_expert_intermediate_size=shapes.shared_intermediate, qkv_bias=True,
               max_window_layers=shapes.num_layers)
    if window is not None:
        cfg["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in shapes.windows]
    return cfg
