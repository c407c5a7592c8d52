"""``MiniCPMVForConditionalGeneration``: MiniCPM-Llama3-V-2.5 on transformers' own parts.

The checkpoint's modules, under its own names (so its safetensors load key for key):

* ``llm``: ``LlamaForCausalLM`` built from the top-level config (``llm.model.*``, ``llm.lm_head``);
* ``vpm``: ``Idefics2VisionTransformer`` (SigLIP-so400m, NaViT-style variable sizes) from
  ``vision_config``, its last layer dropped when ``drop_vision_last_layer``;
* ``resampler``: :class:`~lavender.student.minicpmv.resampler.Resampler`, ``query_num`` queries.

Forward, as the published remote code does it: each slice of each image arrives as its patches
laid side by side, ``(3, patch, n·patch)`` (the processor's ``reshape_by_patch``), padded to the
longest slice of the batch; the vision tower sees it as one row of patches with a
``(1, n)`` patch mask, so its position ids are the first row of its 70×70 table, bucketed by
the patch's fraction of the slice (the remote code's behaviour, reproduced as is); the resampler
then restores the slice's 2-D layout through ``tgt_sizes``. Each slice's ``query_num`` outputs
replace, in order, the ``<unk>`` placeholders (``config.image_token_id``) of ``input_ids`` (the
remote code writes them through ``image_bound``, the spans between ``<image>`` and ``</image>``:
the same positions).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, Idefics2VisionConfig, LlamaForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from lavender.student.minicpmv.configuration import MiniCPMVConfig
from lavender.student.minicpmv.resampler import Resampler, ResamplerAttention


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    config: MiniCPMVConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Idefics2EncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)
        elif isinstance(module, ResamplerAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)


class MiniCPMVForConditionalGeneration(MiniCPMVPreTrainedModel, GenerationMixin):
    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.llm = LlamaForCausalLM(config)
        vision_config = config.vision_config
        if not isinstance(vision_config, Idefics2VisionConfig):
            raise TypeError(f"vision_config must be an Idefics2VisionConfig, got {type(vision_config).__name__}")
        self.vpm = Idefics2VisionTransformer(vision_config)
        if config.drop_vision_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        self.resampler = Resampler(config.query_num, config.hidden_size, vision_config.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.llm.set_output_embeddings(value)

    def get_decoder(self):
        return self.llm.model

    def get_image_features(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """(slices, 3, patch, n·patch) pixels and (slices, 2) patch rows × cols → (slices, query_num, hidden)."""
        patch = self.config.vision_config.patch_size
        counts = tgt_sizes[:, 0] * tgt_sizes[:, 1]
        longest = int(counts.max())
        if pixel_values.shape[-1] < longest * patch:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[-1] // patch} patches per slice, tgt_sizes ask for {longest}"
            )
        pixel_values = pixel_values[..., : longest * patch]
        mask = torch.arange(longest, device=pixel_values.device)[None, :] < counts.to(pixel_values.device)[:, None]
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        features = self.vpm(pixel_values.to(dtype), patch_attention_mask=mask[:, None, :]).last_hidden_state
        return self.resampler(features, tgt_sizes)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        tgt_sizes: torch.LongTensor | None = None,
        image_grids: torch.LongTensor | None = None,  # the processor's slice layout; for attention maps only
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            if pixel_values is not None:
                inputs_embeds = self._with_images(input_ids, inputs_embeds, pixel_values, tgt_sizes)
        return self.llm(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _with_images(self, input_ids, inputs_embeds, pixel_values, tgt_sizes):
        if tgt_sizes is None:
            raise ValueError("pixel_values need tgt_sizes (each slice's rows × cols of patches), as the processor gives")
        if self.config.image_token_id is None:
            raise ValueError(
                "config.json names no image_token_id: set it to the id of the tokenizer's <unk> token "
                "(the placeholder each slice's query outputs replace)"
            )
        features = self.get_image_features(pixel_values, tgt_sizes)
        slots = input_ids == self.config.image_token_id
        if int(slots.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(slots.sum())} image placeholders but the {features.shape[0]} slices of "
                f"pixel_values give {features.shape[0] * features.shape[1]} tokens"
            )
        features = features.reshape(-1, features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(slots[..., None].expand_as(inputs_embeds), features)


__all__ = ["MiniCPMVForConditionalGeneration", "MiniCPMVPreTrainedModel"]
