"""IDEFICS (``IdeficsForVisionText2Text``): the Flamingo architecture, gated cross-attention layers
(one before every ``cross_layer_interval``-th decoder layer) whose keys are the images' vision
features, with or without a perceiver resampler (``config.use_resampler``).

Keys of a cross-attention layer are n_images blocks of K tokens each, in the order of the
``<image>`` tokens. A text row attends to the images ``image_attention_mask`` gives it (the
processor's: the latest ``<image>`` before the row); rows that see none get an all-masked row
(uniform probabilities) whose output the layer zeroes, so ``query_mask`` drops them.

Without the resampler the K keys are the vision tower's output itself: CLS, then the s×s patches
row-major (CLIP ViT: 257 = 1 + 16² at 224 px, patch 14). The CLS key is dropped and the patches
placed as LLaVA's are.

With the resampler the K keys are n latents (64 in idefics-9b/80b), not a grid. The map is taken
through the resampler by attention rollout (Abnar & Zuidema, 2020), exactly and differentiably:

* each perceiver block's latents attend over ``[vision tokens; latents]`` (softmax over both,
  averaged over the perceiver's heads, which its output projection mixes) and add the result to
  their input (a residual), then pass a per-token MLP (another residual, which mixes no tokens);
* a latent's content is tracked as shares of *sources*: the vision tokens and the learned latent
  queries it started from (``R₀ = [0 | I]``). Block b gives
  ``R_b = ½ (A_b^vision ⊕ A_b^latents · R_{b-1}) + ½ R_{b-1}``: the attention half takes each
  vision token as itself and each latent key as what it already holds, the residual half keeps
  what the latent held (the equal weighting of the two is rollout's usual assumption); rows stay
  distributions over the sources;
* the final layer norm and the MLPs act per token, so after the last block each latent's share of
  each vision token is ``R_D``'s vision part, and a text row's map is its probabilities over the
  latents times that (``Layout.weights``), the CLS token dropped as above.

Every block enters, latent→latent attention included, because in a resampler of depth D the
latents read the image over D blocks: taking the last block alone would credit a latent only with
what it read last and drop the image content it gathered before (in idefics-9b, 5 of its 6
blocks). The share that stays with the learned queries (and the CLS share) is not on the image; as
with other families' CLS keys, the map's mass is what lands on patches.

The perceiver computes its attention inline (``IdeficsPerceiverAttention.forward``, not through
``AttentionInterface``), so nothing hands its probabilities out. ``watch`` hooks each perceiver
block during recorded forwards and keeps its inputs (tensors the forward holds anyway); the
probabilities are recomputed from them by the block's own layer norms and projections when a map
is asked for (a few latents × vision tokens per image), so they are the block's own, with their
gradient. Nothing of transformers is patched.

Geometry: the image processor resizes the whole image to ``image_size``² (stretching it, cutting
nothing), so the grid's view is the whole image.
"""

from __future__ import annotations

import torch
from torch import nn

from lavender.student.adapters.base import Adapter, Layout, register_adapter, rows_that_see
from lavender.student.geometry import FULL_VIEW


@register_adapter
class IdeficsAdapter(Adapter):
    model_types = ("idefics",)
    attention_kind = "cross-attention layer"
    text_config_key = ""  # the language model's attention reads the top-level config
    image_inputs_hint = "pixel_values and image_attention_mask"

    def __init__(self, config, image_processor=None):
        super().__init__(config, image_processor)
        self._perceiver: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []  # per block: (block, context, latents)

    def attention_modules(self, model):
        return [layer.cross_attn for layer in model.model.gated_cross_attn_layers]

    def default_layers(self, layers):
        return layers  # every cross-attention layer, as for Mllama

    def watch(self, model, recording):
        if not self.config.use_resampler:
            return []
        resampler = model.model.perceiver_resampler

        def start(module, args):
            if recording():
                self._perceiver = []

        def keep(block, args, output):
            if recording():
                self._perceiver.append((block, *args))  # (context, latents) as the block got them

        return [resampler.register_forward_pre_hook(start)] + [
            attention.register_forward_hook(keep) for attention, _ in resampler.blocks
        ]

    def query_mask(self, inputs, positions, image=0):
        sees = inputs["image_attention_mask"]  # (B, T, n_images): 1 where a row attends to an image
        if image >= sees.shape[2]:
            return torch.zeros_like(positions, dtype=torch.bool, device=sees.device)
        return rows_that_see(inputs, positions, sees[:, :, image].bool())

    def layouts(self, inputs, image_sizes, image=0):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        tokens = side * side + 1  # CLS first, then the patches row-major
        if image_sizes is not None:
            self._check_geometry()
        sees = inputs["image_attention_mask"]  # (B, T, n_images)
        n_images = sees.shape[2]
        has_image = sees.bool().any(1)  # (B, n_images); padding images are seen by no row
        rollouts = self._rollouts(n_images) if self.config.use_resampler else None
        layouts = []
        for b in range(sees.shape[0]):
            if image >= n_images or not has_image[b, image]:
                layouts.append(None)
                continue
            patches = 1 + torch.arange(side * side).view(side, side)
            if rollouts is None:
                layouts.append(Layout(image * tokens + patches, FULL_VIEW))
            else:
                latents = self.config.perceiver_config.resampler_n_latents
                keys = image * latents + torch.arange(latents)
                weights = rollouts[b * n_images + image][:, patches]  # (latents, side, side)
                layouts.append(Layout(keys, FULL_VIEW, weights))
        return layouts

    def _rollouts(self, n_images: int) -> torch.Tensor:
        """(B·n_images, n, K) per image: each latent's share of each vision token, through every
        perceiver block of the latest recorded forward (see the module docstring)."""
        if not self._perceiver:
            raise RuntimeError(
                "IDEFICS maps through the resampler need its recorded forward: "
                "run the model inside `with capture.record(positions):` (with pixel_values)"
            )
        rollout = None
        for block, context, latents in self._perceiver:
            probs = perceiver_probabilities(block, context, latents).mean(1)  # (N, n, K + n), heads averaged
            n_context = context.shape[1]
            if rollout is None:  # R₀ = [0 | I]: the latents hold only their learned queries
                rollout = torch.cat([probs.new_zeros(probs.shape[0], latents.shape[1], n_context),
                                     torch.eye(latents.shape[1], dtype=probs.dtype, device=probs.device)
                                     .expand(probs.shape[0], -1, -1)], dim=2)
            read = probs[..., n_context:] @ rollout  # latent keys: what they hold
            read = torch.cat([probs[..., :n_context] + read[..., :n_context], read[..., n_context:]], dim=2)
            rollout = 0.5 * read + 0.5 * rollout
        return rollout[..., :n_context]

    def _check_geometry(self) -> None:
        processor = self._image_processor()
        expected = self.config.vision_config.image_size
        if (processor.size.height, processor.size.width) != (expected, expected):
            raise ValueError(
                f"the image processor makes {processor.size.height}×{processor.size.width} px images, "
                f"but the vision tower takes {expected}×{expected}: check its image_size"
            )


def perceiver_probabilities(block: nn.Module, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """(N, heads, n, K + n) float32: the softmax ``IdeficsPerceiverAttention`` computes inline,
    recomputed by the block's own layers from its inputs (its max subtraction changes nothing)."""
    context = block.context_layer_norm(context)
    latents = block.latents_layer_norm(latents)
    both = torch.cat([context, latents], dim=-2)
    q, k = block.q_proj(latents), block.k_proj(both)
    q, k = [x.reshape(x.shape[0], x.shape[1], block.n_heads, block.head_dim).transpose(1, 2) for x in (q, k)]
    if block.qk_layer_norms:
        q, k = block.q_layer_norm(q), block.k_layer_norm(k)
    with torch.autocast(q.device.type, enabled=False):
        return (q.float() * block.qk_scale @ k.float().transpose(-1, -2)).softmax(dim=-1)
