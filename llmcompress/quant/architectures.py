"""Where things are in a decoder layer, per model family: the data the layer loop (quant/sequential.py) and the
algorithms (quant/algorithms/) read instead of naming modules themselves.

An `Architecture` entry says, for one family (matched on `model.config.model_type`):

  groups       the Linears that read one input, in GPTQ's true-sequential order, each as a `Group`:
                 name       "qkv", "o", "gate_up", "down" (or the Linear's own name for generic groups): the
                            algorithms key their choices on it (SmoothQuant does not smooth "o", and "down" only
                            with smoothquant.mlp_down)
                 producer   the op (relative to the decoder layer) whose output is exactly the consumers' input,
                            into which a per-channel scale s can be folded (a norm: weight ← weight / s, with the
                            family's norm convention; a Linear: its output rows ← rows / s); None where there is
                            none (OLMo 2's q/k/v read the residual stream; Phi-3's down_proj reads half of a fused
                            gate_up_proj): SmoothQuant / AWQ then leave the group unscaled
                 consumers  Linear names relative to the decoder layer
  norm_offset  the norms compute x̂ · (offset + weight): 0 (Llama), 1 (Gemma: folding s gives
               w' = (1 + w) / s − 1)
  kv           (k, v): the modules whose outputs are the cached keys and values, relative to the decoder layer
               (Phi-3: both its fused qkv_proj, whose k and v column blocks kvcache.py quantizes), or None where
               they are not known: KV-cache quantization is refused there
  logit_inputs the Linears whose outputs make the attention logits (AWQ does not clip them by default)
  llama_residual  x + o_proj(attn(norm(x))), then h + down_proj(mlp(post_attention_layernorm(h))): the fused
               GPTQ pass may compute the layer that way (it still checks on one batch that the result is exact)

`place(model, linears)` maps every selected Linear to (decoder layer index, group) and refuses, in one line naming
the module, a Linear outside the decoder layers. A Linear inside a layer that the family's groups do not name gets
a group of its own with no producer (quantized by RTN / GPTQ on its own hooked inputs, never scaled); so does
every Linear of a family with no entry here (`GENERIC`), where SmoothQuant and AWQ are refused (they need to know
what produces each input). Nothing is skipped silently: every selected Linear lands in exactly one group.

Adding a family: one `Architecture(...)` in ARCHITECTURES with its model_type(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from llmcompress.errors import UserError


@dataclass(frozen=True)
class Group:
    name: str
    producer: Optional[str]
    consumers: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    groups: tuple[Group, ...]
    norm_offset: float = 0.0
    kv: Optional[tuple[str, str]] = ("self_attn.k_proj", "self_attn.v_proj")
    logit_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj")
    llama_residual: bool = False

    @property
    def generic(self) -> bool:
        return not self.groups

    @torch.no_grad()
    def fold_scales(self, producer: nn.Module, consumers: Sequence[nn.Linear], s: torch.Tensor) -> None:
        """X → X / s in the producer, W → W · s in the consumers (the float function is unchanged):
        a norm's weight w (x̂ · (offset + w)) becomes (offset + w) / s − offset, a LayerNorm bias is divided by s,
        a Linear producer's output rows (and bias) are divided by s."""
        s = s.to(consumers[0].weight.device)
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
        elif self.norm_offset:
            w = producer.weight
            w.copy_(((self.norm_offset + w.float()) / s - self.norm_offset).to(w.dtype))
        else:
            producer.weight.div_(s.to(producer.weight.dtype))
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        for lin in consumers:
            lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


def _llama_like(qkv_producer: Optional[str] = "input_layernorm", mlp_producer: Optional[str] =
                "post_attention_layernorm") -> tuple[Group, ...]:
    return (Group("qkv", qkv_producer, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            Group("o", "self_attn.v_proj", ("self_attn.o_proj",)),
            Group("gate_up", mlp_producer, ("mlp.gate_proj", "mlp.up_proj")),
            Group("down", "mlp.up_proj", ("mlp.down_proj",)))


ARCHITECTURES = (
    # Llama 2/3, SmolLM (the embedded default), Mistral: pre-norm, separate q/k/v and gate/up
    Architecture("llama", ("llama", "mistral"), _llama_like(), llama_residual=True),
    # Qwen2/2.5: q/k/v carry a bias (folding into the norm leaves it alone: the bias is added after X W·sᵀ);
    # Qwen3: q_norm / k_norm act on q_proj / k_proj's outputs, after the input the scales touch, so no group
    # scales through them (no q/k producer group), and the cached keys are q/k-normed after k_proj
    Architecture("qwen", ("qwen2", "qwen3"), _llama_like(), llama_residual=True),
    # Gemma 2/3: (1 + weight) norms; sandwich norms (post_attention_layernorm normalises the attention output
    # before the residual add, pre_feedforward_layernorm feeds the MLP); attention / final logit soft-capping
    # changes no Linear's input
    Architecture("gemma", ("gemma2", "gemma3_text", "gemma3"),
                 _llama_like(mlp_producer="pre_feedforward_layernorm"), norm_offset=1.0),
    # Phi-3: fused qkv_proj and gate_up_proj; o_proj reads attention over the v rows of qkv_proj and down_proj
    # reads up ⊙ act(gate), half of gate_up_proj's rows: no single producer to fold into; the cached keys and
    # values are qkv_proj's k and v column blocks
    Architecture("phi3", ("phi3",),
                 (Group("qkv", "input_layernorm", ("self_attn.qkv_proj",)),
                  Group("o", None, ("self_attn.o_proj",)),
                  Group("gate_up", "post_attention_layernorm", ("mlp.gate_up_proj",)),
                  Group("down", None, ("mlp.down_proj",))),
                 kv=("self_attn.qkv_proj", "self_attn.qkv_proj"), logit_inputs=("self_attn.qkv_proj",)),
    # OLMo 2: norms after attention and MLP, none before: q/k/v and gate/up read the residual stream itself
    Architecture("olmo2", ("olmo2",), _llama_like(qkv_producer=None, mlp_producer=None)),
    # Mixtral, Qwen3-MoE: attention as Llama / Qwen3; the MLP is a float router and experts stored as 3-D
    # parameters, which experts.py quantizes per expert (no Linear group; a dense Qwen3-MoE MLP layer's Linears
    # get groups of their own, unscaled)
    Architecture("moe", ("mixtral", "qwen3_moe"), _llama_like()[:2]),
)

GENERIC = Architecture("generic", (), (), kv=None)


def architecture(model: nn.Module) -> Architecture:
    """The entry for the model's config.model_type, else GENERIC."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHITECTURES:
        if mt in arch.model_types:
            return arch
    return GENERIC


def place(layer: nn.Module, prefix: str, linears: dict[str, nn.Linear], arch: Architecture) -> list[Group]:
    """The groups of decoder layer `layer` (named `prefix`) over the selected `linears` (full names) inside it, in
    true-sequential order: the family's groups first (only those whose consumers are all selected), then one
    group per selected Linear no family group names (producer None). A family group with some consumers
    selected and some not is split into one group per selected consumer, unscaled."""
    mine = {n[len(prefix) + 1:] for n in linears if n.startswith(prefix + ".")}
    groups, placed = [], set()
    for g in arch.groups:
        cons = [c for c in g.consumers if c in mine]
        if len(cons) == len(g.consumers):
            groups.append(g)
        else:
            groups += [Group(c, None, (c,)) for c in cons]
        placed.update(cons)
    # the rest in module order (the order the layer runs them, for the usual layouts)
    for name, m in layer.named_modules():
        if name in mine and name not in placed:
            groups.append(Group(name, None, (name,)))
    return groups


def check_outside(linears: dict[str, nn.Linear], layer_prefixes: Sequence[str]) -> None:
    """Refuse a selected Linear that lies outside every decoder layer (the layer-by-layer methods cannot feed it
    its inputs)."""
    for name in linears:
        if not any(name.startswith(p + ".") for p in layer_prefixes):
            raise UserError(f"include: {name} lies outside the decoder layers, where the layer-by-layer methods "
                            f"(gptq, awq, smoothquant, kv_cache, static activation scales) cannot place it; "
                            f"exclude it or use method rtn without them")
