"""The two MoE layouts merger writes (Mixtral; Qwen2-MoE with a shared expert): tensor names, the
config.json each needs, and the header-only checks that the base and experts fit them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from merger.errors import CheckpointError, RecipeError
from merger.io.checkpoint import Checkpoint
from merger.io.hf import config_int
from merger.moe.recipe import MoERecipe

PROJS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
INPUT_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# transformers' defaults for keys a Llama/Mistral config.json may omit. Written out explicitly,
# because the MoE config classes default differently (Mixtral: rope_theta 1e6, rms_norm_eps 1e-5).
INPUT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None},
    "mistral": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "hidden_act": "silu",
                "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "sliding_window": 4096,
                "num_key_value_heads": 8},
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
    """'llama' / 'mistral' from config.json (model_type, else architectures), None if neither."""
    mt = cfg.get("model_type")
    if isinstance(mt, str) and mt in INPUT_DEFAULTS:
        return mt
    archs = cfg.get("architectures")
    return INPUT_TYPES.get(archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


@dataclass
class Shapes:
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int          # routed experts' MLP width
    shared_intermediate: int   # the shared expert's (0 without one)


def check_inputs(recipe: MoERecipe, ckpts: dict[str, Checkpoint], label: str) -> Shapes:
    """Config and header checks (no tensor data): same architecture, layers and shapes everywhere."""
    base = ckpts[recipe.base_model]
    mt = input_type(base.config)
    if mt is None:
        found = base.config.get("model_type") or base.config.get("architectures") or "?"
        raise RecipeError(f"{label}: base_model: {recipe.base_model!r} is a {found!r} model; clown-car MoE "
                          f"composes Llama or Mistral models")
    for key in ("attention_bias", "mlp_bias"):
        if base.config.get(key):
            raise RecipeError(f"{label}: base_model: {recipe.base_model!r} has {key}: true, but "
                              f"{ARCH_NAMES[recipe.output_architecture]} has no such biases; use a base without them")
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
    return Shapes(model_type=mt, num_layers=n_layers, hidden=hidden, intermediate=widths["experts"],
                  shared_intermediate=widths.get("shared_experts", 0))


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
    arch = recipe.output_architecture
    cfg = effective_config(base_cfg, shapes.model_type)
    window = cfg.get("sliding_window") if shapes.model_type == "mistral" else None
    for key in DROPPED_KEYS:
        cfg.pop(key, None)
    cfg.update(architectures=[ARCH_NAMES[arch]], model_type=arch, num_experts_per_tok=recipe.experts_per_token,
               router_aux_loss_coef=0.001, output_router_logits=False, intermediate_size=shapes.intermediate)
    if arch == "mixtral":
        cfg.update(num_local_experts=len(recipe.experts), sliding_window=window, router_jitter_noise=0.0)
        return cfg
    # Qwen2-MoE: every layer sparse, top-k renormalised like Mixtral, one sigmoid-gated shared expert.
    # Its q/k/v always carry biases in older transformers; we write zero biases (exactly no bias).
    cfg.update(num_experts=len(recipe.experts), moe_intermediate_size=shapes.intermediate,
               shared_expert_intermediate_size=shapes.shared_intermediate, decoder_sparse_step=1,
               mlp_only_layers=[], norm_topk_prob=True, qkv_bias=True, use_sliding_window=window is not None,
               sliding_window=window, max_window_layers=shapes.num_layers)
    if window is not None:
        cfg["layer_types"] = ["sliding_attention"] * shapes.num_layers
    return cfg
